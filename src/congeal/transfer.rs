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

use crate::collection::{Collection, PixelBox, SquareCrop};
use crate::congeal::coord_maps::reverse::find_image;
use crate::congeal::coord_maps::{reverse_map, FeatureGrid, NeighbourGram, NocsMap};
use crate::congeal::features::{masked_crop, FeatureExtractor};
use crate::error::{Error, Result};
use crate::output::result::RunResult;

/// Largest NOCS distance (normalised units) at which a target pixel still counts as the same point;
/// beyond it the point is reported as not visible in the target.
pub const MAX_NOCS_DISTANCE: f32 = 0.08;

/// How far outside the source object a point may lie and still be transferred, as a fraction of the
/// larger side of the object's bounding box. Keypoints on a paw tip, an ear or a thin leg are often
/// annotated a few pixels off a tight mask (dogs-dev: 86 of its 1620 pair points, 0.5-8 px off); such
/// a point is moved to the nearest object pixel first ([`snap_to_object`]). Farther off gives `None`.
pub const SNAP_FRACTION: f64 = 0.05;

/// The point itself when its pixel is on the object (`on(x, y)`), else the centre of the object pixel
/// nearest to it within `max_distance` pixels; `None` when there is none or the point is not finite.
pub fn snap_to_object(
    p: [f64; 2],
    width: u32,
    height: u32,
    max_distance: f64,
    on: impl Fn(u32, u32) -> bool,
) -> Option<[f64; 2]> {
    if !(p[0].is_finite() && p[1].is_finite()) {
        return None;
    }
    let (x, y) = (p[0].round(), p[1].round());
    if x >= 0.0 && y >= 0.0 && x < width as f64 && y < height as f64 && on(x as u32, y as u32) {
        return Some(p);
    }
    let r = max_distance.max(0.0);
    let lo = |v: f64| (v - r).floor().max(0.0);
    let (x0, y0) = (lo(p[0]), lo(p[1]));
    let (x1, y1) = ((p[0] + r).ceil().min(width as f64 - 1.0), (p[1] + r).ceil().min(height as f64 - 1.0));
    if x1 < x0 || y1 < y0 {
        return None;
    }
    let mut best: Option<(f64, [f64; 2])> = None;
    for yy in y0 as u32..=y1 as u32 {
        for xx in x0 as u32..=x1 as u32 {
            let d = (xx as f64 - p[0]).hypot(yy as f64 - p[1]);
            if d <= r && best.is_none_or(|(bd, _)| d < bd) && on(xx, yy) {
                best = Some((d, [xx as f64, yy as f64]));
            }
        }
    }
    best.map(|(_, q)| q)
}

/// [`SNAP_FRACTION`] of the larger side of a bounding box, in pixels.
fn snap_distance(bbox: &PixelBox) -> f64 {
    SNAP_FRACTION * (bbox.width().max(bbox.height()) + 1.0)
}

/// The bounding box of the pixels a forward map covers.
fn map_bbox(map: &NocsMap) -> Option<PixelBox> {
    let w = map.width.max(1);
    PixelBox::covering(map.nocs.iter().enumerate().filter(|(_, n)| n.is_some()).map(|(i, _)| (i as u32 % w, i as u32 / w)))
}

/// [`snap_to_object`] onto a mask's set pixels, reaching [`SNAP_FRACTION`] of the mask's bbox `bbox`.
fn snap_to_mask(mask: &image::GrayImage, bbox: &PixelBox, p: [f64; 2]) -> Option<[f64; 2]> {
    snap_to_object(p, mask.width(), mask.height(), snap_distance(bbox), |x, y| mask.get_pixel(x, y)[0] >= 128)
}

/// How points are transferred: `congeal transfer --method`, and the `method` of the node's
/// `~/transfer_keypoints`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Features plus `transfer.nocs_weight` x canonical-coordinate distance ([`joint_cost`]).
    Joint,
    /// Through the canonical shape alone (Eq. 17, [`transfer`]).
    Canonical,
    /// DINOv2 features alone (Eq. 18, [`transfer_2d`]).
    Features,
    /// The same relative spot in the mask bbox ([`Transfer2d::transfer_bbox`]).
    Bbox,
}

impl Method {
    /// Every method with its name.
    pub const NAMES: [(&'static str, Method); 4] =
        [("joint", Method::Joint), ("3d", Method::Canonical), ("2d", Method::Features), ("bbox", Method::Bbox)];

    /// Whether the method matches DINOv2 features (`joint` and `2d`); `3d` and `bbox` need none, so
    /// callers load the extractor only when this is true.
    pub fn needs_features(self) -> bool {
        matches!(self, Method::Joint | Method::Features)
    }

    /// The method called `name`; an empty name is the default, [`Method::Joint`].
    pub fn parse(name: &str) -> Result<Self> {
        let name = name.trim();
        if name.is_empty() {
            return Ok(Method::Joint);
        }
        Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, m)| *m).ok_or_else(|| {
            let known: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            // Echo at most 40 characters of what a client sent.
            let shown: String = name.chars().take(40).collect();
            let more = if name.chars().count() > 40 { "..." } else { "" };
            Error::InvalidInput(format!("unknown transfer method `{shown}{more}` (expected one of {})", known.join(", ")))
        })
    }
}

/// One transfer request: an entry of the `--pairs` file of `congeal transfer` (README, "Command line").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TransferPair {
    /// Source image file as in result.json (e.g. `rgb/000.png`).
    pub src: String,
    /// Target image file.
    pub dst: String,
    /// Source pixels `[x, y]`.
    pub points: Vec<[f64; 2]>,
    /// Predicted target pixels (filled by [`transfer_pairs`]); `null` = not visible, or off the source
    /// object beyond [`SNAP_FRACTION`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pred: Option<Vec<Option<[f64; 2]>>>,
    /// Ground-truth target pixels, if the pairs file has them (kept as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<Vec<Option<[f64; 2]>>>,
}

/// Transfers points from `src` to `dst` of a run (Eq. 17); `None` for points off the source object
/// (beyond [`SNAP_FRACTION`]) or not visible in the target.
pub fn transfer(run_dir: &Path, run: &RunResult, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
    let map = |file: &str| -> Result<NocsMap> {
        let image = find_image(run_dir, run, file)?;
        let nocs = image.nocs.as_ref().ok_or_else(|| Error::Run {
            path: run_dir.join("result.json"),
            message: format!("image {file} has no NOCS map (run with output.nocs: true)"),
        })?;
        NocsMap::load_for_image(&run_dir.join(nocs), image.size)
    };
    let a = map(src)?;
    let reverse = reverse_map(run_dir, run, dst)?;
    let fallback = if reverse.is_none() { Some(map(dst)?) } else { None };
    let snap = map_bbox(&a).map_or(0.0, |b| snap_distance(&b));
    let covered = |x: u32, y: u32| a.nocs.get((y * a.width + x) as usize).is_some_and(Option::is_some);
    Ok(points
        .iter()
        .map(|p| {
            let p = snap_to_object(*p, a.width, a.height, snap, covered)?;
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
/// padding. Points off the source mask (beyond [`SNAP_FRACTION`]) give `None`. For many pairs use [`Transfer2d`], which
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
    /// The mask's bbox.
    bbox: PixelBox,
    crop: SquareCrop,
    features: FeatureGrid,
}

/// NOCS distance charged to a target pixel that has no canonical coordinate (on the mask but off
/// the forward map) in the joint cost: the unit box's half diagonal, i.e. "far".
pub const MISSING_NOCS_DISTANCE: f32 = 0.87;

/// The 3D-aware joint matching cost of a target pixel (lower is better):
/// `(1 - cos) + nocs_weight * |x_src - x_dst|`, with `cosine` the similarity of the two DINOv2
/// features and `x` the forward-map canonical coordinates. Without a source coordinate the NOCS
/// term is dropped (features alone); a target pixel without one is charged
/// [`MISSING_NOCS_DISTANCE`].
pub fn joint_cost(cosine: f32, src_nocs: Option<[f32; 3]>, dst_nocs: Option<[f32; 3]>, nocs_weight: f32) -> f32 {
    let feature = 1.0 - cosine;
    let Some(a) = src_nocs else { return feature };
    let d = dst_nocs
        .map_or(MISSING_NOCS_DISTANCE, |b| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt());
    feature + nocs_weight * d
}

/// A target pixel for matching: its position, unit DINOv2 feature and canonical coordinate.
pub type MatchTarget = ([f64; 2], Vec<f32>, Option<[f32; 3]>);

/// The target pixel of least [`joint_cost`] for a source point with unit feature `feature` and
/// canonical coordinate `src_nocs`, among `targets` (pixel, unit feature, canonical coordinate);
/// `nocs_weight = 0` is plain feature nearest neighbour (Eq. 18). `None` without targets.
pub fn best_match(feature: &[f32], src_nocs: Option<[f32; 3]>, targets: &[MatchTarget], nocs_weight: f32) -> Option<[f64; 2]> {
    targets
        .iter()
        .map(|(t, f, n)| {
            let cosine = f.iter().zip(feature).map(|(a, b)| a * b).sum::<f32>();
            (t, joint_cost(cosine, src_nocs, *n, nocs_weight))
        })
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(t, _)| *t)
}

/// A target pixel for [`PixelMatcher`]: its position, its unit-square position in the feature grid and its
/// canonical coordinate.
pub type PixelTarget = ([f64; 2], [f64; 2], Option<[f32; 3]>);

/// Many target pixels of one feature grid, ready to be matched against many query features: the
/// cosine of a unit query `q` with a pixel's interpolated, normalised feature ([`FeatureGrid::sample_normalised`])
/// is `Σ_k w_k <q, t_k> / |Σ_k w_k t_k|` over its 4 bilinear taps, with the norm from the
/// neighbouring tokens' dot products ([`NeighbourGram`], as the coordinate-map warp does). So a query costs one dot product per token and O(1) per pixel, instead of building and
/// comparing a feature per pixel (640 x 480 photos of an object filling the frame: ~200 000 pixels).
/// [`PixelMatcher::best`] equals [`best_match`] over the same pixels up to float rounding.
pub struct PixelMatcher<'g> {
    grid: &'g FeatureGrid,
    pixels: Vec<[f64; 2]>,
    taps: Vec<[(usize, f32); 4]>,
    /// `1 / |Σ_k w_k t_k|` per pixel (1 where that is ~0, as `sample_normalised` leaves it).
    inv_norm: Vec<f32>,
    nocs: Vec<Option<[f32; 3]>>,
}

impl<'g> PixelMatcher<'g> {
    /// The target pixels `targets` of `grid`.
    pub fn new(grid: &'g FeatureGrid, targets: impl IntoIterator<Item = PixelTarget>) -> Self {
        let gram = NeighbourGram::new(grid);
        let (mut pixels, mut taps, mut inv_norm, mut nocs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (p, u, x) in targets {
            let t = grid.taps(u[0], u[1]);
            let norm = gram.norm2(&t).max(0.0).sqrt();
            pixels.push(p);
            taps.push(t);
            inv_norm.push(if norm > 1e-12 { 1.0 / norm } else { 1.0 });
            nocs.push(x);
        }
        Self { grid, pixels, taps, inv_norm, nocs }
    }

    /// The pixel of least [`joint_cost`] for a unit query feature (see [`best_match`]); `None`
    /// without pixels. Ties go to the first pixel.
    pub fn best(&self, query: &[f32], src_nocs: Option<[f32; 3]>, nocs_weight: f32) -> Option<[f64; 2]> {
        let c = self.grid.channels;
        let dots: Vec<f32> = self.grid.data.chunks(c).map(|t| t.iter().zip(query).map(|(a, b)| a * b).sum()).collect();
        let mut best: Option<(f32, usize)> = None;
        for (i, taps) in self.taps.iter().enumerate() {
            let cosine = taps.iter().map(|&(t, w)| w * dots[t]).sum::<f32>() * self.inv_norm[i];
            let cost = joint_cost(cosine, src_nocs, self.nocs[i], nocs_weight);
            if best.is_none_or(|(b, _)| cost.total_cmp(&b).is_lt()) {
                best = Some((cost, i));
            }
        }
        best.map(|(_, i)| self.pixels[i])
    }
}

/// Canonical coordinates for the joint cost: each image's forward map from a run.
struct Canonical {
    run_dir: std::path::PathBuf,
    run: RunResult,
    nocs_weight: f32,
    maps: std::collections::HashMap<String, std::rc::Rc<NocsMap>>,
}

/// Feature matching over many pairs of one collection, computing each image's DINOv2 features
/// once: the 2D baseline (Eq. 18), or with [`Transfer2d::with_canonical`] the 3D-aware joint cost
/// ([`joint_cost`]: feature distance plus weighted canonical-coordinate distance).
pub struct Transfer2d<'a> {
    collection: &'a Collection,
    /// `None` for a matcher that only guesses by bbox ([`Transfer2d::for_run`] with [`Method::Bbox`]).
    extractor: Option<&'a FeatureExtractor>,
    crop_margin: f64,
    cache: std::collections::HashMap<String, std::rc::Rc<FeaturedImage>>,
    masks: std::collections::HashMap<String, std::path::PathBuf>,
    canonical: Option<Canonical>,
    /// What [`Transfer2d::transfer_by_method`] does: [`Method::Bbox`], or feature matching (joint
    /// when built with canonical maps).
    method: Method,
}

impl<'a> Transfer2d<'a> {
    /// A baseline over `collection` with `extractor`'s features and the crop padding `crop_margin`.
    pub fn new(collection: &'a Collection, extractor: &'a FeatureExtractor, crop_margin: f64) -> Self {
        Self::with_parts(collection, Some(extractor), crop_margin, Method::Features)
    }

    fn with_parts(collection: &'a Collection, extractor: Option<&'a FeatureExtractor>, crop_margin: f64, method: Method) -> Self {
        Self { collection, extractor, crop_margin, cache: Default::default(), masks: Default::default(), canonical: None, method }
    }

    /// The matcher that `congeal transfer` and the node's transfer service use for `method` over the
    /// run in `run_dir` (collection `collection`): the run's masks, and for [`Method::Joint`] its
    /// forward maps with `nocs_weight`. `extractor` may be `None` for [`Method::Bbox`], the only
    /// method that needs no features; [`Method::Canonical`] has no matcher (see [`transfer`]).
    pub fn for_run(
        collection: &'a Collection,
        extractor: Option<&'a FeatureExtractor>,
        run: &RunResult,
        run_dir: &Path,
        crop_margin: f64,
        method: Method,
        nocs_weight: f32,
    ) -> Result<Self> {
        if method == Method::Joint && !(nocs_weight.is_finite() && nocs_weight >= 0.0) {
            return Err(Error::InvalidInput(format!(
                "the canonical-coordinate weight must be finite and >= 0, got {nocs_weight}"
            )));
        }
        if method == Method::Canonical {
            return Err(Error::InvalidInput("the 3d method maps through the run's coordinate maps, not a matcher".into()));
        }
        let extractor = if method.needs_features() {
            Some(extractor.ok_or_else(|| Error::InvalidInput("the 2d and joint transfer methods need DINOv2 features".into()))?)
        } else {
            None
        };
        let matcher = Self::with_parts(collection, extractor, crop_margin, method).with_run_masks(run, run_dir);
        Ok(match method {
            Method::Joint => matcher.with_canonical(run, run_dir, nocs_weight),
            _ => matcher,
        })
    }

    /// Transfers with the method the matcher was built for: [`Transfer2d::transfer_bbox`] for
    /// [`Method::Bbox`], feature matching ([`Transfer2d::transfer`], joint with canonical maps) otherwise.
    pub fn transfer_by_method(&mut self, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
        match self.method {
            Method::Bbox => self.transfer_bbox(src, dst, points),
            _ => self.transfer(src, dst, points),
        }
    }

    /// The feature extractor, or an error for a bbox-only matcher.
    fn extractor(&self) -> Result<&'a FeatureExtractor> {
        self.extractor.ok_or_else(|| Error::InvalidInput("this matcher was built without DINOv2 features (bbox only)".into()))
    }

    /// Matches with the joint cost: the forward maps (`nocs/NNN.png`) of the run in `run_dir` add
    /// `nocs_weight` x the canonical-coordinate distance to the feature distance.
    pub fn with_canonical(mut self, run: &RunResult, run_dir: &Path, nocs_weight: f32) -> Self {
        self.method = Method::Joint;
        self.canonical =
            Some(Canonical { run_dir: run_dir.to_path_buf(), run: run.clone(), nocs_weight, maps: Default::default() });
        self
    }

    /// The forward map of `file` when matching jointly; `None` for the 2D baseline.
    fn nocs_map(&mut self, file: &str) -> Result<Option<std::rc::Rc<NocsMap>>> {
        let Some(c) = &mut self.canonical else { return Ok(None) };
        if let Some(m) = c.maps.get(file) {
            return Ok(Some(m.clone()));
        }
        let image = find_image(&c.run_dir, &c.run, file)?;
        let nocs = image.nocs.as_ref().ok_or_else(|| Error::Run {
            path: c.run_dir.join("result.json"),
            message: format!("image {file} has no NOCS map (run with output.nocs: true)"),
        })?;
        let map = std::rc::Rc::new(NocsMap::load_for_image(&c.run_dir.join(nocs), image.size)?);
        c.maps.insert(file.to_string(), map.clone());
        Ok(Some(map))
    }

    /// Uses the masks a run kept for images without a mask file (`ImageResult::mask`, relative to
    /// `run_dir`), so mask-less collections work as the run saw them.
    pub fn with_run_masks(mut self, run: &RunResult, run_dir: &Path) -> Self {
        self.masks = run.images.iter().filter_map(|im| im.mask.as_ref().map(|m| (im.file.clone(), run_dir.join(m)))).collect();
        self
    }

    /// An image of the collection with the mask the run used.
    fn load(&self, file: &str) -> Result<crate::collection::LoadedImage> {
        let collection = self.collection;
        let i = collection.index_of(file).ok_or_else(|| Error::Collection {
            path: collection.root.clone(),
            message: format!("image {file} is not in the collection"),
        })?;
        match self.masks.get(file) {
            Some(mask_path) => {
                let rgb = crate::collection::load_rgb(&collection.rgb_path(i)?)?;
                let mask = crate::collection::load_mask(mask_path)?;
                if mask.dimensions() != rgb.dimensions() {
                    return Err(Error::Mask {
                        path: mask_path.clone(),
                        message: "the run's mask does not match the image size".into(),
                    });
                }
                Ok(crate::collection::LoadedImage { rgb, mask })
            }
            None => collection.load_image(i),
        }
    }

    /// The "same spot in the box" guess, a floor for any transfer: each source point keeps its
    /// relative position in the source mask's bbox and lands at that position of the target's.
    /// Points off the source mask (beyond [`SNAP_FRACTION`]) give `None`.
    pub fn transfer_bbox(&mut self, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
        let (a, b) = (self.load(src)?, self.load(dst)?);
        let boxes = (crate::collection::mask_bbox(&a.mask), crate::collection::mask_bbox(&b.mask));
        let (Some(ba), Some(bb)) = boxes else { return Ok(vec![None; points.len()]) };
        Ok(points
            .iter()
            .map(|p| {
                let p = snap_to_mask(&a.mask, &ba, *p)?;
                let u = (p[0] - ba.x_min) / ba.width().max(1.0);
                let v = (p[1] - ba.y_min) / ba.height().max(1.0);
                Some([bb.x_min + u * bb.width().max(1.0), bb.y_min + v * bb.height().max(1.0)])
            })
            .collect())
    }

    fn featured(&mut self, file: &str) -> Result<std::rc::Rc<FeaturedImage>> {
        if let Some(f) = self.cache.get(file) {
            return Ok(f.clone());
        }
        let image = self.load(file)?;
        let bbox = crate::collection::mask_bbox(&image.mask)
            .ok_or_else(|| Error::Mask { path: file.into(), message: "mask is empty".into() })?;
        let extractor = self.extractor()?;
        let crop = SquareCrop::around(&bbox, self.crop_margin, extractor.input_size())?;
        let features = extractor.extract(&[masked_crop(&image.rgb, &image.mask, &crop)])?.remove(0);
        let f = std::rc::Rc::new(FeaturedImage { image, bbox, crop, features });
        self.cache.insert(file.to_string(), f.clone());
        Ok(f)
    }

    /// Transfers `points` from `src` to `dst` (see [`transfer_2d`]).
    pub fn transfer(&mut self, src: &str, dst: &str, points: &[[f64; 2]]) -> Result<Vec<Option<[f64; 2]>>> {
        let fa = self.featured(src)?;
        let fb = self.featured(dst)?;
        let (na, nb) = (self.nocs_map(src)?, self.nocs_map(dst)?);
        let weight = self.canonical.as_ref().map_or(0.0, |c| c.nocs_weight);
        let size = self.extractor()?.input_size() as f64;
        let unit = |crop: &SquareCrop, p: [f64; 2]| {
            let c = crop.crop_from_image(nalgebra::Point2::new(p[0], p[1]));
            [(c.x + 0.5) / size, (c.y + 0.5) / size]
        };
        let (a, b) = (&fa.image, &fb.image);
        // Target candidates: every mask pixel, at its position in the target's feature crop.
        let matcher = PixelMatcher::new(
            &fb.features,
            b.mask.enumerate_pixels().filter(|(_, _, v)| v[0] >= 128).map(|(x, y, _)| {
                let p = [x as f64, y as f64];
                (p, unit(&fb.crop, p), nb.as_ref().and_then(|m| m.at(p[0], p[1])))
            }),
        );
        Ok(points
            .iter()
            .map(|p| {
                let p = &snap_to_mask(&a.mask, &fa.bbox, *p)?;
                let u = unit(&fa.crop, *p);
                let q = fa.features.sample_normalised(u[0], u[1]);
                let src_nocs = na.as_ref().and_then(|m| m.at(p[0], p[1]));
                matcher.best(&q, src_nocs, weight)
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

    /// A synthetic pair where the feature-nearest pixel (A: cos 0.9, 0.5 away in NOCS) and the
    /// NOCS-nearest pixel (B: cos 0.6, same NOCS) disagree: the joint cost picks A while
    /// `0.1 + 0.5 w < 0.4` (w < 0.6) and B beyond, as documented.
    #[test]
    fn joint_reverse_map_follows_the_weighting() {
        let unit = |c: f32| vec![c, (1.0 - c * c).sqrt()];
        let query = vec![1.0, 0.0];
        let src = Some([0.5, 0.5, 0.5]);
        let targets = vec![
            ([10.0, 0.0], unit(0.9), Some([0.5, 0.5, 1.0])),
            ([20.0, 0.0], unit(0.6), Some([0.5, 0.5, 0.5])),
            ([30.0, 0.0], unit(0.95), None),
        ];
        // w = 0: plain feature matching (Eq. 18) -> the most similar feature, even without NOCS.
        assert_eq!(best_match(&query, src, &targets, 0.0), Some([30.0, 0.0]));
        let ab = &targets[..2];
        assert_eq!(best_match(&query, src, ab, 0.0), Some([10.0, 0.0]));
        assert_eq!(best_match(&query, src, ab, 0.5), Some([10.0, 0.0]));
        assert_eq!(best_match(&query, src, ab, 0.7), Some([20.0, 0.0]));
        assert_eq!(best_match(&query, src, ab, 100.0), Some([20.0, 0.0]));
        // A pixel without NOCS (C) is charged MISSING_NOCS_DISTANCE: 0.05 + 0.87 w vs B's 0.4.
        let bc = &targets[1..];
        assert_eq!(best_match(&query, src, bc, 0.3), Some([30.0, 0.0]));
        assert_eq!(best_match(&query, src, bc, 0.45), Some([20.0, 0.0]));
        // A source point without NOCS matches by features alone, whatever the weight.
        assert_eq!(best_match(&query, None, ab, 100.0), Some([10.0, 0.0]));
        assert!((joint_cost(0.6, src, Some([0.5, 0.5, 0.5]), 3.0) - 0.4).abs() < 1e-6);
        assert_eq!(best_match(&query, src, &[], 1.0), None);
    }

    /// The fast matcher (taps + neighbour dot products) picks what plain per-pixel features pick
    /// ([`best_match`] over [`FeatureGrid::sample_normalised`]), on random grids with a zero token,
    /// positions beyond the token centres, pixels without NOCS and several weights.
    #[test]
    fn pixel_matcher_agrees_with_per_pixel_features() {
        let mut seed = 12345u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32
        };
        let (w, h, c) = (5, 4, 8);
        let mut data: Vec<f32> = (0..w * h * c).map(|_| rand() - 0.5).collect();
        data[7 * c..8 * c].iter_mut().for_each(|v| *v = 0.0);
        let grid = FeatureGrid::new(w, h, c, data).unwrap();
        let targets: Vec<PixelTarget> = (0..300)
            .map(|i| {
                let u = [rand() as f64 * 1.2 - 0.1, rand() as f64 * 1.2 - 0.1];
                let nocs = (i % 5 != 0).then(|| [rand(), rand(), rand()]);
                ([i as f64, 0.0], u, nocs)
            })
            .collect();
        let matcher = PixelMatcher::new(&grid, targets.iter().copied());
        let reference: Vec<MatchTarget> = targets.iter().map(|(p, u, n)| (*p, grid.sample_normalised(u[0], u[1]), *n)).collect();
        let cost_of = |q: &[f32], src: Option<[f32; 3]>, p: [f64; 2], weight: f32| {
            let (_, f, n) = reference.iter().find(|t| t.0 == p).unwrap();
            joint_cost(f.iter().zip(q).map(|(a, b)| a * b).sum(), src, *n, weight)
        };
        let mut same = 0;
        for k in 0..60 {
            let q = grid.sample_normalised(rand() as f64, rand() as f64);
            let src = (k % 4 != 0).then(|| [rand(), rand(), rand()]);
            for weight in [0.0, 0.5, 3.0] {
                let fast = matcher.best(&q, src, weight).unwrap();
                let slow = best_match(&q, src, &reference, weight).unwrap();
                if fast == slow {
                    same += 1;
                } else {
                    // Only a tie within float rounding may differ.
                    assert!(
                        (cost_of(&q, src, fast, weight) - cost_of(&q, src, slow, weight)).abs() < 1e-5,
                        "query {k}, w {weight}"
                    );
                }
            }
        }
        assert!(same >= 175, "{same} of 180 identical");
        assert_eq!(PixelMatcher::new(&grid, std::iter::empty()).best(&[0.0; 8], None, 1.0), None);
    }

    #[test]
    fn points_just_off_the_object_snap_to_its_nearest_pixel() {
        // A 10 x 10 image whose object is the square 4..=6 x 4..=6.
        let on = |x: u32, y: u32| (4..=6).contains(&x) && (4..=6).contains(&y);
        // On the object: the point itself, sub-pixel position kept.
        assert_eq!(snap_to_object([5.2, 4.9], 10, 10, 2.0, on), Some([5.2, 4.9]));
        // 1.5 px left of the square's left column: its nearest pixel, straight right.
        assert_eq!(snap_to_object([2.5, 5.0], 10, 10, 2.0, on), Some([4.0, 5.0]));
        // Off a corner: the corner pixel (distance sqrt(2)).
        assert_eq!(snap_to_object([7.0, 7.0], 10, 10, 1.5, on), Some([6.0, 6.0]));
        // Farther than allowed, or no snapping at all: nothing.
        assert_eq!(snap_to_object([7.0, 7.0], 10, 10, 1.4, on), None);
        assert_eq!(snap_to_object([2.5, 5.0], 10, 10, 0.0, on), None);
        // Outside the image but within reach of an object pixel on its border.
        let edge = |x: u32, _y: u32| x == 0;
        assert_eq!(snap_to_object([-1.0, 3.0], 10, 10, 1.5, edge), Some([0.0, 3.0]));
        assert_eq!(snap_to_object([f64::NAN, 3.0], 10, 10, 5.0, edge), None);
        assert_eq!(snap_to_object([40.0, 3.0], 10, 10, 5.0, edge), None);
    }

    #[test]
    fn transfer_methods_parse_by_name() {
        assert_eq!(Method::parse("").unwrap(), Method::Joint);
        assert_eq!(Method::parse(" 2D ").unwrap(), Method::Features);
        assert_eq!(Method::parse("3d").unwrap(), Method::Canonical);
        assert_eq!(Method::parse("bbox").unwrap(), Method::Bbox);
        let featured: Vec<&str> = Method::NAMES.iter().filter(|(_, m)| m.needs_features()).map(|(n, _)| *n).collect();
        assert_eq!(featured, ["joint", "2d"]);
        let e = Method::parse("nearest").unwrap_err().to_string();
        assert!(e.contains("`nearest`") && e.contains("joint, 3d, 2d, bbox"), "{e}");
        // A huge name is echoed cut short.
        let e = Method::parse(&"x".repeat(100_000)).unwrap_err().to_string();
        assert!(e.len() < 200 && e.contains("x..."), "{e}");
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
