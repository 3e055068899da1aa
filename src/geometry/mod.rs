//! Geometry: pinhole cameras, rigid motions (SE(3) exp/log, orbit cameras), similarity transforms with
//! Umeyama alignment, and rotation error metrics. All in `f64` with nalgebra types; poses are named by the
//! frames they map between, e.g. `camera_from_object`.

pub mod camera;
pub mod metrics;
pub mod se3;
pub mod sim3;

pub use camera::Intrinsics;
pub use metrics::rotation_error_deg;
pub use se3::{
    camera_centre, isometry_from_row_major, isometry_to_row_major, orbit_camera_from_object, se3_exp, se3_log, skew, so3_exp,
    so3_log,
};
pub use sim3::{align_camera_poses, umeyama, Sim3};
