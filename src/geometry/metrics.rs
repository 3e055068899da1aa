//! Error metrics between rotations.

use nalgebra::Rotation3;

/// Geodesic angle between two rotations, degrees in `[0, 180]`: the rotation angle of `a^T b`.
///
/// Computed as `atan2(|vee(M - M^T)| / 2, (tr M - 1) / 2)` for `M = a^T b`, with the cosine clamped to
/// `[-1, 1]`; this equals the clamped `acos` of the trace formula but stays accurate near 0 and 180 degrees.
/// Finite inputs never give NaN.
pub fn rotation_error_deg(a: &Rotation3<f64>, b: &Rotation3<f64>) -> f64 {
    let m = a.matrix().transpose() * b.matrix();
    let cos = ((m.trace() - 1.0) * 0.5).clamp(-1.0, 1.0);
    let sin = 0.5 * ((m[(2, 1)] - m[(1, 2)]).powi(2) + (m[(0, 2)] - m[(2, 0)]).powi(2) + (m[(1, 0)] - m[(0, 1)]).powi(2)).sqrt();
    sin.atan2(cos).to_degrees()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Vector3;

    #[test]
    fn known_angles() {
        let id = Rotation3::identity();
        let z90 = Rotation3::from_axis_angle(&Vector3::z_axis(), std::f64::consts::FRAC_PI_2);
        assert!((rotation_error_deg(&id, &z90) - 90.0).abs() < 1e-12);
        assert!((rotation_error_deg(&z90, &id) - 90.0).abs() < 1e-12);
        assert_eq!(rotation_error_deg(&z90, &z90), 0.0);
        let a = Rotation3::from_scaled_axis(Vector3::new(0.3, -1.1, 0.4));
        assert!(rotation_error_deg(&a, &a).abs() < 1e-6);
        // Relative 37 deg turn about an arbitrary axis, composed on either side.
        let axis = nalgebra::Unit::new_normalize(Vector3::new(1.0, 2.0, 3.0));
        let rel = Rotation3::from_axis_angle(&axis, 37f64.to_radians());
        assert!((rotation_error_deg(&a, &(a * rel)) - 37.0).abs() < 1e-9);
        // Tiny angles are resolved (acos alone would lose them).
        let tiny = Rotation3::from_axis_angle(&Vector3::x_axis(), 1e-9);
        assert!((rotation_error_deg(&id, &tiny) - 1e-9f64.to_degrees()).abs() < 1e-15);
    }

    #[test]
    fn near_pi_is_finite() {
        let id = Rotation3::identity();
        for eps in [0.0, 1e-12, 1e-6] {
            let r = Rotation3::from_axis_angle(&Vector3::y_axis(), std::f64::consts::PI - eps);
            let e = rotation_error_deg(&id, &r);
            assert!(e.is_finite() && (e - 180.0).abs() < 1e-4, "eps {eps}: {e}");
        }
        // A slightly non-orthonormal input whose trace exceeds the valid range stays finite.
        let bumped = Rotation3::from_matrix_unchecked(id.matrix() * (1.0 + 1e-9));
        assert!(rotation_error_deg(&id, &bumped).is_finite());
    }
}
