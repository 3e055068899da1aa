//! Keypoint transfer through the canonical shape (paper Eq. 12-13, 17): a source pixel's canonical
//! point comes from the source image's forward map (its NOCS map), and the target pixel is the
//! reverse map of the target image at that point: the target mask pixel whose NOCS is nearest
//! (a k-d-tree-free nearest neighbour over the target's mask pixels, which number a few thousand).
//!
//! In this build the forward map is the NOCS rendering at the refined pose (the semantic warp of
//! Eq. 10 refines it later without changing this interface).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::output::read_nocs_png;
use crate::output::result::RunResult;

/// Largest NOCS distance (normalised units) at which a target pixel still counts as the same point;
/// beyond it the point is reported as not visible in the target.
pub const MAX_NOCS_DISTANCE: f32 = 0.08;

/// One image's forward map.
#[derive(Clone, Debug)]
pub struct NocsMap {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// NOCS per pixel (row-major); `None` off the object.
    pub nocs: Vec<Option<[f32; 3]>>,
}

impl NocsMap {
    /// Reads a run's 16-bit NOCS PNG (background = all zero).
    pub fn load(path: &Path) -> Result<Self> {
        let (width, height, values) = read_nocs_png(path)?;
        let nocs = values.into_iter().map(|v| if v.iter().any(|c| *c > 0.0) { Some(v) } else { None }).collect();
        Ok(Self { width, height, nocs })
    }

    /// The NOCS at a (sub)pixel position, nearest pixel; `None` off the object or the image.
    pub fn at(&self, x: f64, y: f64) -> Option<[f32; 3]> {
        let (u, v) = (x.round(), y.round());
        if !(u >= 0.0 && v >= 0.0 && u < self.width as f64 && v < self.height as f64) {
            return None;
        }
        self.nocs[(v as u32 * self.width + u as u32) as usize]
    }

    /// Reverse map: the pixel whose NOCS is nearest to `target`, if within `max_distance`.
    pub fn find(&self, target: [f32; 3], max_distance: f32) -> Option<[f64; 2]> {
        let mut best = (max_distance * max_distance, None);
        for (i, n) in self.nocs.iter().enumerate() {
            if let Some(n) = n {
                let d = (n[0] - target[0]).powi(2) + (n[1] - target[1]).powi(2) + (n[2] - target[2]).powi(2);
                if d <= best.0 {
                    best = (d, Some(i));
                }
            }
        }
        best.1.map(|i| [(i as u32 % self.width) as f64, (i as u32 / self.width) as f64])
    }
}

/// One transfer request (DESIGN.md: PAIRS.json entries).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TransferPair {
    /// Source image file as in result.json (e.g. `rgb/000.png`).
    pub src: String,
    /// Target image file.
    pub dst: String,
    /// Source pixels `[x, y]`.
    pub points: Vec<[f64; 2]>,
    /// Predicted target pixels (filled by [`transfer_pairs`]); `null` = not visible / off the mask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pred: Option<Vec<Option<[f64; 2]>>>,
    /// Ground-truth target pixels, if the pairs file has them (kept as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<Vec<Option<[f64; 2]>>>,
}

/// Transfers points from `src` to `dst` of a run.
pub fn transfer(run_dir: &Path, run: &RunResult, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
    let map = |file: &str| -> Result<NocsMap> {
        let image = run.images.iter().find(|i| i.file == file).ok_or_else(|| Error::Run {
            path: run_dir.join("result.json"),
            message: format!("image {file} is not in the run"),
        })?;
        let nocs = image.nocs.as_ref().ok_or_else(|| Error::Run {
            path: run_dir.join("result.json"),
            message: format!("image {file} has no NOCS map (run with output.nocs: true)"),
        })?;
        NocsMap::load(&run_dir.join(nocs))
    };
    let (a, b) = (map(src)?, map(dst)?);
    Ok(points
        .iter()
        .map(|p| {
            if !(p[0].is_finite() && p[1].is_finite()) {
                return None;
            }
            a.at(p[0], p[1]).and_then(|n| b.find(n, MAX_NOCS_DISTANCE))
        })
        .collect())
}

/// Fills `pred` of every pair.
pub fn transfer_pairs(run_dir: &Path, pairs: &mut [TransferPair]) -> Result<()> {
    let run = RunResult::load(run_dir)?;
    for pair in pairs.iter_mut() {
        pair.pred = Some(transfer(run_dir, &run, &pair.src, &pair.dst, &pair.points)?);
    }
    Ok(())
}

/// PCK@alpha over pairs with ground truth: a prediction is correct when within
/// `alpha * max(h, w)` of the ground truth, (h, w) the target object's bbox size. Points whose ground
/// truth is `null` are skipped; a `null` prediction for a visible point counts as wrong.
pub fn pck(pairs: &[TransferPair], target_bbox_size: &dyn Fn(&str) -> Option<f64>, alpha: f64) -> Option<f64> {
    let (mut correct, mut total) = (0usize, 0usize);
    for pair in pairs {
        let (Some(pred), Some(gt), Some(size)) = (&pair.pred, &pair.gt, target_bbox_size(&pair.dst)) else { continue };
        for (p, g) in pred.iter().zip(gt) {
            let Some(g) = g else { continue };
            total += 1;
            if let Some(p) = p {
                if ((p[0] - g[0]).powi(2) + (p[1] - g[1]).powi(2)).sqrt() <= alpha * size {
                    correct += 1;
                }
            }
        }
    }
    (total > 0).then(|| correct as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_map_finds_nearest_and_refuses_far_points() {
        let nocs = vec![None, Some([0.1, 0.1, 0.1]), Some([0.5, 0.5, 0.5]), None];
        let m = NocsMap { width: 2, height: 2, nocs };
        assert_eq!(m.find([0.12, 0.1, 0.1], 0.08), Some([1.0, 0.0]));
        assert_eq!(m.find([0.48, 0.5, 0.5], 0.08), Some([0.0, 1.0]));
        assert_eq!(m.find([0.9, 0.9, 0.9], 0.08), None);
        assert_eq!(m.at(1.2, -0.3), Some([0.1, 0.1, 0.1]));
        assert_eq!(m.at(0.0, 0.0), None);
        assert_eq!(m.at(5.0, 0.0), None);
    }

    #[test]
    fn pck_counts_null_predictions_as_wrong() {
        let pairs = vec![TransferPair {
            src: "a".into(),
            dst: "b".into(),
            points: vec![[0.0, 0.0]; 4],
            pred: Some(vec![Some([10.0, 10.0]), Some([30.0, 10.0]), None, Some([0.0, 0.0])]),
            gt: Some(vec![Some([11.0, 10.0]), Some([10.0, 10.0]), Some([5.0, 5.0]), None]),
        }];
        let p = pck(&pairs, &|_| Some(100.0), 0.1).unwrap();
        assert!((p - 1.0 / 3.0).abs() < 1e-12);
    }
}
