//! Similarity transforms (scale, rotation, translation), Umeyama alignment and camera-trajectory alignment.

use nalgebra::{Isometry3, Matrix3, Point3, Rotation3, Vector3};
use serde::{Deserialize, Serialize};

use super::metrics::rotation_error_deg;
use super::se3::camera_centre;
use crate::error::{Error, Result};

/// A similarity transform `p -> scale * rotation * p + translation`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sim3 {
    /// Uniform scale factor (positive for a proper similarity).
    pub scale: f64,
    /// Rotation applied after scaling.
    pub rotation: Rotation3<f64>,
    /// Translation applied last.
    pub translation: Vector3<f64>,
}

impl Sim3 {
    /// The identity similarity (scale 1, no rotation, no translation).
    pub fn identity() -> Self {
        Self { scale: 1.0, rotation: Rotation3::identity(), translation: Vector3::zeros() }
    }

    /// Applies the similarity to a point: `s R p + t`.
    pub fn transform_point(&self, p: &Point3<f64>) -> Point3<f64> {
        Point3::from(self.rotation * p.coords * self.scale + self.translation)
    }

    /// The inverse similarity `p -> R^T (p - t) / s` (scale must be non-zero).
    pub fn inverse(&self) -> Sim3 {
        let rotation = self.rotation.inverse();
        let scale = 1.0 / self.scale;
        Sim3 { scale, rotation, translation: -(rotation * self.translation) * scale }
    }
}

impl Default for Sim3 {
    fn default() -> Self {
        Self::identity()
    }
}

/// Least-squares similarity with `target[i] ~= s R source[i] + t` (Umeyama 1991, reflection-corrected so
/// that `det R = +1`). With `with_scale == false`, `s = 1` (rigid alignment, Kabsch).
///
/// Errors (`Error::InvalidInput`): length mismatch, fewer than 3 points, NaN/inf coordinates, or a
/// degenerate set (all source points, or all target points, equal). Collinear sets are accepted but leave
/// the rotation about their line undetermined (one least-squares minimiser is returned).
pub fn umeyama(source: &[Point3<f64>], target: &[Point3<f64>], with_scale: bool) -> Result<Sim3> {
    if source.len() != target.len() {
        return Err(Error::InvalidInput(format!("umeyama: {} source points but {} target points", source.len(), target.len())));
    }
    if source.len() < 3 {
        return Err(Error::InvalidInput(format!("umeyama: need at least 3 point pairs, got {}", source.len())));
    }
    if source.iter().chain(target).any(|p| p.iter().any(|v| !v.is_finite())) {
        return Err(Error::InvalidInput("umeyama: points contain NaN or inf".into()));
    }
    let n = source.len() as f64;
    let mean_source = source.iter().fold(Vector3::zeros(), |acc, p| acc + p.coords) / n;
    let mean_target = target.iter().fold(Vector3::zeros(), |acc, p| acc + p.coords) / n;
    let mut variance_source = 0.0;
    let mut variance_target = 0.0;
    let mut covariance = Matrix3::zeros(); // (1/n) sum (target - mean) (source - mean)^T
    for (s, t) in source.iter().zip(target) {
        let (ds, dt) = (s.coords - mean_source, t.coords - mean_target);
        variance_source += ds.norm_squared();
        variance_target += dt.norm_squared();
        covariance += dt * ds.transpose();
    }
    variance_source /= n;
    variance_target /= n;
    covariance /= n;
    let is_degenerate = |variance: f64, points: &[Point3<f64>]| {
        let magnitude = points.iter().map(|p| p.coords.amax()).fold(0.0, f64::max);
        variance.sqrt() <= 1e-12 * magnitude || variance == 0.0
    };
    if is_degenerate(variance_source, source) {
        return Err(Error::InvalidInput("umeyama: all source points coincide".into()));
    }
    if is_degenerate(variance_target, target) {
        return Err(Error::InvalidInput("umeyama: all target points coincide".into()));
    }
    let svd = covariance.svd(true, true);
    let (u, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => return Err(Error::Numerical("umeyama: SVD of the covariance failed".into())),
    };
    // Singular values from nalgebra are non-negative but not necessarily sorted: flip the smallest one.
    let mut sign_fix = Vector3::new(1.0, 1.0, 1.0);
    if u.determinant() * v_t.determinant() < 0.0 {
        sign_fix[svd.singular_values.imin()] = -1.0;
    }
    let rotation_matrix = u * Matrix3::from_diagonal(&sign_fix) * v_t;
    let scale = if with_scale { svd.singular_values.dot(&sign_fix) / variance_source } else { 1.0 };
    if !(scale.is_finite() && rotation_matrix.iter().all(|v| v.is_finite())) {
        return Err(Error::Numerical("umeyama: non-finite result".into()));
    }
    let rotation = Rotation3::from_matrix_unchecked(rotation_matrix);
    let translation = mean_target - rotation * mean_source * scale;
    Ok(Sim3 { scale, rotation, translation })
}

/// Aligns a predicted camera trajectory to the ground truth: returns `gt_object_from_pred_object`, the
/// similarity that maps the predicted camera centres (expressed in the predicted object frame) onto the
/// ground-truth camera centres (in the ground-truth object frame), by Umeyama with scale.
///
/// Predicted and ground-truth object frames differ by an unknown similarity (canonical shape frames are
/// arbitrary up to pose and scale), so this is the standard gauge fix before comparing poses. Only the
/// camera centres enter the fit, so at least 3 non-coincident cameras are needed; the orientation of a
/// collinear camera set is underdetermined. An aligned predicted pose is then
/// `R_pred * S.R^T` with centre `S(c_pred)`.
pub fn align_camera_poses(pred_camera_from_object: &[Isometry3<f64>], gt_camera_from_object: &[Isometry3<f64>]) -> Result<Sim3> {
    if pred_camera_from_object.len() != gt_camera_from_object.len() {
        return Err(Error::InvalidInput(format!(
            "align_camera_poses: {} predicted poses but {} ground-truth poses",
            pred_camera_from_object.len(),
            gt_camera_from_object.len()
        )));
    }
    let pred_centres: Vec<Point3<f64>> = pred_camera_from_object.iter().map(camera_centre).collect();
    let gt_centres: Vec<Point3<f64>> = gt_camera_from_object.iter().map(camera_centre).collect();
    umeyama(&pred_centres, &gt_centres, true)
}

/// Robust `gt_object_from_pred_object` for pose evaluation when some predictions are gross
/// outliers (e.g. a symmetric object's front/back flips), which would drag a least-squares fit.
///
/// Every image implies a rotation `R_gt_i^T R_pred_i`; the one with the most images within
/// `inlier_deg` is refined by the chordal mean of its inliers; scale and translation then fit the
/// inliers' camera centres by least squares with that rotation fixed.
pub fn align_camera_poses_robust(
    pred_camera_from_object: &[Isometry3<f64>],
    gt_camera_from_object: &[Isometry3<f64>],
    inlier_deg: f64,
) -> Result<Sim3> {
    let n = pred_camera_from_object.len();
    if n != gt_camera_from_object.len() || n == 0 {
        return Err(Error::InvalidInput(format!(
            "align_camera_poses_robust: {n} predicted poses but {} ground-truth poses",
            gt_camera_from_object.len()
        )));
    }
    let implied: Vec<Rotation3<f64>> = pred_camera_from_object
        .iter()
        .zip(gt_camera_from_object)
        .map(|(p, g)| g.rotation.to_rotation_matrix().inverse() * p.rotation.to_rotation_matrix())
        .collect();
    let inliers_of =
        |r: &Rotation3<f64>| -> Vec<usize> { (0..n).filter(|&j| rotation_error_deg(&implied[j], r) < inlier_deg).collect() };
    let best = implied.iter().map(&inliers_of).max_by_key(Vec::len).ok_or_else(|| Error::InvalidInput("no poses".into()))?;
    // Chordal mean of the inlier rotations: project the summed matrices onto SO(3).
    let sum: Matrix3<f64> = best.iter().map(|&j| *implied[j].matrix()).sum();
    let svd = sum.svd(true, true);
    let (u, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => return Err(Error::Numerical("SVD failed in rotation averaging".into())),
    };
    let mut d = Matrix3::identity();
    if (u * v_t).determinant() < 0.0 {
        d[(2, 2)] = -1.0;
    }
    let rotation = Rotation3::from_matrix(&(u * d * v_t));
    let inliers = inliers_of(&rotation);
    let inliers = if inliers.len() >= best.len() { inliers } else { best };
    let pc: Vec<Point3<f64>> = inliers.iter().map(|&j| rotation * camera_centre(&pred_camera_from_object[j])).collect();
    let gc: Vec<Point3<f64>> = inliers.iter().map(|&j| camera_centre(&gt_camera_from_object[j])).collect();
    let m = inliers.len() as f64;
    let mean_p = pc.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / m;
    let mean_g = gc.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / m;
    let (mut num, mut den) = (0.0, 0.0);
    for (p, g) in pc.iter().zip(&gc) {
        num += (p.coords - mean_p).dot(&(g.coords - mean_g));
        den += (p.coords - mean_p).norm_squared();
    }
    let scale = if den > 1e-18 && num > 0.0 {
        num / den
    } else {
        // All inlier centres coincide: match the mean distance to the origin instead.
        let np: f64 = pc.iter().map(|p| p.coords.norm()).sum::<f64>();
        let ng: f64 = gc.iter().map(|p| p.coords.norm()).sum::<f64>();
        if np > 1e-18 {
            ng / np
        } else {
            1.0
        }
    };
    Ok(Sim3 { scale, rotation, translation: mean_g - scale * mean_p })
}

#[cfg(test)]
mod tests {
    #[test]
    fn robust_alignment_ignores_flipped_outliers() {
        let truth = Sim3 {
            scale: 1.7,
            rotation: Rotation3::from_euler_angles(0.3, -0.5, 1.1),
            translation: Vector3::new(0.2, -0.1, 0.4),
        };
        let mut pred = Vec::new();
        let mut gt = Vec::new();
        for i in 0..20 {
            let az = i as f64 * 0.7;
            let g = crate::geometry::se3::orbit_camera_from_object(az.to_degrees(), 10.0 + i as f64, 3.0);
            // pred camera in the pred object frame: x_gt = S x_pred => camera_from_pred = camera_from_gt * S (scaled)
            let c_gt = camera_centre(&g);
            let c_pred = truth.inverse().transform_point(&c_gt);
            let r_pred = g.rotation.to_rotation_matrix() * truth.rotation;
            let mut r_pred_q = nalgebra::UnitQuaternion::from_rotation_matrix(&r_pred);
            if i % 3 == 0 {
                // A front/back flip about the object's vertical axis.
                r_pred_q *= nalgebra::UnitQuaternion::from_axis_angle(&Vector3::y_axis(), std::f64::consts::PI);
            }
            let t_pred = -(r_pred_q * c_pred.coords);
            pred.push(Isometry3::from_parts(t_pred.into(), r_pred_q));
            gt.push(g);
        }
        let s = align_camera_poses_robust(&pred, &gt, 15.0).unwrap();
        assert!(rotation_error_deg(&s.rotation, &truth.rotation) < 1e-6, "rotation {:?}", s.rotation);
        assert!((s.scale - truth.scale).abs() < 1e-6 * truth.scale, "scale {}", s.scale);
        assert!((s.translation - truth.translation).norm() < 1e-6, "translation {:?}", s.translation);
    }

    use super::*;
    use nalgebra::{Translation3, UnitQuaternion};

    use crate::test_util::Rng;

    fn random_sim3(rng: &mut Rng) -> Sim3 {
        Sim3 { scale: rng.uniform(0.2, 5.0), rotation: Rotation3::from_scaled_axis(rng.vec3(1.8)), translation: rng.vec3(10.0) }
    }

    fn rotation_gap(a: &Rotation3<f64>, b: &Rotation3<f64>) -> f64 {
        (a.matrix() - b.matrix()).amax()
    }

    #[test]
    fn inverse_and_transform_are_consistent() {
        let mut rng = Rng(11);
        for _ in 0..20 {
            let s = random_sim3(&mut rng);
            let p = Point3::from(rng.vec3(3.0));
            let q = s.transform_point(&p);
            let expected = Point3::from(s.rotation.matrix() * p.coords * s.scale + s.translation);
            assert!((q - expected).norm() < 1e-12);
            assert!((s.inverse().transform_point(&q) - p).norm() < 1e-9);
        }
        let p = Point3::new(1.0, -2.0, 3.0);
        assert_eq!(Sim3::identity().transform_point(&p), p);
    }

    #[test]
    fn umeyama_recovers_known_similarity_exactly() {
        let mut rng = Rng(12);
        for trial in 0..50 {
            let truth = random_sim3(&mut rng);
            let n = 3 + trial % 20;
            let source: Vec<Point3<f64>> = (0..n).map(|_| Point3::from(rng.vec3(2.0))).collect();
            let target: Vec<Point3<f64>> = source.iter().map(|p| truth.transform_point(p)).collect();
            let fit = umeyama(&source, &target, true).unwrap();
            assert!((fit.scale - truth.scale).abs() < 1e-9, "trial {trial}");
            assert!(rotation_gap(&fit.rotation, &truth.rotation) < 1e-9);
            assert!((fit.translation - truth.translation).norm() < 1e-9);
            assert!((fit.rotation.matrix().determinant() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn umeyama_rigid_and_coplanar_and_reflection() {
        let mut rng = Rng(13);
        // Rigid: scale fixed to 1.
        let mut truth = random_sim3(&mut rng);
        truth.scale = 1.0;
        let source: Vec<Point3<f64>> = (0..10).map(|_| Point3::from(rng.vec3(2.0))).collect();
        let target: Vec<Point3<f64>> = source.iter().map(|p| truth.transform_point(p)).collect();
        let fit = umeyama(&source, &target, false).unwrap();
        assert_eq!(fit.scale, 1.0);
        assert!(rotation_gap(&fit.rotation, &truth.rotation) < 1e-9);
        // Coplanar points (rank-2 covariance), e.g. cameras on a ring: still exact.
        let truth = random_sim3(&mut rng);
        let ring: Vec<Point3<f64>> = (0..8)
            .map(|i| {
                let a = i as f64 * 0.7;
                Point3::new(a.cos() * 2.0, 0.5, a.sin() * 2.0)
            })
            .collect();
        let target: Vec<Point3<f64>> = ring.iter().map(|p| truth.transform_point(p)).collect();
        let fit = umeyama(&ring, &target, true).unwrap();
        assert!(rotation_gap(&fit.rotation, &truth.rotation) < 1e-9);
        assert!((fit.scale - truth.scale).abs() < 1e-9);
        // A mirrored target cannot be matched by a rotation: the result must stay a proper rotation.
        let source: Vec<Point3<f64>> = (0..10).map(|_| Point3::from(rng.vec3(2.0))).collect();
        let mirrored: Vec<Point3<f64>> = source.iter().map(|p| Point3::new(-p.x, p.y, p.z)).collect();
        let fit = umeyama(&source, &mirrored, true).unwrap();
        assert!((fit.rotation.matrix().determinant() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn umeyama_with_small_noise_is_close() {
        let mut rng = Rng(14);
        let truth = random_sim3(&mut rng);
        let source: Vec<Point3<f64>> = (0..200).map(|_| Point3::from(rng.vec3(2.0))).collect();
        let target: Vec<Point3<f64>> = source.iter().map(|p| truth.transform_point(p) + rng.vec3(1e-3)).collect();
        let fit = umeyama(&source, &target, true).unwrap();
        assert!((fit.scale - truth.scale).abs() / truth.scale < 1e-3);
        assert!(rotation_gap(&fit.rotation, &truth.rotation) < 1e-3);
        assert!((fit.translation - truth.translation).norm() < 1e-2);
        // Sanity: the fit is not trivially exact with noise.
        assert!((fit.scale - truth.scale).abs() > 0.0);
    }

    #[test]
    fn umeyama_rejects_bad_input() {
        let pts = vec![Point3::new(0.0, 0.0, 0.0), Point3::new(1.0, 0.0, 0.0), Point3::new(0.0, 1.0, 0.0)];
        assert!(umeyama(&pts, &pts[..2], true).is_err());
        assert!(umeyama(&pts[..2], &pts[..2], true).is_err());
        let same = vec![Point3::new(1.0, 2.0, 3.0); 5];
        let spread: Vec<Point3<f64>> = (0..5).map(|i| Point3::new(i as f64, (i * i) as f64, 1.0)).collect();
        assert!(matches!(umeyama(&same, &spread, true), Err(Error::InvalidInput(_))));
        assert!(matches!(umeyama(&spread, &same, true), Err(Error::InvalidInput(_))));
        let mut nan = pts.clone();
        nan[1].y = f64::NAN;
        assert!(umeyama(&nan, &pts, true).is_err());
        assert!(umeyama(&pts, &nan, false).is_err());
        assert!(umeyama(&pts, &pts, true).is_ok());
    }

    #[test]
    fn align_camera_poses_recovers_similarity() {
        let mut rng = Rng(15);
        let gt_from_pred = random_sim3(&mut rng);
        let pred: Vec<Isometry3<f64>> = (0..12)
            .map(|_| Isometry3::from_parts(Translation3::from(rng.vec3(3.0)), UnitQuaternion::from_scaled_axis(rng.vec3(1.8))))
            .collect();
        // camera_from_gt = camera_from_pred * pred_from_gt, with the gt world rescaled.
        let gt: Vec<Isometry3<f64>> = pred
            .iter()
            .map(|p| {
                let rotation = p.rotation.to_rotation_matrix() * gt_from_pred.rotation.inverse();
                let centre = gt_from_pred.transform_point(&camera_centre(p));
                let rotation = UnitQuaternion::from_rotation_matrix(&rotation);
                Isometry3::from_parts(Translation3::from(-(rotation * centre.coords)), rotation)
            })
            .collect();
        let fit = align_camera_poses(&pred, &gt).unwrap();
        assert!((fit.scale - gt_from_pred.scale).abs() < 1e-9);
        assert!(rotation_gap(&fit.rotation, &gt_from_pred.rotation) < 1e-9);
        assert!((fit.translation - gt_from_pred.translation).norm() < 1e-8);
        assert!(align_camera_poses(&pred, &gt[..5]).is_err());
        assert!(align_camera_poses(&pred[..2], &gt[..2]).is_err());
    }
}
