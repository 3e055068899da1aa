//! Pinhole cameras (OpenCV convention: x right, y down, z forward; pixel centres at integer coordinates).

use nalgebra::{Matrix3, Point2, Point3, Vector3};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest camera skew (`K[0][1]`) accepted, as a fraction of `fx`. Real calibrations carry a
/// negligible skew (~1e-4 fx); up to this bound it shifts a pixel 480 rows down by under half a
/// pixel and is dropped, beyond it the camera is refused.
pub const MAX_SKEW_RATIO: f64 = 1e-3;
/// Largest accepted `|fy / fx - 1|`: the renderer casts rays with the mean focal length (square
/// pixels), which moves a point at the edge of a 640-px image by at most ~1.6 px at this bound.
pub const MAX_ASPECT_DEVIATION: f64 = 0.01;

/// Intrinsics of a pinhole camera without distortion or skew (fx and fy may differ), for an image
/// of `width` x `height` pixels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Intrinsics {
    /// Focal length along x, pixels.
    pub fx: f64,
    /// Focal length along y, pixels.
    pub fy: f64,
    /// Principal point x, pixels.
    pub cx: f64,
    /// Principal point y, pixels.
    pub cy: f64,
    /// Image width, pixels.
    pub width: u32,
    /// Image height, pixels.
    pub height: u32,
}

impl Intrinsics {
    /// A camera with square pixels whose *vertical* field of view is `fov_y_deg`, principal point at the
    /// image centre (`(W-1)/2, (H-1)/2`, since pixel centres are integers).
    pub fn from_fov_y(fov_y_deg: f64, width: u32, height: u32) -> Result<Self> {
        if !(fov_y_deg.is_finite() && fov_y_deg > 0.0 && fov_y_deg < 180.0) {
            return Err(Error::InvalidInput(format!("field of view {fov_y_deg} deg is not in (0, 180)")));
        }
        if width == 0 || height == 0 {
            return Err(Error::InvalidInput(format!("image size {width}x{height} is empty")));
        }
        let f = 0.5 * height as f64 / (0.5 * fov_y_deg.to_radians()).tan();
        Ok(Self { fx: f, fy: f, cx: (width as f64 - 1.0) / 2.0, cy: (height as f64 - 1.0) / 2.0, width, height })
    }

    /// Intrinsics from a 3x3 matrix `[[fx,0,cx],[0,fy,cy],[0,0,1]]`; rejects NaN/inf and non-positive focals.
    pub fn from_matrix(k: &Matrix3<f64>, width: u32, height: u32) -> Result<Self> {
        if k.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput("intrinsics matrix has NaN or inf".into()));
        }
        let (fx, fy) = (k[(0, 0)], k[(1, 1)]);
        if fx <= 0.0 || fy <= 0.0 {
            return Err(Error::InvalidInput(format!("focal lengths must be positive, got fx={fx} fy={fy}")));
        }
        let structural = [k[(1, 0)], k[(2, 0)], k[(2, 1)], k[(2, 2)] - 1.0];
        if structural.iter().any(|v| v.abs() > 1e-9) {
            return Err(Error::InvalidInput(format!(
                "intrinsics matrix must have the form [[fx,s,cx],[0,fy,cy],[0,0,1]], got {:?}",
                k.transpose().as_slice()
            )));
        }
        let skew = k[(0, 1)];
        if skew.abs() > MAX_SKEW_RATIO * fx {
            return Err(Error::InvalidInput(format!(
                "intrinsics skew {skew} is beyond |skew| <= {MAX_SKEW_RATIO} fx = {:.4} (a pinhole without skew is assumed; \
                 undistort/resample the image to a skew-free camera first)",
                MAX_SKEW_RATIO * fx
            )));
        }
        if (fy / fx - 1.0).abs() > MAX_ASPECT_DEVIATION {
            return Err(Error::InvalidInput(format!(
                "focal lengths fx={fx} and fy={fy} differ by more than {:.0} % (square pixels are assumed; \
                 resample the image to square pixels first)",
                100.0 * MAX_ASPECT_DEVIATION
            )));
        }
        if width == 0 || height == 0 {
            return Err(Error::InvalidInput(format!("image size {width}x{height} is empty")));
        }
        Ok(Self { fx, fy, cx: k[(0, 2)], cy: k[(1, 2)], width, height })
    }

    /// The 3x3 matrix K.
    pub fn matrix(&self) -> Matrix3<f64> {
        Matrix3::new(self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0)
    }

    /// Full horizontal field of view, degrees: `2 atan(W / 2 fx)`.
    pub fn fov_x_deg(&self) -> f64 {
        2.0 * (self.width as f64 / (2.0 * self.fx)).atan().to_degrees()
    }

    /// Full vertical field of view, degrees: `2 atan(H / 2 fy)`.
    pub fn fov_y_deg(&self) -> f64 {
        2.0 * (self.height as f64 / (2.0 * self.fy)).atan().to_degrees()
    }

    /// Projects a point given in the camera frame to pixels; `None` behind the camera.
    pub fn project(&self, point_in_camera: &Point3<f64>) -> Option<Point2<f64>> {
        if point_in_camera.z <= 1e-12 {
            return None;
        }
        Some(Point2::new(
            self.fx * point_in_camera.x / point_in_camera.z + self.cx,
            self.fy * point_in_camera.y / point_in_camera.z + self.cy,
        ))
    }

    /// The viewing ray through a pixel, in the camera frame, scaled so that z = 1.
    pub fn ray_direction(&self, pixel: &Point2<f64>) -> Vector3<f64> {
        Vector3::new((pixel.x - self.cx) / self.fx, (pixel.y - self.cy) / self.fy, 1.0)
    }
}
