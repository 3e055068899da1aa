//! Conversions between ROS messages and the library's types.

use nalgebra::{Isometry3, Quaternion, UnitQuaternion};
use r2r::builtin_interfaces::msg::Time;
use r2r::geometry_msgs::msg::{Point, Pose, PoseStamped, Quaternion as QuatMsg};
use r2r::sensor_msgs::msg::Image;
use r2r::std_msgs::msg::Header;

use crate::ingest::frames::RawImage;

/// Stamp as nanoseconds.
pub fn stamp_ns(t: &Time) -> i64 {
    t.sec as i64 * 1_000_000_000 + t.nanosec as i64
}

/// The raw bytes of an image message (every accepted encoding is 8-bit, so endianness does not matter).
pub fn raw_image(msg: &Image) -> RawImage {
    RawImage { width: msg.width, height: msg.height, encoding: msg.encoding.clone(), step: msg.step, data: msg.data.clone() }
}

/// A pose message from camera_from_object (already in canonical units).
pub fn pose_stamped(header: Header, camera_from_object: &Isometry3<f64>) -> PoseStamped {
    let t = camera_from_object.translation.vector;
    let q = camera_from_object.rotation;
    PoseStamped {
        header,
        pose: Pose { position: Point { x: t.x, y: t.y, z: t.z }, orientation: QuatMsg { x: q.i, y: q.j, z: q.k, w: q.w } },
    }
}

/// camera_from_object from a pose message (unit quaternion enforced).
pub fn isometry(pose: &Pose) -> Option<Isometry3<f64>> {
    let q = Quaternion::new(pose.orientation.w, pose.orientation.x, pose.orientation.y, pose.orientation.z);
    let p = &pose.position;
    let values = [q.w, q.i, q.j, q.k, p.x, p.y, p.z];
    if values.iter().any(|v| !v.is_finite()) || q.norm() < 1e-9 {
        return None;
    }
    Some(Isometry3::from_parts(nalgebra::Translation3::new(p.x, p.y, p.z), UnitQuaternion::from_quaternion(q)))
}

/// A 32FC3 image message of NOCS values (row-major `[x, y, z]` per pixel, NaN where empty).
pub fn nocs_image(header: Header, width: u32, height: u32, nocs: &[[f32; 3]], mask: &[bool]) -> Image {
    let mut data = Vec::with_capacity(nocs.len() * 12);
    for (n, m) in nocs.iter().zip(mask) {
        for v in n {
            let v = if *m { *v } else { f32::NAN };
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    Image { header, height, width, encoding: "32FC3".into(), is_bigendian: 0, step: width * 12, data }
}
