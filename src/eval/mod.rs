//! Pose evaluation (NAVI protocol, paper Sec. 4.1): rotation and translation errors of predicted camera
//! poses against ground truth, with and without similarity alignment, plus the NOCS map error.
//!
//! The canonical (predicted) object frame is arbitrary up to a similarity, so the headline numbers are the
//! *aligned* ones: the predicted object frame is mapped onto the ground-truth one by a similarity
//! ([`align_camera_poses_robust`]: the rotation most images agree on, then scale and translation of the
//! camera centres by least squares over those images) before comparing, so a few flipped images do not
//! drag the alignment of the rest. Translation errors are *relative*: the distance between
//! camera centres divided by the ground-truth camera's distance to the object origin (unitless).

pub mod masks;
pub mod orbit;
pub mod pairs;
pub mod report;

use nalgebra::{Isometry3, Rotation3};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::metrics::rotation_error_deg;
use crate::geometry::se3::camera_centre;
use crate::geometry::sim3::{align_camera_poses_robust, Sim3};

/// Images whose implied alignment rotation agrees within this angle vote together.
pub const ALIGNMENT_INLIER_DEG: f64 = 15.0;

/// Summary statistics of a set of non-negative errors.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorStats {
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Largest value.
    pub max: f64,
    /// Fraction of values strictly below 15 (meaningful for rotation errors in degrees).
    pub frac_below_15deg: f64,
    /// Fraction of values strictly below 30 (meaningful for rotation errors in degrees).
    pub frac_below_30deg: f64,
}

/// Median, mean, max and the fractions below 15 and 30 of `values`; errors on an empty slice or NaN/inf.
pub fn error_stats(values: &[f64]) -> Result<ErrorStats> {
    if values.is_empty() {
        return Err(Error::InvalidInput("error_stats: no values".into()));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidInput("error_stats: values contain NaN or inf".into()));
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) };
    let fraction_below = |threshold: f64| sorted.iter().filter(|&&v| v < threshold).count() as f64 / n as f64;
    Ok(ErrorStats {
        median,
        mean: sorted.iter().sum::<f64>() / n as f64,
        max: sorted[n - 1],
        frac_below_15deg: fraction_below(15.0),
        frac_below_30deg: fraction_below(30.0),
    })
}

/// A similarity transform in report form.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SimilarityReport {
    /// Scale factor.
    pub scale: f64,
    /// Rotation angle, degrees.
    pub rotation_deg: f64,
    /// Translation vector.
    pub translation: [f64; 3],
}

impl From<&Sim3> for SimilarityReport {
    fn from(s: &Sim3) -> Self {
        Self {
            scale: s.scale,
            rotation_deg: s.rotation.angle().to_degrees(),
            translation: [s.translation.x, s.translation.y, s.translation.z],
        }
    }
}

/// Pose errors of a set of predicted cameras against ground truth.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PoseEvaluation {
    /// Number of images evaluated.
    pub n_images: usize,
    /// Rotation errors (degrees) after similarity alignment.
    pub rotation_deg_aligned: ErrorStats,
    /// Relative camera-centre errors (unitless, / gt camera distance) after similarity alignment.
    pub translation_aligned: ErrorStats,
    /// Rotation errors (degrees) of the raw predicted poses.
    pub rotation_deg_unaligned: ErrorStats,
    /// Relative translation errors `|t_pred - t_gt| / |t_gt|` of the raw predicted poses.
    pub translation_unaligned: ErrorStats,
    /// Per-image aligned rotation errors, degrees, in input order.
    pub per_image_rotation_deg_aligned: Vec<f64>,
    /// Per-image unaligned rotation errors, degrees, in input order.
    pub per_image_rotation_deg_unaligned: Vec<f64>,
    /// The alignment `gt_object_from_pred_object` that was applied.
    pub alignment: SimilarityReport,
}

/// Evaluates predicted `camera_from_object` poses against ground truth (same order, same images).
///
/// Aligned: `S = align_camera_poses_robust(pred, gt, 15 deg)` maps the predicted object frame to the ground-truth one; the
/// aligned rotation of image i is `R_pred_i * S.R^T`, compared with `R_gt_i` by geodesic angle, and the
/// aligned camera centre `S(c_pred_i)` is compared with `c_gt_i`, the distance divided by `|c_gt_i|`
/// (relative, unitless). Unaligned: `angle(R_pred_i, R_gt_i)` and `|t_pred_i - t_gt_i| / |t_gt_i|`.
///
/// Errors: length mismatch, fewer than 3 images, NaN/inf poses, a ground-truth camera at the object origin,
/// or degenerate camera centres.
///
/// # Examples
///
/// ```
/// use congeal::eval::evaluate_poses;
/// use congeal::geometry::se3::orbit_camera_from_object;
///
/// let gt: Vec<_> = (0..6).map(|i| orbit_camera_from_object(60.0 * i as f64, 20.0, 3.0)).collect();
/// // The same cameras in a predicted object frame of half the scale: only the alignment sees through it.
/// let pred: Vec<_> = gt
///     .iter()
///     .map(|p| {
///         let mut q = *p;
///         q.translation.vector *= 0.5;
///         q
///     })
///     .collect();
/// let eval = evaluate_poses(&pred, &gt)?;
/// assert!(eval.rotation_deg_aligned.median < 1e-6 && eval.translation_aligned.median < 1e-6);
/// assert!((eval.translation_unaligned.median - 0.5).abs() < 1e-9);
/// # Ok::<(), congeal::Error>(())
/// ```
pub fn evaluate_poses(pred: &[Isometry3<f64>], gt: &[Isometry3<f64>]) -> Result<PoseEvaluation> {
    if pred.len() != gt.len() {
        return Err(Error::InvalidInput(format!(
            "evaluate_poses: {} predicted poses but {} ground-truth poses",
            pred.len(),
            gt.len()
        )));
    }
    if pred.len() < 3 {
        return Err(Error::InvalidInput(format!("evaluate_poses: need at least 3 images, got {}", pred.len())));
    }
    let finite = |t: &Isometry3<f64>| t.translation.vector.iter().chain(t.rotation.coords.iter()).all(|v| v.is_finite());
    if !pred.iter().chain(gt).all(finite) {
        return Err(Error::InvalidInput("evaluate_poses: poses contain NaN or inf".into()));
    }
    if let Some(i) = gt.iter().position(|t| t.translation.vector.norm() <= 1e-12) {
        return Err(Error::InvalidInput(format!(
            "evaluate_poses: ground-truth camera {i} sits at the object origin (relative translation undefined)"
        )));
    }
    let gt_object_from_pred_object = align_camera_poses_robust(pred, gt, ALIGNMENT_INLIER_DEG)?;
    let align_rotation_inv = gt_object_from_pred_object.rotation.inverse();

    let n = pred.len();
    let mut rot_aligned = Vec::with_capacity(n);
    let mut trans_aligned = Vec::with_capacity(n);
    let mut rot_unaligned = Vec::with_capacity(n);
    let mut trans_unaligned = Vec::with_capacity(n);
    for (p, g) in pred.iter().zip(gt) {
        let r_pred: Rotation3<f64> = p.rotation.to_rotation_matrix();
        let r_gt: Rotation3<f64> = g.rotation.to_rotation_matrix();
        let gt_distance = g.translation.vector.norm(); // == |c_gt| for a rigid pose
        let camera_from_gt_object_rot = r_pred * align_rotation_inv;
        rot_aligned.push(rotation_error_deg(&camera_from_gt_object_rot, &r_gt));
        let aligned_centre = gt_object_from_pred_object.transform_point(&camera_centre(p));
        trans_aligned.push((aligned_centre - camera_centre(g)).norm() / gt_distance);
        rot_unaligned.push(rotation_error_deg(&r_pred, &r_gt));
        trans_unaligned.push((p.translation.vector - g.translation.vector).norm() / gt_distance);
    }
    Ok(PoseEvaluation {
        n_images: n,
        rotation_deg_aligned: error_stats(&rot_aligned)?,
        translation_aligned: error_stats(&trans_aligned)?,
        rotation_deg_unaligned: error_stats(&rot_unaligned)?,
        translation_unaligned: error_stats(&trans_unaligned)?,
        per_image_rotation_deg_aligned: rot_aligned,
        per_image_rotation_deg_unaligned: rot_unaligned,
        alignment: SimilarityReport::from(&gt_object_from_pred_object),
    })
}

/// Mean Euclidean distance between predicted and ground-truth NOCS values (normalised object coordinates,
/// nominally in the unit cube) over the pixels where `mask` is true.
///
/// Errors: the three slices differ in length, the mask is empty, or a masked value is NaN/inf.
pub fn nocs_error(pred: &[[f32; 3]], gt: &[[f32; 3]], mask: &[bool]) -> Result<f64> {
    if pred.len() != gt.len() || pred.len() != mask.len() {
        return Err(Error::InvalidInput(format!(
            "nocs_error: lengths differ (pred {}, gt {}, mask {})",
            pred.len(),
            gt.len(),
            mask.len()
        )));
    }
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for ((p, g), _) in pred.iter().zip(gt).zip(mask).filter(|(_, &m)| m) {
        if p.iter().chain(g).any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput("nocs_error: masked NOCS values contain NaN or inf".into()));
        }
        let d2: f64 = p.iter().zip(g).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
        sum += d2.sqrt();
        count += 1;
    }
    if count == 0 {
        return Err(Error::InvalidInput("nocs_error: mask selects no pixels".into()));
    }
    Ok(sum / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::se3::{orbit_camera_from_object, se3_exp};
    use nalgebra::{Translation3, UnitQuaternion, Vector3, Vector6};

    use crate::test_util::Rng;

    fn gt_cameras(rng: &mut Rng, n: usize) -> Vec<Isometry3<f64>> {
        (0..n)
            .map(|_| orbit_camera_from_object(rng.uniform(0.0, 360.0), rng.uniform(-60.0, 60.0), rng.uniform(1.5, 3.0)))
            .collect()
    }

    /// Expresses `camera_from_gt_object` poses in a predicted object frame with `gt_object = S(pred_object)`.
    fn to_pred_frame(gt: &[Isometry3<f64>], gt_from_pred: &Sim3) -> Vec<Isometry3<f64>> {
        let pred_from_gt = gt_from_pred.inverse();
        gt.iter()
            .map(|g| {
                let rotation = g.rotation.to_rotation_matrix() * gt_from_pred.rotation;
                let centre = pred_from_gt.transform_point(&camera_centre(g));
                let rotation = UnitQuaternion::from_rotation_matrix(&rotation);
                Isometry3::from_parts(Translation3::from(-(rotation * centre.coords)), rotation)
            })
            .collect()
    }

    #[test]
    fn stats_of_known_values() {
        let s = error_stats(&[40.0, 10.0, 20.0, 5.0]).unwrap();
        assert_eq!(s.median, 15.0);
        assert_eq!(s.mean, 18.75);
        assert_eq!(s.max, 40.0);
        assert_eq!(s.frac_below_15deg, 0.5);
        assert_eq!(s.frac_below_30deg, 0.75);
        let s = error_stats(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.0);
        assert!(error_stats(&[]).is_err());
        assert!(error_stats(&[1.0, f64::NAN]).is_err());
    }

    #[test]
    fn similarity_transformed_poses_have_zero_aligned_error() {
        let mut rng = Rng(21);
        let gt = gt_cameras(&mut rng, 15);
        let gt_from_pred = Sim3 {
            scale: 0.37,
            rotation: Rotation3::from_scaled_axis(Vector3::new(0.4, -2.0, 0.9)),
            translation: Vector3::new(0.3, -1.2, 2.5),
        };
        let pred = to_pred_frame(&gt, &gt_from_pred);
        let eval = evaluate_poses(&pred, &gt).unwrap();
        assert_eq!(eval.n_images, 15);
        assert!(eval.rotation_deg_aligned.max < 1e-6, "{:?}", eval.rotation_deg_aligned);
        assert!(eval.translation_aligned.max < 1e-9, "{:?}", eval.translation_aligned);
        assert_eq!(eval.rotation_deg_aligned.frac_below_15deg, 1.0);
        assert!((eval.alignment.scale - 0.37).abs() < 1e-9);
        let expected_angle = gt_from_pred.rotation.angle().to_degrees();
        assert!((eval.alignment.rotation_deg - expected_angle).abs() < 1e-6);
        // Unaligned errors are large: the frames really differ.
        assert!(eval.rotation_deg_unaligned.median > 10.0);
        assert!(eval.translation_unaligned.median > 0.1);
        // R_pred = R_gt * S.R for every camera, so each unaligned error is the angle of S.R.
        for e in &eval.per_image_rotation_deg_unaligned {
            assert!((e - expected_angle).abs() < 1e-6);
        }
        // Identical poses: everything zero, identity alignment.
        let same = evaluate_poses(&gt, &gt).unwrap();
        assert!(same.rotation_deg_unaligned.max < 1e-6 && same.translation_unaligned.max < 1e-12);
        assert!((same.alignment.scale - 1.0).abs() < 1e-9);
    }

    #[test]
    fn perturbing_one_camera_shows_in_its_error() {
        let mut rng = Rng(22);
        let gt = gt_cameras(&mut rng, 20);
        let mut pred = gt.clone();
        // Rotate camera 3 by 20 degrees about its own optical axis: the centre stays, the rotation changes.
        let xi = Vector6::new(0.0, 0.0, 20f64.to_radians(), 0.0, 0.0, 0.0);
        pred[3] = se3_exp(&xi) * pred[3];
        let eval = evaluate_poses(&pred, &gt).unwrap();
        assert!((eval.per_image_rotation_deg_aligned[3] - 20.0).abs() < 1e-6);
        assert!((eval.per_image_rotation_deg_unaligned[3] - 20.0).abs() < 1e-6);
        assert!(eval.per_image_rotation_deg_aligned[0] < 1e-6);
        assert!(eval.translation_aligned.max < 1e-9);
        assert_eq!(eval.rotation_deg_aligned.frac_below_15deg, 19.0 / 20.0);
        // Moving a camera centre by 10% of its distance gives a 0.1 relative unaligned translation error.
        let mut pred = gt.clone();
        let d = gt[5].translation.vector.norm();
        pred[5] = Isometry3::from_parts(Translation3::new(0.1 * d, 0.0, 0.0), UnitQuaternion::identity()) * pred[5];
        let eval = evaluate_poses(&pred, &gt).unwrap();
        assert!((eval.translation_unaligned.max - 0.1).abs() < 1e-12);
    }

    #[test]
    fn evaluate_rejects_bad_input() {
        let mut rng = Rng(23);
        let gt = gt_cameras(&mut rng, 5);
        assert!(evaluate_poses(&gt[..4], &gt).is_err());
        assert!(evaluate_poses(&gt[..2], &gt[..2]).is_err());
        let mut at_origin = gt.clone();
        at_origin[1] = Isometry3::identity();
        assert!(evaluate_poses(&gt, &at_origin).is_err());
        let mut nan = gt.clone();
        nan[0].translation.vector.x = f64::NAN;
        assert!(evaluate_poses(&nan, &gt).is_err());
    }

    #[test]
    fn nocs_error_known_values() {
        let pred = [[0.0f32, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]];
        let gt = [[0.3f32, 0.4, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]];
        let e = nocs_error(&pred, &gt, &[true, true, false]).unwrap();
        assert!((e - 0.25).abs() < 1e-6, "{e}");
        assert!(nocs_error(&pred, &gt, &[false; 3]).is_err());
        assert!(nocs_error(&pred, &gt[..2], &[true; 3]).is_err());
        assert!(nocs_error(&pred, &gt, &[true; 2]).is_err());
        let mut bad = pred;
        bad[2][0] = f32::NAN;
        assert!(nocs_error(&bad, &gt, &[true, true, false]).is_ok());
        assert!(nocs_error(&bad, &gt, &[true; 3]).is_err());
    }
}
