//! Rigid motions: SO(3)/SE(3) exponential and logarithm maps, orbit cameras and 4x4 matrix conversions.
//!
//! Twists are ordered rotation first: `xi = [omega_x, omega_y, omega_z, v_x, v_y, v_z]`. They are used
//! BARF-style as left corrections: `corrected_camera_from_object = se3_exp(xi) * camera_from_object`.

use nalgebra::{Isometry3, Matrix3, Point3, Quaternion, Rotation3, Translation3, UnitQuaternion, Vector3, Vector6};

use crate::error::{Error, Result};

/// Below this rotation angle (radians) the exp/log coefficients use Taylor series instead of closed forms.
const SMALL_ANGLE: f64 = 1e-2;

/// The skew-symmetric matrix `[v]_x` with `[v]_x w = v x w`.
pub fn skew(v: &Vector3<f64>) -> Matrix3<f64> {
    Matrix3::new(0.0, -v.z, v.y, v.z, 0.0, -v.x, -v.y, v.x, 0.0)
}

/// The rotation `exp([omega]_x)`: a turn of `|omega|` radians about `omega / |omega|`.
pub fn so3_exp(omega: &Vector3<f64>) -> Rotation3<f64> {
    let theta_sq = omega.norm_squared();
    let theta = theta_sq.sqrt();
    // q = (cos(theta/2), sin(theta/2)/theta * omega); sin(theta/2)/theta by series near zero.
    let (w, k) = if theta < SMALL_ANGLE {
        (1.0 - theta_sq / 8.0 + theta_sq * theta_sq / 384.0, 0.5 - theta_sq / 48.0 + theta_sq * theta_sq / 3840.0)
    } else {
        let half = 0.5 * theta;
        (half.cos(), half.sin() / theta)
    };
    let q = UnitQuaternion::new_normalize(Quaternion::new(w, k * omega.x, k * omega.y, k * omega.z));
    q.to_rotation_matrix()
}

/// The rotation vector `omega` (axis times angle, angle in `[0, pi]`) with `so3_exp(omega) == r`.
///
/// Goes through a unit quaternion, so it stays accurate near the identity and near half turns (where the
/// axis is not recoverable from the antisymmetric part of `r`). At exactly pi either of the two opposite
/// rotation vectors may be returned.
pub fn so3_log(r: &Rotation3<f64>) -> Vector3<f64> {
    let q = UnitQuaternion::from_rotation_matrix(r);
    let (w, v) = if q.w < 0.0 { (-q.w, -q.imag()) } else { (q.w, q.imag()) };
    let n = v.norm();
    // omega = 2 atan2(|v|, w) / |v| * v; for tiny |v| the factor tends to 2 / w.
    let factor = if n < 1e-8 { 2.0 / w * (1.0 - n * n / (3.0 * w * w)) } else { 2.0 * n.atan2(w) / n };
    v * factor
}

/// Coefficients `(a, b)` of the SO(3) left Jacobian `V = I + a [w]_x + b [w]_x^2`:
/// `a = (1 - cos t) / t^2`, `b = (t - sin t) / t^3`.
fn left_jacobian_coefficients(theta: f64) -> (f64, f64) {
    let t2 = theta * theta;
    if theta < SMALL_ANGLE {
        (0.5 - t2 / 24.0 + t2 * t2 / 720.0, 1.0 / 6.0 - t2 / 120.0 + t2 * t2 / 5040.0)
    } else {
        let half_sin = (0.5 * theta).sin();
        (2.0 * half_sin * half_sin / t2, (theta - theta.sin()) / (t2 * theta))
    }
}

/// The rigid motion `exp(xi^)` for the twist `xi = [omega; v]` (rotation first).
///
/// Rotation `R = so3_exp(omega)`, translation `t = V v` with the SO(3) left Jacobian
/// `V = I + (1 - cos t)/t^2 [w]_x + (t - sin t)/t^3 [w]_x^2`.
pub fn se3_exp(xi: &Vector6<f64>) -> Isometry3<f64> {
    let omega = Vector3::new(xi[0], xi[1], xi[2]);
    let v = Vector3::new(xi[3], xi[4], xi[5]);
    let rotation = so3_exp(&omega);
    let (a, b) = left_jacobian_coefficients(omega.norm());
    let w = skew(&omega);
    let jacobian = Matrix3::identity() + w * a + w * w * b;
    Isometry3::from_parts(Translation3::from(jacobian * v), UnitQuaternion::from_rotation_matrix(&rotation))
}

/// The twist `xi = [omega; v]` (rotation angle in `[0, pi]`) with `se3_exp(xi) == t`.
pub fn se3_log(t: &Isometry3<f64>) -> Vector6<f64> {
    let omega = so3_log(&t.rotation.to_rotation_matrix());
    let theta = omega.norm();
    let t2 = theta * theta;
    // V^-1 = I - 1/2 [w]_x + c [w]_x^2, c = (1 - theta sin(theta) / (2 (1 - cos theta))) / theta^2.
    let c = if theta < SMALL_ANGLE {
        1.0 / 12.0 + t2 / 720.0 + t2 * t2 / 30240.0
    } else {
        let half = 0.5 * theta;
        // theta sin(theta) / (2 (1 - cos theta)) = (theta / 2) cot(theta / 2).
        (1.0 - half * half.cos() / half.sin()) / t2
    };
    let w = skew(&omega);
    let jacobian_inv = Matrix3::identity() - w * 0.5 + w * w * c;
    let v = jacobian_inv * t.translation.vector;
    Vector6::new(omega.x, omega.y, omega.z, v.x, v.y, v.z)
}

/// An OpenCV camera (x right, y down, z forward) on a sphere of `radius` around the object origin, looking
/// at the origin with zero roll; returns `camera_from_object`.
///
/// Object frame: +y is up. Azimuth (degrees) turns about object +y: 0 puts the camera on the object's +z
/// side, 90 on its +x side. Elevation (degrees) is the angle of the camera centre above the object's x-z
/// plane, so the camera centre is `radius * (cos e sin a, sin e, cos e cos a)` and `e > 0` looks from above.
/// Object +y projects upward in the image (negative camera y). The camera x axis is always the horizontal
/// `(cos a, 0, -sin a)`; at elevation +-90 the camera y axis is the continuous limit
/// `(+-sin a, 0, +-cos a)`, so the pose stays finite and well defined there. `radius` should be positive and
/// finite (a negative radius places the camera behind its own view direction).
///
/// # Examples
///
/// ```
/// use congeal::geometry::se3::orbit_camera_from_object;
/// use nalgebra::{Point3, Vector3};
///
/// // A camera 2 units from the object, on its +z side and level with it.
/// let camera_from_object = orbit_camera_from_object(0.0, 0.0, 2.0);
/// // The object origin lies on the optical axis, 2 units ahead (OpenCV: +z forward).
/// let origin = camera_from_object * Point3::origin();
/// assert!((origin - Point3::new(0.0, 0.0, 2.0)).norm() < 1e-12);
/// // Object +y (up) points up in the image (negative camera y).
/// let up = camera_from_object * Vector3::y();
/// assert!((up - Vector3::new(0.0, -1.0, 0.0)).norm() < 1e-12);
/// ```
pub fn orbit_camera_from_object(azimuth_deg: f64, elevation_deg: f64, radius: f64) -> Isometry3<f64> {
    let (sin_a, cos_a) = azimuth_deg.to_radians().sin_cos();
    let (sin_e, cos_e) = elevation_deg.to_radians().sin_cos();
    let centre_in_object = Vector3::new(cos_e * sin_a, sin_e, cos_e * cos_a) * radius;
    // Camera axes expressed in the object frame (columns of object_from_camera).
    let right = Vector3::new(cos_a, 0.0, -sin_a);
    let down = Vector3::new(sin_e * sin_a, -cos_e, sin_e * cos_a);
    let forward = Vector3::new(-cos_e * sin_a, -sin_e, -cos_e * cos_a);
    let object_from_camera_rot = Rotation3::from_matrix_unchecked(Matrix3::from_columns(&[right, down, forward]));
    let camera_from_object_rot = object_from_camera_rot.inverse();
    let translation = -(camera_from_object_rot * centre_in_object);
    Isometry3::from_parts(Translation3::from(translation), UnitQuaternion::from_rotation_matrix(&camera_from_object_rot))
}

/// The camera centre expressed in the object frame: `-R^T t` for `camera_from_object = (R, t)`.
pub fn camera_centre(camera_from_object: &Isometry3<f64>) -> Point3<f64> {
    camera_from_object.inverse_transform_point(&Point3::origin())
}

/// A rigid transform from a row-major 4x4 matrix `[[R, t], [0, 0, 0, 1]]`.
///
/// Rejects NaN/inf, a last row other than `0 0 0 1`, and a rotation block that is not orthonormal within
/// 1e-3 (max abs entry of `R^T R - I`) or has a negative determinant. The accepted block is
/// re-orthonormalised to the nearest rotation (SVD).
pub fn isometry_from_row_major(m: &[[f64; 4]; 4]) -> Result<Isometry3<f64>> {
    if m.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::InvalidInput("4x4 pose matrix has NaN or inf".into()));
    }
    if m[3] != [0.0, 0.0, 0.0, 1.0] {
        return Err(Error::InvalidInput(format!("4x4 pose matrix last row is {:?}, expected [0, 0, 0, 1]", m[3])));
    }
    let r = Matrix3::new(m[0][0], m[0][1], m[0][2], m[1][0], m[1][1], m[1][2], m[2][0], m[2][1], m[2][2]);
    let orthonormality = (r.transpose() * r - Matrix3::identity()).amax();
    if orthonormality > 1e-3 {
        return Err(Error::InvalidInput(format!(
            "4x4 pose rotation block is not orthonormal (max |R^T R - I| = {orthonormality:.3e})"
        )));
    }
    let det = r.determinant();
    if det <= 0.0 {
        return Err(Error::InvalidInput(format!("4x4 pose rotation block has determinant {det:.6}, expected +1")));
    }
    let svd = r.svd(true, true);
    let (u, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => return Err(Error::Numerical("SVD of the pose rotation block failed".into())),
    };
    let rotation = Rotation3::from_matrix_unchecked(u * v_t);
    let translation = Vector3::new(m[0][3], m[1][3], m[2][3]);
    Ok(Isometry3::from_parts(Translation3::from(translation), UnitQuaternion::from_rotation_matrix(&rotation)))
}

/// The row-major 4x4 matrix `[[R, t], [0, 0, 0, 1]]` of a rigid transform.
pub fn isometry_to_row_major(t: &Isometry3<f64>) -> [[f64; 4]; 4] {
    let r = t.rotation.to_rotation_matrix();
    let r = r.matrix();
    let p = &t.translation.vector;
    [
        [r[(0, 0)], r[(0, 1)], r[(0, 2)], p.x],
        [r[(1, 0)], r[(1, 1)], r[(1, 2)], p.y],
        [r[(2, 0)], r[(2, 1)], r[(2, 2)], p.z],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Matrix4;
    use std::f64::consts::PI;

    use crate::test_util::Rng;

    /// exp of a square matrix by scaling and squaring with a 30-term Taylor series (independent reference).
    fn expm4(m: &Matrix4<f64>) -> Matrix4<f64> {
        let k = 10;
        let scaled = m / f64::powi(2.0, k);
        let mut sum = Matrix4::identity();
        let mut term = Matrix4::identity();
        for i in 1..30 {
            term = term * scaled / i as f64;
            sum += term;
        }
        for _ in 0..k {
            sum = sum * sum;
        }
        sum
    }

    fn hat(xi: &Vector6<f64>) -> Matrix4<f64> {
        let w = skew(&Vector3::new(xi[0], xi[1], xi[2]));
        let mut m = Matrix4::zeros();
        m.fixed_view_mut::<3, 3>(0, 0).copy_from(&w);
        m[(0, 3)] = xi[3];
        m[(1, 3)] = xi[4];
        m[(2, 3)] = xi[5];
        m
    }

    fn edge_twists() -> Vec<Vector6<f64>> {
        let axis = Vector3::new(0.3, -0.5, 0.8).normalize();
        let mut out = vec![Vector6::zeros(), Vector6::new(1e-12, -2e-12, 3e-13, 0.5, -0.2, 0.1)];
        for angle in [1e-9, 1e-5, 5e-3, 1e-2, 1.2e-2, 1.0, 3.0, PI - 1e-3, PI - 1e-6] {
            let w = axis * angle;
            out.push(Vector6::new(w.x, w.y, w.z, 0.7, -1.3, 0.4));
        }
        out
    }

    #[test]
    fn skew_is_cross_product() {
        let mut rng = Rng(1);
        for _ in 0..20 {
            let (a, b) = (rng.vec3(3.0), rng.vec3(3.0));
            assert!((skew(&a) * b - a.cross(&b)).norm() < 1e-12);
        }
    }

    #[test]
    fn so3_exp_matches_nalgebra_and_series() {
        let mut rng = Rng(2);
        let mut omegas: Vec<Vector3<f64>> = (0..200).map(|_| rng.vec3(1.8)).collect();
        omegas.extend([Vector3::zeros(), Vector3::new(1e-10, 0.0, 0.0), Vector3::new(0.0, 0.0, PI - 1e-9)]);
        for w in &omegas {
            let ours = so3_exp(w);
            let reference = Rotation3::from_scaled_axis(*w);
            assert!((ours.matrix() - reference.matrix()).amax() < 1e-12, "omega {w:?}");
            let mut m4 = Matrix4::zeros();
            m4.fixed_view_mut::<3, 3>(0, 0).copy_from(&skew(w));
            let series = expm4(&m4);
            assert!((ours.matrix() - series.fixed_view::<3, 3>(0, 0)).amax() < 1e-10);
        }
    }

    #[test]
    fn so3_log_round_trips_including_near_pi() {
        let mut rng = Rng(3);
        for _ in 0..500 {
            let dir = rng.vec3(1.0);
            if dir.norm() < 1e-3 {
                continue;
            }
            let angle = rng.uniform(0.0, PI - 1e-7);
            let w = dir.normalize() * angle;
            let back = so3_log(&so3_exp(&w));
            assert!((back - w).norm() < 1e-9 * (1.0 + angle), "omega {w:?} -> {back:?}");
        }
        for angle in [0.0, 1e-14, 1e-9, 1e-3, PI - 1e-4, PI - 1e-8] {
            let w = Vector3::new(-0.2, 0.9, 0.4).normalize() * angle;
            let back = so3_log(&Rotation3::from_scaled_axis(w));
            assert!((back - w).norm() < 1e-9, "angle {angle}: {back:?}");
        }
        // Exactly pi: either sign of the axis is fine, but the rotation must be reproduced.
        let w = Vector3::new(1.0, 2.0, -2.0).normalize() * PI;
        let r = Rotation3::from_scaled_axis(w);
        let back = so3_log(&r);
        assert!((back.norm() - PI).abs() < 1e-9);
        assert!((so3_exp(&back).matrix() - r.matrix()).amax() < 1e-9);
    }

    #[test]
    fn se3_exp_matches_matrix_exponential() {
        let mut rng = Rng(4);
        let mut twists = edge_twists();
        twists.extend((0..100).map(|_| {
            let (w, v) = (rng.vec3(1.8), rng.vec3(2.0));
            Vector6::new(w.x, w.y, w.z, v.x, v.y, v.z)
        }));
        for xi in &twists {
            let ours = se3_exp(xi).to_homogeneous();
            let reference = expm4(&hat(xi));
            assert!((ours - reference).amax() < 1e-9, "xi {xi:?}");
        }
    }

    #[test]
    fn se3_exp_matches_first_order_composition() {
        // (I + xi^/n)^n -> exp(xi^): compose 2^20 first-order steps by repeated squaring.
        let mut rng = Rng(5);
        for _ in 0..10 {
            let (w, v) = (rng.vec3(1.5), rng.vec3(2.0));
            let xi = Vector6::new(w.x, w.y, w.z, v.x, v.y, v.z);
            let k = 20;
            let n = f64::powi(2.0, k);
            let mut step = Isometry3::from_parts(Translation3::from(v / n), UnitQuaternion::from_scaled_axis(w / n));
            for _ in 0..k {
                step = step * step;
            }
            let ours = se3_exp(&xi);
            assert!((ours.translation.vector - step.translation.vector).norm() < 1e-5, "xi {xi:?}");
            assert!(ours.rotation.angle_to(&step.rotation) < 1e-8);
            // The translation is not simply v unless omega = 0 (guards against V = I).
            assert!((ours.translation.vector - v).norm() > 1e-3);
        }
    }

    #[test]
    fn se3_log_round_trips() {
        let mut rng = Rng(6);
        let mut twists = edge_twists();
        twists.extend((0..300).map(|_| {
            let dir = rng.vec3(1.0).normalize();
            let w = dir * rng.uniform(0.0, PI - 1e-6);
            let v = rng.vec3(3.0);
            Vector6::new(w.x, w.y, w.z, v.x, v.y, v.z)
        }));
        for xi in &twists {
            let back = se3_log(&se3_exp(xi));
            assert!((back - xi).norm() < 1e-8 * (1.0 + xi.norm()), "xi {xi:?} -> {back:?}");
        }
        // And isometry -> log -> exp reproduces the isometry.
        for _ in 0..100 {
            let t = Isometry3::from_parts(Translation3::from(rng.vec3(5.0)), UnitQuaternion::from_scaled_axis(rng.vec3(1.8)));
            let again = se3_exp(&se3_log(&t));
            assert!((again.to_homogeneous() - t.to_homogeneous()).amax() < 1e-9);
        }
    }

    #[test]
    fn orbit_camera_looks_at_origin_with_correct_placement() {
        let mut rng = Rng(7);
        for _ in 0..100 {
            let (az, el, radius) = (rng.uniform(-360.0, 360.0), rng.uniform(-89.0, 89.0), rng.uniform(0.5, 5.0));
            let camera_from_object = orbit_camera_from_object(az, el, radius);
            let origin_in_camera = camera_from_object * Point3::origin();
            assert!(origin_in_camera.x.abs() < 1e-12 && origin_in_camera.y.abs() < 1e-12);
            assert!((origin_in_camera.z - radius).abs() < 1e-12);
            let centre = camera_centre(&camera_from_object);
            assert!((centre.coords.norm() - radius).abs() < 1e-12);
            assert!((centre.y - radius * el.to_radians().sin()).abs() < 1e-12);
            // Object +y (a point above the origin) appears above the image centre: negative camera y.
            let above_in_camera = camera_from_object * Point3::new(0.0, 0.1, 0.0);
            assert!(above_in_camera.y < 0.0);
            // Zero roll: the camera x axis stays horizontal in the object frame.
            let right_in_object = camera_from_object.rotation.inverse() * Vector3::x();
            assert!(right_in_object.y.abs() < 1e-12);
            assert!((camera_from_object.rotation.to_rotation_matrix().matrix().determinant() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn orbit_camera_special_positions() {
        let at_front = camera_centre(&orbit_camera_from_object(0.0, 0.0, 2.0));
        assert!((at_front - Point3::new(0.0, 0.0, 2.0)).norm() < 1e-12);
        let at_side = camera_centre(&orbit_camera_from_object(90.0, 0.0, 2.0));
        assert!((at_side - Point3::new(2.0, 0.0, 0.0)).norm() < 1e-12);
        let up30 = camera_centre(&orbit_camera_from_object(40.0, 30.0, 3.0));
        assert!((up30.y - 1.5).abs() < 1e-12);
        // Seen from the front, object +x is image right (positive camera x).
        let front = orbit_camera_from_object(0.0, 0.0, 2.0);
        assert!((front * Point3::new(0.1, 0.0, 0.0)).x > 0.0);
        // Poles: finite, looking at the origin, centre on the y axis.
        for el in [90.0, -90.0] {
            let pose = orbit_camera_from_object(30.0, el, 2.0);
            assert!(pose.to_homogeneous().iter().all(|v| v.is_finite()));
            let origin_in_camera = pose * Point3::origin();
            assert!(origin_in_camera.x.abs() < 1e-12 && origin_in_camera.y.abs() < 1e-12);
            assert!((origin_in_camera.z - 2.0).abs() < 1e-12);
            assert!((camera_centre(&pose).y - 2.0 * f64::signum(el)).abs() < 1e-12);
        }
        // The pole pose is the limit of nearby poses.
        let pole = orbit_camera_from_object(30.0, 90.0, 2.0);
        let near = orbit_camera_from_object(30.0, 90.0 - 1e-6, 2.0);
        assert!((pole.to_homogeneous() - near.to_homogeneous()).amax() < 1e-6);
    }

    #[test]
    fn row_major_round_trip_and_validation() {
        let mut rng = Rng(8);
        for _ in 0..50 {
            let t = Isometry3::from_parts(Translation3::from(rng.vec3(5.0)), UnitQuaternion::from_scaled_axis(rng.vec3(1.8)));
            let m = isometry_to_row_major(&t);
            let h = t.to_homogeneous();
            for (i, row) in m.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    assert_eq!(*v, h[(i, j)]);
                }
            }
            let back = isometry_from_row_major(&m).unwrap();
            assert!((back.to_homogeneous() - h).amax() < 1e-12);
        }
        let good = isometry_to_row_major(&orbit_camera_from_object(20.0, 10.0, 2.0));
        // Slightly perturbed rotation is accepted and re-orthonormalised.
        let mut perturbed = good;
        perturbed[0][1] += 2e-4;
        let fixed = isometry_from_row_major(&perturbed).unwrap();
        let r = fixed.rotation.to_rotation_matrix();
        assert!((r.matrix().transpose() * r.matrix() - Matrix3::identity()).amax() < 1e-12);
        assert!((r.matrix()[(0, 1)] - good[0][1]).abs() < 1e-3);
        // Rejections.
        let mut bad = good;
        bad[0][1] += 0.05;
        assert!(isometry_from_row_major(&bad).is_err());
        let mut reflected = good;
        for row in reflected.iter_mut().take(3) {
            row[0] = -row[0];
        }
        assert!(isometry_from_row_major(&reflected).is_err());
        let mut last_row = good;
        last_row[3][0] = 0.1;
        assert!(isometry_from_row_major(&last_row).is_err());
        let mut nan = good;
        nan[1][3] = f64::NAN;
        assert!(isometry_from_row_major(&nan).is_err());
        let mut inf = good;
        inf[2][2] = f64::INFINITY;
        assert!(isometry_from_row_major(&inf).is_err());
    }
}
