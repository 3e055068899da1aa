//! Keypoint transfer.
//!
//! Through the canonical shape (paper Eq. 17): a source pixel's canonical point comes from the source
//! image's forward map (`nocs/NNN.png`, Eq. 10-11), and the target pixel is the target's reverse map
//! of that point (Eq. 12-13, [`ReverseMap`]: the rendered pixel with the nearest NOCS, then the input
//! pixel whose warped position is nearest). Runs without coordinate maps fall back to the target
//! pixel whose forward NOCS is nearest.
//!
//! The paper's 2D baseline (Eq. 18, [`transfer_2d`]): the target mask pixel whose DINOv2 feature is
//! nearest (cosine) to the source pixel's.
//!
//! [`ReverseMap`]: crate::congeal::coord_maps::ReverseMap

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::collection::{Collection, SquareCrop};
use crate::congeal::coord_maps::reverse::find_image;
use crate::congeal::coord_maps::{reverse_map, FeatureGrid, NocsMap};
use crate::congeal::features::{masked_crop, FeatureExtractor};
use crate::error::{Error, Result};
use crate::output::result::RunResult;

/// Largest NOCS distance (normalised units) at which a target pixel still counts as the same point;
/// beyond it the point is reported as not visible in the target.
pub const MAX_NOCS_DISTANCE: f32 = 0.08;

/// One transfer request: an entry of the `--pairs` file of `congeal transfer` (README, "Command line").
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

/// Transfers points from `src` to `dst` of a run (Eq. 17); `None` for points off the source mask or
/// not visible in the target.
pub fn transfer(run_dir: &Path, run: &RunResult, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
    let map = |file: &str| -> Result<NocsMap> {
        let image = find_image(run_dir, run, file)?;
        let nocs = image.nocs.as_ref().ok_or_else(|| Error::Run {
            path: run_dir.join("result.json"),
            message: format!("image {file} has no NOCS map (run with output.nocs: true)"),
        })?;
        NocsMap::load(&run_dir.join(nocs))
    };
    let a = map(src)?;
    let reverse = reverse_map(run_dir, run, dst)?;
    let fallback = if reverse.is_none() { Some(map(dst)?) } else { None };
    Ok(points
        .iter()
        .map(|p| {
            if !(p[0].is_finite() && p[1].is_finite()) {
                return None;
            }
            let n = a.at(p[0], p[1])?;
            match (&reverse, &fallback) {
                (Some(r), _) => r.find(n, MAX_NOCS_DISTANCE as f64),
                (None, Some(b)) => b.find(n, MAX_NOCS_DISTANCE),
                (None, None) => None,
            }
        })
        .collect())
}

/// The 2D baseline (Eq. 18): for each source point on the source mask, the target mask pixel whose
/// DINOv2 feature (bilinear between tokens) has the largest cosine with the source point's. Both
/// images are seen as in pose initialisation: masked square crops around the mask, `crop_margin`
/// padding. Points off the source mask give `None`. For many pairs use [`Transfer2d`], which
/// featurises each image once.
pub fn transfer_2d(
    collection: &Collection,
    extractor: &FeatureExtractor,
    crop_margin: f64,
    src: &str,
    dst: &str,
    points: &[[f64; 2]],
) -> Result<Vec<Option<[f64; 2]>>> {
    Transfer2d::new(collection, extractor, crop_margin).transfer(src, dst, points)
}

/// An image as the 2D baseline sees it: the loaded image, its crop and the crop's features.
struct FeaturedImage {
    image: crate::collection::LoadedImage,
    crop: SquareCrop,
    features: FeatureGrid,
}

/// The 2D baseline (Eq. 18) over many pairs of one collection, computing each image's DINOv2
/// features once.
pub struct Transfer2d<'a> {
    collection: &'a Collection,
    extractor: &'a FeatureExtractor,
    crop_margin: f64,
    cache: std::collections::HashMap<String, std::rc::Rc<FeaturedImage>>,
    masks: std::collections::HashMap<String, std::path::PathBuf>,
}

impl<'a> Transfer2d<'a> {
    /// A baseline over `collection` with `extractor`'s features and the crop padding `crop_margin`.
    pub fn new(collection: &'a Collection, extractor: &'a FeatureExtractor, crop_margin: f64) -> Self {
        Self { collection, extractor, crop_margin, cache: Default::default(), masks: Default::default() }
    }

    /// Uses the masks a run kept for images without a mask file (`ImageResult::mask`, relative to
    /// `run_dir`), so mask-less collections work as the run saw them.
    pub fn with_run_masks(mut self, run: &RunResult, run_dir: &Path) -> Self {
        self.masks = run.images.iter().filter_map(|im| im.mask.as_ref().map(|m| (im.file.clone(), run_dir.join(m)))).collect();
        self
    }

    fn featured(&mut self, file: &str) -> Result<std::rc::Rc<FeaturedImage>> {
        if let Some(f) = self.cache.get(file) {
            return Ok(f.clone());
        }
        let collection = self.collection;
        let i = collection.images.iter().position(|e| e.rgb.to_string_lossy() == file).ok_or_else(|| Error::Collection {
            path: collection.root.clone(),
            message: format!("image {file} is not in the collection"),
        })?;
        let image = match self.masks.get(file) {
            Some(mask_path) => {
                let rgb = crate::collection::load_rgb(&collection.rgb_path(i)?)?;
                let mask = crate::collection::load_mask(mask_path)?;
                if mask.dimensions() != rgb.dimensions() {
                    return Err(Error::Mask {
                        path: mask_path.clone(),
                        message: "the run's mask does not match the image size".into(),
                    });
                }
                crate::collection::LoadedImage { rgb, mask }
            }
            None => collection.load_image(i)?,
        };
        let bbox = crate::collection::mask_bbox(&image.mask)
            .ok_or_else(|| Error::Mask { path: file.into(), message: "mask is empty".into() })?;
        let crop = SquareCrop::around(&bbox, self.crop_margin, self.extractor.input_size())?;
        let features = self.extractor.extract(&[masked_crop(&image.rgb, &image.mask, &crop)])?.remove(0);
        let f = std::rc::Rc::new(FeaturedImage { image, crop, features });
        self.cache.insert(file.to_string(), f.clone());
        Ok(f)
    }

    /// Transfers `points` from `src` to `dst` (see [`transfer_2d`]).
    pub fn transfer(&mut self, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
        let fa = self.featured(src)?;
        let fb = self.featured(dst)?;
        let size = self.extractor.input_size() as f64;
        let unit = |crop: &SquareCrop, p: [f64; 2]| {
            let c = crop.crop_from_image(nalgebra::Point2::new(p[0], p[1]));
            [(c.x + 0.5) / size, (c.y + 0.5) / size]
        };
        let (a, b) = (&fa.image, &fb.image);
        // Target candidates: every mask pixel, with its interpolated, normalised feature.
        let targets: Vec<([f64; 2], Vec<f32>)> = b
            .mask
            .enumerate_pixels()
            .filter(|(_, _, v)| v[0] >= 128)
            .map(|(x, y, _)| {
                let p = [x as f64, y as f64];
                let u = unit(&fb.crop, p);
                (p, fb.features.sample_normalised(u[0], u[1]))
            })
            .collect();
        Ok(points
            .iter()
            .map(|p| {
                if !(p[0].is_finite() && p[1].is_finite()) {
                    return None;
                }
                let (x, y) = (p[0].round(), p[1].round());
                if x < 0.0 || y < 0.0 || x >= a.mask.width() as f64 || y >= a.mask.height() as f64 {
                    return None;
                }
                if a.mask.get_pixel(x as u32, y as u32)[0] < 128 {
                    return None;
                }
                let u = unit(&fa.crop, *p);
                let q = fa.features.sample_normalised(u[0], u[1]);
                targets
                    .iter()
                    .map(|(t, f)| (t, f.iter().zip(&q).map(|(m, n)| m * n).sum::<f32>()))
                    .max_by(|x, y| x.1.total_cmp(&y.1))
                    .map(|(t, _)| *t)
            })
            .collect())
    }
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
