//! `congeal eval`: a run against a collection's ground truth (poses, and NOCS where both exist).

use std::path::Path;

use serde::Serialize;

use crate::collection::Collection;
use crate::error::{Error, Result};
use crate::eval::{error_stats, evaluate_poses, nocs_error, ErrorStats, PoseEvaluation};
use crate::output::read_nocs_png;
use crate::output::result::RunResult;

/// The JSON printed by `congeal eval`.
#[derive(Clone, Debug, Serialize)]
pub struct RunEvaluation {
    /// Collection name.
    pub collection: String,
    /// Images in the run that have ground truth.
    pub n_evaluated: usize,
    /// Pose errors (rotation deg; translation relative to the camera distance); `None` when fewer
    /// than three images have ground-truth poses (e.g. a plain folder of photos with keypoints).
    pub poses: Option<PoseEvaluation>,
    /// Mean L2 NOCS error over mask pixels, per-image statistics (absent if no NOCS maps).
    pub nocs: Option<ErrorStats>,
    /// Per image: file, rotation error unaligned, rotation error aligned, NOCS error.
    pub per_image: Vec<PerImage>,
}

/// One image's errors.
#[derive(Clone, Debug, Serialize)]
pub struct PerImage {
    /// Image file.
    pub file: String,
    /// Rotation error without alignment, degrees.
    pub rotation_deg: f64,
    /// Rotation error after Sim3 alignment, degrees.
    pub rotation_deg_aligned: f64,
    /// Mean NOCS L2 error over the mask.
    pub nocs_error: Option<f64>,
}

/// Fewest images with ground-truth poses for a pose evaluation (the similarity alignment needs 3).
pub const MIN_POSES: usize = 3;

/// Evaluates `run` (loaded from `run_dir`) against `collection`'s ground truth; without enough
/// ground-truth poses the report has `poses: None` (keypoints may still be scored).
pub fn evaluate_run(collection: &Collection, run: &RunResult, run_dir: &Path) -> Result<RunEvaluation> {
    let mut pred = Vec::new();
    let mut gt = Vec::new();
    let mut files = Vec::new();
    let mut nocs_errors = Vec::new();
    let mut per_nocs = Vec::new();
    for image in &run.images {
        let Some(idx) = collection.index_of(&image.file) else { continue };
        let entry = &collection.images[idx];
        let Some(truth) = &entry.ground_truth else { continue };
        pred.push(image.pose()?);
        gt.push(truth.camera_from_object);
        files.push(image.file.clone());
        let mut err = None;
        if let (Some(pred_file), Some(gt_file)) = (&image.nocs, &entry.nocs) {
            let (w, h, p) = read_nocs_png(&run_dir.join(pred_file))?;
            let (gw, gh, g) = read_nocs_png(&collection.root.join(gt_file))?;
            if (w, h) != (gw, gh) {
                return Err(Error::Run {
                    path: run_dir.join(pred_file),
                    message: format!("NOCS map is {w}x{h}, ground truth is {gw}x{gh}"),
                });
            }
            let mask = collection.load_image(idx)?.mask;
            let m: Vec<bool> = mask.pixels().map(|px| px.0[0] >= 128).collect();
            let e = nocs_error(&p, &g, &m)?;
            nocs_errors.push(e);
            err = Some(e);
        }
        per_nocs.push(err);
    }
    if pred.len() < MIN_POSES {
        return Ok(RunEvaluation {
            collection: collection.name.clone(),
            n_evaluated: 0,
            poses: None,
            nocs: None,
            per_image: Vec::new(),
        });
    }
    let poses = evaluate_poses(&pred, &gt)?;
    let per_image = files
        .into_iter()
        .enumerate()
        .map(|(i, file)| PerImage {
            file,
            rotation_deg: poses.per_image_rotation_deg_unaligned[i],
            rotation_deg_aligned: poses.per_image_rotation_deg_aligned[i],
            nocs_error: per_nocs[i],
        })
        .collect();
    let poses = Some(poses);
    let nocs = if nocs_errors.is_empty() { None } else { Some(error_stats(&nocs_errors)?) };
    Ok(RunEvaluation { collection: collection.name.clone(), n_evaluated: pred.len(), poses, nocs, per_image })
}
