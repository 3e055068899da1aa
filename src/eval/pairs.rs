//! Keypoint-transfer ground truth built from a collection's NOCS maps, and PCK@alpha reports.
//!
//! Single-instance (ground-truth NOCS and poses): decode the canonical point `X` at a source mask pixel, project it with
//! the target's pose; it is visible when it lands on the target mask and the target's NOCS decodes to
//! `X` within `tolerance` x the bbox diagonal. Cross-instance (different objects in one canonical
//! frame, NOCS normalised per instance): the target mask pixel with the nearest *normalised* NOCS,
//! when within `tolerance` (normalised units); otherwise the point has no ground truth.

use kiddo::SquaredEuclidean;
use nalgebra::{Isometry3, Point3, Vector3};
use serde::{Deserialize, Serialize};

use crate::collection::{mask_bbox, Collection, CollectionKind};
use crate::congeal::coord_maps::reverse::kd_tree;
use crate::congeal::transfer::{pck, TransferPair};
use crate::error::{Error, Result};
use crate::output::read_nocs_png_for_image;

/// How to sample ground-truth pairs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PairOptions {
    /// Number of (source, target) image pairs.
    pub pairs: usize,
    /// Source points per pair (evenly spread over the source mask).
    pub points_per_pair: usize,
    /// Seed of the pair selection.
    pub seed: u64,
    /// Visibility tolerance: fraction of the bbox diagonal (single-instance) or normalised NOCS
    /// distance (cross-instance).
    pub tolerance: f64,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self { pairs: 100, points_per_pair: 20, seed: 1, tolerance: 0.01 }
    }
}

/// Builds ground-truth pairs (with `gt`, without `pred`). Cross-instance collections pair different
/// instances only.
pub fn ground_truth_pairs(collection: &Collection, opts: &PairOptions) -> Result<Vec<TransferPair>> {
    let n = collection.images.len();
    let cross = collection.kind == CollectionKind::CrossInstance;
    let instance = |i: usize| collection.images[i].ground_truth.as_ref().and_then(|g| g.instance_id.clone());
    let mut all: Vec<(usize, usize)> = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if i != j && (!cross || instance(i) != instance(j)) {
                all.push((i, j));
            }
        }
    }
    if all.is_empty() {
        return Err(Error::Collection { path: collection.root.clone(), message: "no image pairs to build".into() });
    }
    // Deterministic shuffle (64-bit LCG), then the first `pairs`.
    let mut state = opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    for k in (1..all.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        all.swap(k, (state >> 33) as usize % (k + 1));
    }
    all.truncate(opts.pairs);
    let mut out = Vec::with_capacity(all.len());
    for (i, j) in all {
        out.push(pair(collection, i, j, cross, opts)?);
    }
    Ok(out)
}

fn missing(collection: &Collection, what: &str) -> Error {
    Error::Collection { path: collection.root.clone(), message: format!("ground-truth pairs need {what}") }
}

fn pair(collection: &Collection, i: usize, j: usize, cross: bool, opts: &PairOptions) -> Result<TransferPair> {
    let (ei, ej) = (&collection.images[i], &collection.images[j]);
    let nocs_path = |e: &crate::collection::ImageEntry| {
        e.nocs.as_ref().map(|p| collection.root.join(p)).ok_or_else(|| missing(collection, "NOCS maps"))
    };
    // A NOCS map must cover its image pixel for pixel (its mask and the projections index both).
    let read = |e: &crate::collection::ImageEntry| read_nocs_png_for_image(&nocs_path(e)?, e.width, e.height);
    let (w, ni) = (ei.width, read(ei)?);
    let (wj, hj, nj) = (ej.width, ej.height, read(ej)?);
    let mask_i = collection.load_image(i)?.mask;
    let mask_j = collection.load_image(j)?.mask;
    let on_i: Vec<usize> = (0..ni.len()).filter(|&k| mask_i.as_raw().get(k).is_some_and(|v| *v >= 128)).collect();
    let stride = (on_i.len() / opts.points_per_pair.max(1)).max(1);
    let picked: Vec<usize> = on_i.iter().copied().step_by(stride).take(opts.points_per_pair).collect();
    let points: Vec<[f64; 2]> = picked.iter().map(|&k| [(k as u32 % w) as f64, (k as u32 / w) as f64]).collect();
    let gt: Vec<Option<[f64; 2]>> = if cross {
        let on_j = nj.iter().enumerate().filter(|(k, _)| mask_j.as_raw().get(*k).is_some_and(|m| *m >= 128));
        let tree = kd_tree(on_j.map(|(k, v)| (v.map(|c| c as f64), k as u64)));
        picked
            .iter()
            .map(|&k| {
                let hit = tree.nearest_one::<SquaredEuclidean>(&ni[k].map(|c| c as f64));
                (tree.size() > 0 && hit.distance <= opts.tolerance * opts.tolerance)
                    .then(|| [(hit.item as u32 % wj) as f64, (hit.item as u32 / wj) as f64])
            })
            .collect()
    } else {
        let gi = ei.ground_truth.as_ref().ok_or_else(|| missing(collection, "ground-truth poses"))?;
        let gj = ej.ground_truth.as_ref().ok_or_else(|| missing(collection, "ground-truth poses"))?;
        let (lo, hi) = (gi.nocs_bbox_min, gi.nocs_bbox_max);
        let diag = (0..3).map(|a| (hi[a] - lo[a]).powi(2)).sum::<f64>().sqrt();
        let decode = |v: [f32; 3]| Point3::from(Vector3::from_fn(|a, _| lo[a] + v[a] as f64 * (hi[a] - lo[a])));
        picked
            .iter()
            .map(|&k| {
                let x = decode(ni[k]);
                let p = gj.intrinsics.project(&(gj.camera_from_object * x))?;
                let (u, v) = (p.x.round(), p.y.round());
                if u < 0.0 || v < 0.0 || u >= wj as f64 || v >= hj as f64 {
                    return None;
                }
                let kk = (v as u32 * wj + u as u32) as usize;
                let seen = decode(nj[kk]);
                (mask_j.as_raw()[kk] >= 128 && (seen - x).norm() < opts.tolerance * diag).then_some([p.x, p.y])
            })
            .collect()
    };
    Ok(TransferPair {
        src: ei.rgb.to_string_lossy().into(),
        dst: ej.rgb.to_string_lossy().into(),
        points,
        pred: None,
        gt: Some(gt),
    })
}

/// PCK@0.1 of predicted pairs: overall and on pairs whose ground-truth viewpoints differ by more
/// than 90 deg in azimuth; and the same at the thresholds of [`CURVE_ALPHAS`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PckReport {
    /// PCK threshold factor (0.1).
    pub alpha: f64,
    /// PCK over all visible points.
    pub pck: Option<f64>,
    /// Visible ground-truth points.
    pub points: usize,
    /// PCK over pairs more than 90 deg apart in azimuth.
    pub pck_wide: Option<f64>,
    /// Visible points in those pairs.
    pub points_wide: usize,
    /// Pairs evaluated.
    pub pairs: usize,
    /// PCK at each of [`CURVE_ALPHAS`] (overall and wide), so coarse misses (a point on the wrong
    /// part or the wrong end of the object) can be told from imprecise hits.
    pub curve: Vec<PckPoint>,
}

/// PCK at one threshold factor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PckPoint {
    /// Threshold factor: a point counts when it lands within `alpha` x the target's mask bbox side.
    pub alpha: f64,
    /// PCK over all visible points.
    pub pck: Option<f64>,
    /// PCK over pairs more than 90 deg apart in azimuth.
    pub pck_wide: Option<f64>,
}

/// The thresholds of [`PckReport::curve`]: the usual 0.05 / 0.1 / 0.15 of the correspondence
/// literature, and coarser ones up to half the bbox.
pub const CURVE_ALPHAS: [f64; 6] = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5];

/// Azimuth of the camera about object +y, degrees (0 = on the +z side).
pub fn azimuth_deg(camera_from_object: &Isometry3<f64>) -> f64 {
    let c = camera_from_object.inverse() * Point3::origin();
    c.x.atan2(c.z).to_degrees()
}

/// Scores predicted pairs with PCK@alpha; the threshold uses the target's mask bbox.
pub fn pck_report(collection: &Collection, pairs: &[TransferPair], alpha: f64) -> Result<PckReport> {
    // Every pair is scored on all its points, or the report refuses: a short list would silently
    // drop points from the score but not from the count.
    let bad = |message: String| Error::InvalidInput(format!("keypoint pairs: {message}"));
    for (k, p) in pairs.iter().enumerate() {
        for (what, len) in [("gt", p.gt.as_ref().map(Vec::len)), ("pred", p.pred.as_ref().map(Vec::len))] {
            if let Some(len) = len.filter(|&l| l != p.points.len()) {
                return Err(bad(format!(
                    "pair {k} ({} -> {}) has {len} `{what}` entries for {} points",
                    p.src,
                    p.dst,
                    p.points.len()
                )));
            }
        }
    }
    let without: Vec<usize> = pairs.iter().enumerate().filter(|(_, p)| p.pred.is_none()).map(|(k, _)| k).collect();
    if !without.is_empty() && without.len() < pairs.len() {
        return Err(bad(format!("{} of {} pairs have no predictions (first: pair {})", without.len(), pairs.len(), without[0])));
    }
    let mut sizes = std::collections::HashMap::new();
    for p in pairs {
        if sizes.contains_key(&p.dst) {
            continue;
        }
        let i = collection.index_of(&p.dst).ok_or_else(|| Error::Collection {
            path: collection.root.clone(),
            message: format!("pair target {} is not in the collection", p.dst),
        })?;
        let b = mask_bbox(&collection.load_image(i)?.mask).map(|b| b.width().max(b.height()));
        sizes.insert(p.dst.clone(), b);
    }
    let size = |f: &str| sizes.get(f).copied().flatten();
    let wide: Vec<TransferPair> = pairs
        .iter()
        .filter(|p| {
            let az = |f: &str| {
                collection
                    .index_of(f)
                    .and_then(|i| collection.images[i].ground_truth.as_ref())
                    .map(|g| azimuth_deg(&g.camera_from_object))
            };
            match (az(&p.src), az(&p.dst)) {
                (Some(a), Some(b)) => {
                    let d = (a - b).rem_euclid(360.0);
                    d.min(360.0 - d) > 90.0
                }
                _ => false,
            }
        })
        .cloned()
        .collect();
    let count = |ps: &[TransferPair]| ps.iter().map(|p| p.gt.as_ref().map_or(0, |g| g.iter().flatten().count())).sum();
    let curve =
        CURVE_ALPHAS.iter().map(|&a| PckPoint { alpha: a, pck: pck(pairs, &size, a), pck_wide: pck(&wide, &size, a) }).collect();
    Ok(PckReport {
        alpha,
        pck: pck(pairs, &size, alpha),
        points: count(pairs),
        pck_wide: pck(&wide, &size, alpha),
        points_wide: count(&wide),
        pairs: pairs.len(),
        curve,
    })
}
