//! Pose initialisation by analysis-by-synthesis (Algorithm 1, lines 4-7): render every candidate
//! (FoV x azimuth x elevation [x roll]) once per collection, crop each rendering to its silhouette's
//! tight bbox, and score it against each cropped input. The best `top_k` candidates of each image
//! become pose hypotheses in the *original* image's pixels.

use image::GrayImage;
use nalgebra::{Isometry3, Point2, Rotation3, Translation3, UnitQuaternion, Vector3};
use rayon::prelude::*;

use crate::collection::{mask_bbox, BorderContact, PixelBox, SquareCrop};
use crate::config::{FeaturesConfig, PoseInitConfig, PoseScore};
use crate::congeal::coord_maps::FeatureGrid;
use crate::congeal::features::{semantic_distance, token_mask, FeatureExtractor};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{pixel_grid, render_rays_host, CameraBatch, RenderWhat};
use crate::geometry::metrics::rotation_error_deg;
use crate::geometry::se3::orbit_camera_from_object;
use crate::geometry::Intrinsics;

/// Margin factor so a candidate's bounding sphere fits inside its frame.
const FRAME_FIT: f64 = 1.1;

/// One rendered candidate viewpoint.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Azimuth about object +y, degrees (0 = camera on the +z side).
    pub azimuth_deg: f64,
    /// Elevation above the object's x-z plane, degrees.
    pub elevation_deg: f64,
    /// Roll about the optical axis, degrees.
    pub roll_deg: f64,
    /// Vertical (= horizontal, square render) field of view, degrees.
    pub fov_deg: f64,
    /// Index of `fov_deg` in the configured FoV list.
    pub fov_group: usize,
    /// Candidate camera, normalised object frame.
    pub camera_from_object: Isometry3<f64>,
    /// Candidate intrinsics (square render).
    pub intrinsics: Intrinsics,
    /// Square crop around the rendered silhouette, render pixels.
    pub crop: SquareCrop,
    /// Tight bbox of the rendered silhouette, render pixels.
    pub bbox: PixelBox,
    /// Cropped silhouette resampled to `score_size^2`, in [0, 1].
    pub silhouette: Vec<f32>,
    /// Cropped colour resampled to `score_size^2`.
    pub colour: Vec<[f32; 3]>,
    /// DINOv2 features of the cropped rendering (semantic scoring; `None` until computed).
    pub features: Option<FeatureGrid>,
}

/// All candidates of a collection, rendered once.
#[derive(Clone, Debug)]
pub struct CandidateSet {
    /// The candidates (those whose silhouette is empty or clipped are dropped).
    pub candidates: Vec<Candidate>,
    /// Side of the square score raster.
    pub score_size: u32,
    /// Seconds spent rendering.
    pub render_seconds: f64,
    /// Seconds spent rendering and extracting candidate features.
    pub feature_seconds: f64,
}

/// A cropped input image ready for scoring.
#[derive(Clone, Debug)]
pub struct InputView {
    /// Image width, pixels.
    pub width: u32,
    /// Image height, pixels.
    pub height: u32,
    /// Tight bbox of the input mask, image pixels.
    pub bbox: PixelBox,
    /// Square crop around the input mask, image pixels.
    pub crop: SquareCrop,
    /// Cropped mask at `score_size^2`.
    pub silhouette: Vec<f32>,
    /// Cropped colour at `score_size^2`.
    pub colour: Vec<[f32; 3]>,
    /// Known intrinsics, when the collection or camera_info gives them.
    pub known_intrinsics: Option<Intrinsics>,
    /// DINOv2 features of the masked crop (semantic scoring; `None` until computed).
    pub features: Option<FeatureGrid>,
    /// The image sides the mask touches (the object is cut by the frame there).
    pub contact: BorderContact,
    /// For a truncated object (`contact.any()` and `truncation_aware`): the mask on a window over
    /// the whole image, where candidates are compared with the same cut.
    pub frame: Option<FrameView>,
}

/// A truncated input seen in its own image frame: its mask on a square raster covering the whole
/// image, and which raster pixels lie inside the image (outside, nothing is known).
#[derive(Clone, Debug)]
pub struct FrameView {
    /// Window over the whole image ([`SquareCrop::whole_image`]).
    pub window: SquareCrop,
    /// Image coordinates of the window's raster pixels, row-major.
    pub pixels: Vec<Point2<f64>>,
    /// Input mask on the raster, in [0, 1].
    pub mask: Vec<f32>,
    /// Fraction of each raster pixel inside the image.
    pub inside: Vec<f32>,
}

/// Where a candidate lands in a truncated input's image: the square its crop maps to, and the
/// silhouette IoU over the pixels inside the image.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// The candidate's crop window mapped into the input image (image pixels).
    pub crop: SquareCrop,
    /// Soft IoU with the input mask, over the image only.
    pub iou: f32,
}

/// A pose hypothesis for one image, in its original pixels.
#[derive(Clone, Debug)]
pub struct PoseHypothesis {
    /// camera_from_object, normalised object frame.
    pub camera_from_object: Isometry3<f64>,
    /// Intrinsics of the original image (known, or estimated from the candidate's FoV).
    pub intrinsics: Intrinsics,
    /// Candidate score (higher is better).
    pub score: f32,
    /// Appearance penalty used when choosing among refined hypotheses: `semantic_weight` x (semantic
    /// distance - the image's best), or the colour term of `iou_colour`; 0 for plain IoU.
    pub penalty: f32,
    /// Index of the candidate it came from.
    pub candidate: usize,
}

/// Camera distance at which a shape of bounding radius `radius` fills a frame of `fov_deg`.
pub fn candidate_radius(bounding_radius: f64, fov_deg: f64) -> f64 {
    bounding_radius * FRAME_FIT / (0.5 * fov_deg.to_radians()).sin()
}

/// Renders every candidate of the grid in `cfg` once.
pub fn render_candidates(field: &CanonicalField, cfg: &PoseInitConfig, chunk_rays: usize) -> Result<CandidateSet> {
    let start = std::time::Instant::now();
    let size = cfg.render_size;
    let mut specs = Vec::new();
    for (g, &fov) in cfg.fovs_deg.iter().enumerate() {
        let radius = candidate_radius(field.bounding_radius as f64, fov);
        let intrinsics = Intrinsics::from_fov_y(fov, size, size)?;
        for e in 0..cfg.elevations {
            let elevation = if cfg.elevations == 1 {
                0.5 * (cfg.elevation_min_deg + cfg.elevation_max_deg)
            } else {
                cfg.elevation_min_deg + (cfg.elevation_max_deg - cfg.elevation_min_deg) * e as f64 / (cfg.elevations - 1) as f64
            };
            for a in 0..cfg.azimuths {
                let azimuth = -180.0 + 360.0 * a as f64 / cfg.azimuths as f64;
                for &roll in &cfg.rolls_deg {
                    let orbit = orbit_camera_from_object(azimuth, elevation, radius);
                    let roll_rot = UnitQuaternion::from_axis_angle(&Vector3::z_axis(), roll.to_radians());
                    let pose = Isometry3::from_parts(Translation3::identity(), roll_rot) * orbit;
                    specs.push((azimuth, elevation, roll, fov, g, pose, intrinsics));
                }
            }
        }
    }
    let device = field.device().clone();
    let pixels_one = pixel_grid(size, size, &device)?;
    let per_batch = (chunk_rays / (size * size) as usize).max(1);
    let mut candidates = Vec::with_capacity(specs.len());
    for batch in specs.chunks(per_batch) {
        let poses: Vec<_> = batch.iter().map(|s| s.5).collect();
        let intr: Vec<_> = batch.iter().map(|s| s.6).collect();
        let cams = CameraBatch::from_poses(&poses, &intr, &device)?;
        let pixels = pixels_one.broadcast_as((batch.len(), (size * size) as usize, 2))?.contiguous()?;
        let rays = cams.rays(&pixels)?;
        let what = RenderWhat { colour: cfg.score == PoseScore::IouColour, ..Default::default() };
        let host = render_rays_host(field, &rays, cfg.samples_per_ray, what, chunk_rays)?;
        let n_px = (size * size) as usize;
        for (k, spec) in batch.iter().enumerate() {
            let opacity = &host.opacity[k * n_px..(k + 1) * n_px];
            let colour = if host.colour.is_empty() { &[][..] } else { &host.colour[k * n_px..(k + 1) * n_px] };
            let Some((crop, bbox, silhouette, crop_colour)) = crop_rendering(opacity, colour, size, cfg) else {
                continue;
            };
            candidates.push(Candidate {
                azimuth_deg: spec.0,
                elevation_deg: spec.1,
                roll_deg: spec.2,
                fov_deg: spec.3,
                fov_group: spec.4,
                camera_from_object: spec.5,
                intrinsics: spec.6,
                crop,
                bbox,
                silhouette,
                colour: crop_colour,
                features: None,
            });
        }
    }
    if candidates.is_empty() {
        return Err(Error::Numerical("every candidate rendering was empty: is the field empty?".into()));
    }
    Ok(CandidateSet {
        candidates,
        score_size: cfg.score_size,
        render_seconds: start.elapsed().as_secs_f64(),
        feature_seconds: 0.0,
    })
}

/// A rendering cropped to its silhouette: the crop window, the silhouette's bbox, and the cropped
/// silhouette and colour.
type CroppedRendering = (SquareCrop, PixelBox, Vec<f32>, Vec<[f32; 3]>);

/// Crops a square rendering (row-major opacity, optional colour) to its silhouette; `None` when the
/// silhouette is empty or touches the frame (clipped).
fn crop_rendering(opacity: &[f32], colour: &[[f32; 3]], size: u32, cfg: &PoseInitConfig) -> Option<CroppedRendering> {
    let mask =
        GrayImage::from_fn(size, size, |x, y| image::Luma([if opacity[(y * size + x) as usize] >= 0.5 { 255 } else { 0 }]));
    let bbox = mask_bbox(&mask)?;
    let last = (size - 1) as f64;
    if bbox.x_min <= 0.0 || bbox.y_min <= 0.0 || bbox.x_max >= last || bbox.y_max >= last {
        return None;
    }
    let crop = SquareCrop::around(&bbox, cfg.crop_margin, cfg.score_size).ok()?;
    let silhouette = crop.resample_mask(&mask);
    let crop_colour = if colour.is_empty() {
        Vec::new()
    } else {
        let rgb = image::RgbImage::from_fn(size, size, |x, y| {
            let c = colour[(y * size + x) as usize];
            let a = opacity[(y * size + x) as usize].max(1e-4);
            image::Rgb(c.map(|v| ((v / a).clamp(0.0, 1.0) * 255.0).round() as u8))
        });
        crop.resample_rgb(&rgb)
    };
    Some((crop, bbox, silhouette, crop_colour))
}

/// Prepares an input image (its binary mask and colours) for scoring.
pub fn input_view(
    rgb: &image::RgbImage,
    mask: &GrayImage,
    known_intrinsics: Option<Intrinsics>,
    cfg: &PoseInitConfig,
) -> Result<InputView> {
    let bbox = mask_bbox(mask).ok_or_else(|| Error::Mask { path: "<input>".into(), message: "mask is empty".into() })?;
    let crop = SquareCrop::around(&bbox, cfg.crop_margin, cfg.score_size)?;
    let colour = if cfg.score == PoseScore::IouColour { crop.resample_rgb(rgb) } else { Vec::new() };
    let contact = BorderContact::of(&bbox, mask.width(), mask.height());
    let frame = (cfg.truncation_aware && contact.any()).then(|| {
        let window = SquareCrop::whole_image(mask.width(), mask.height(), cfg.frame_size);
        FrameView {
            pixels: window.sample_pixels(),
            mask: window.resample_mask(mask),
            inside: window.resample_inside(mask.width(), mask.height()),
            window,
        }
    });
    Ok(InputView {
        contact,
        frame,
        width: mask.width(),
        height: mask.height(),
        silhouette: crop.resample_mask(mask),
        colour,
        bbox,
        crop,
        known_intrinsics,
        features: None,
    })
}

/// Computes the DINOv2 features of the candidates in the FoV groups `groups` (all when `None`): each
/// candidate's crop window is rendered in colour at `features.render_size`, composited on black,
/// and resampled to the extractor's input size.
pub fn attach_candidate_features(
    set: &mut CandidateSet,
    field: &CanonicalField,
    extractor: &FeatureExtractor,
    fcfg: &FeaturesConfig,
    samples_per_ray: usize,
    chunk_rays: usize,
    groups: Option<&[usize]>,
) -> Result<()> {
    let start = std::time::Instant::now();
    let size = fcfg.render_size;
    let device = field.device().clone();
    let pixels_one = pixel_grid(size, size, &device)?;
    let wanted: Vec<usize> = (0..set.candidates.len())
        .filter(|&i| groups.is_none_or(|g| g.contains(&set.candidates[i].fov_group)))
        .filter(|&i| set.candidates[i].features.is_none())
        .collect();
    // As many renders as DINOv2 takes in one batch (render_rays_host bounds its own memory by chunk_rays).
    let per_batch = fcfg.batch.clamp(1, 64);
    for batch in wanted.chunks(per_batch) {
        let poses: Vec<_> = batch.iter().map(|&i| set.candidates[i].camera_from_object).collect();
        let intr: Vec<_> = batch
            .iter()
            .map(|&i| window_intrinsics(&set.candidates[i].intrinsics, &SquareCrop { size, ..set.candidates[i].crop }))
            .collect();
        let cams = CameraBatch::from_poses(&poses, &intr, &device)?;
        let pixels = pixels_one.broadcast_as((batch.len(), (size * size) as usize, 2))?.contiguous()?;
        let rays = cams.rays(&pixels)?;
        let what = RenderWhat { colour: true, ..Default::default() };
        let host = render_rays_host(field, &rays, samples_per_ray, what, chunk_rays)?;
        let n_px = (size * size) as usize;
        let crops: Vec<Vec<[f32; 3]>> = (0..batch.len())
            .map(|k| resize_square(&host.colour[k * n_px..(k + 1) * n_px], size, extractor.input_size()))
            .collect();
        let feats = extractor.extract(&crops)?;
        for (&i, f) in batch.iter().zip(feats) {
            set.candidates[i].features = Some(f);
        }
    }
    set.feature_seconds = start.elapsed().as_secs_f64();
    Ok(())
}

/// Intrinsics that render the square `window` of an image with intrinsics `k` as a
/// `window.size²` image.
pub fn window_intrinsics(k: &Intrinsics, window: &SquareCrop) -> Intrinsics {
    let s = window.size as f64 / window.side;
    let h = 0.5 * (window.size as f64 - 1.0);
    Intrinsics {
        fx: k.fx * s,
        fy: k.fy * s,
        cx: (k.cx - window.centre_x) * s + h,
        cy: (k.cy - window.centre_y) * s + h,
        width: window.size,
        height: window.size,
    }
}

/// Bilinear resampling of a square row-major RGB raster (pixel-centre aligned).
pub fn resize_square(src: &[[f32; 3]], from: u32, to: u32) -> Vec<[f32; 3]> {
    if from == to {
        return src.to_vec();
    }
    let (n, m) = (from as usize, to as usize);
    let scale = from as f64 / to as f64;
    let mut out = Vec::with_capacity(m * m);
    for y in 0..m {
        let sy = ((y as f64 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f64);
        let (y0, fy) = (sy.floor() as usize, (sy - sy.floor()) as f32);
        let y1 = (y0 + 1).min(n - 1);
        for x in 0..m {
            let sx = ((x as f64 + 0.5) * scale - 0.5).clamp(0.0, (n - 1) as f64);
            let (x0, fx) = (sx.floor() as usize, (sx - sx.floor()) as f32);
            let x1 = (x0 + 1).min(n - 1);
            let px = |yy: usize, xx: usize| src.get(yy * n + xx).copied().unwrap_or([0.0; 3]);
            let (a, b, c, d) = (px(y0, x0), px(y0, x1), px(y1, x0), px(y1, x1));
            out.push(std::array::from_fn(|k| {
                (a[k] * (1.0 - fx) + b[k] * fx) * (1.0 - fy) + (c[k] * (1.0 - fx) + d[k] * fx) * fy
            }));
        }
    }
    out
}

/// The FoV groups that inputs with known intrinsics will be scored against; `None` when some input
/// has no intrinsics (then every group is searched).
pub fn needed_fov_groups(set: &CandidateSet, inputs: &[InputView], cfg: &PoseInitConfig) -> Option<Vec<usize>> {
    if !cfg.use_known_intrinsics {
        return None;
    }
    let mut groups = Vec::new();
    for input in inputs {
        if input.frame.is_some() {
            // A truncated object's visible crop says nothing about its angular size: every group.
            return None;
        }
        let k = input.known_intrinsics?;
        let g = best_fov_group(set, input, &k, cfg.fovs_deg.len());
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    Some(groups)
}

/// Soft IoU of two equally sized rasters in [0, 1].
pub fn soft_iou(a: &[f32], b: &[f32]) -> f32 {
    let (mut inter, mut sum) = (0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        inter += x * y;
        sum += x + y;
    }
    let union = sum - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// Colour distance of two crops over the pixels inside both silhouettes, on chromaticity (colour
/// divided by brightness, so shading drops out) relative to each crop's mean chromaticity over its
/// silhouette (so the light's tint drops out). 0 = same hue pattern; larger = different patterns
/// (e.g. white cushions on the front of a beige sofa versus its plain back, a duck's orange beak).
pub fn colour_distance(sil_a: &[f32], col_a: &[[f32; 3]], sil_b: &[f32], col_b: &[[f32; 3]]) -> f32 {
    let n = sil_a.len().min(sil_b.len()).min(col_a.len()).min(col_b.len());
    let chroma = |c: &[f32; 3]| {
        let s = c[0] + c[1] + c[2] + 0.03;
        [c[0] / s, c[1] / s, c[2] / s]
    };
    let mean = |sil: &[f32], col: &[[f32; 3]]| {
        let (mut m, mut w) = ([0.0f32; 3], 0.0f32);
        for i in 0..n {
            if sil[i] > 0.5 {
                let q = chroma(&col[i]);
                for c in 0..3 {
                    m[c] += q[c];
                }
                w += 1.0;
            }
        }
        m.map(|v| v / w.max(1.0))
    };
    let (ma, mb) = (mean(sil_a, col_a), mean(sil_b, col_b));
    let (mut total, mut count) = (0.0f32, 0.0f32);
    for i in 0..n {
        if sil_a[i] > 0.5 && sil_b[i] > 0.5 {
            let (p, q) = (chroma(&col_a[i]), chroma(&col_b[i]));
            for c in 0..3 {
                total += ((p[c] - ma[c]) - (q[c] - mb[c])).abs();
            }
            count += 1.0;
        }
    }
    if count == 0.0 {
        1.0
    } else {
        total / count
    }
}

/// The semantic distance (Eq. 7 over the union of foregrounds) between an input and a candidate;
/// `None` when either lacks features.
pub fn candidate_semantic_distance(input: &InputView, cand: &Candidate, score_size: u32) -> Option<f32> {
    let (a, b) = (input.features.as_ref()?, cand.features.as_ref()?);
    let tokens = a.width;
    let fa = token_mask(&input.silhouette, score_size, tokens);
    let fb = token_mask(&cand.silhouette, score_size, tokens);
    Some(semantic_distance(a, &fa, b, &fb))
}

/// Scores one input against one candidate (higher is better); `None` when the score needs features
/// that are missing.
pub fn score(input: &InputView, cand: &Candidate, cfg: &PoseInitConfig) -> Option<f32> {
    let iou = || soft_iou(&input.silhouette, &cand.silhouette);
    match cfg.score {
        PoseScore::Iou => Some(iou()),
        PoseScore::IouColour => {
            Some(iou() - cfg.colour_weight * colour_distance(&input.silhouette, &input.colour, &cand.silhouette, &cand.colour))
        }
        PoseScore::Semantic => candidate_semantic_distance(input, cand, cfg.score_size).map(|d| -d),
        PoseScore::SemanticIou => {
            candidate_semantic_distance(input, cand, cfg.score_size).map(|d| iou() - cfg.semantic_weight * d)
        }
    }
}

/// Scales tried for a candidate placed in a truncated input when no uncut pair of sides fixes it.
const PLACEMENT_SCALES: usize = 12;
/// The largest of those scales, relative to the smallest that covers the visible part.
const PLACEMENT_SCALE_RANGE: f64 = 3.0;
/// Positions tried along an axis on which the object is cut at both ends.
const PLACEMENT_OFFSETS: usize = 7;

/// Places a candidate in a truncated input's image: the visible mask edges on the sides the frame
/// does not cut are the object's own edges, so they fix the scale and position of the candidate's
/// silhouette where they can; what they leave free (scale when no axis is seen whole, position along
/// an axis cut at both ends) is searched. Each placement is scored by the soft IoU with the input
/// mask over the pixels inside the image (outside it the input says nothing); the best one wins.
/// `None` when the input has no frame view or the candidate's silhouette is degenerate.
pub fn place_candidate(input: &InputView, frame: &FrameView, cand: &Candidate, score_size: u32) -> Option<Placement> {
    let vis = &input.bbox;
    let contact = &input.contact;
    // Pixel-area edges of the visible mask (image) and of the candidate's silhouette relative to
    // its crop centre (render pixels).
    let (vl, vr, vt, vb) = (vis.x_min - 0.5, vis.x_max + 0.5, vis.y_min - 0.5, vis.y_max + 0.5);
    let cb = &cand.bbox;
    let (ccx, ccy) = (cand.crop.centre_x, cand.crop.centre_y);
    let (cl, cr, ct, cbt) = (cb.x_min - 0.5 - ccx, cb.x_max + 0.5 - ccx, cb.y_min - 0.5 - ccy, cb.y_max + 0.5 - ccy);
    let (cw, ch) = (cr - cl, cbt - ct);
    if !(cw > 0.0 && ch > 0.0) {
        return None;
    }
    let s_min = ((vr - vl) / cw).max((vb - vt) / ch);
    let sx = (!contact.left && !contact.right).then(|| (vr - vl) / cw);
    let sy = (!contact.top && !contact.bottom).then(|| (vb - vt) / ch);
    let scales: Vec<f64> = match (sx, sy) {
        (Some(a), Some(b)) => vec![(a * b).sqrt()],
        (Some(a), None) | (None, Some(a)) => vec![a],
        (None, None) => {
            (0..PLACEMENT_SCALES).map(|k| s_min * PLACEMENT_SCALE_RANGE.powf(k as f64 / (PLACEMENT_SCALES - 1) as f64)).collect()
        }
    };
    // Centre positions along one axis for scale `s`: uncut edges meet the candidate's edges; an
    // axis cut at both ends keeps the candidate covering the visible extent.
    let positions = |s: f64, lo_cut: bool, hi_cut: bool, vlo: f64, vhi: f64, clo: f64, chi: f64| -> Vec<f64> {
        match (lo_cut, hi_cut) {
            (false, false) => vec![0.5 * ((vlo - s * clo) + (vhi - s * chi))],
            (false, true) => vec![vlo - s * clo],
            (true, false) => vec![vhi - s * chi],
            (true, true) => {
                let (a, b) = (vhi - s * chi, vlo - s * clo);
                if b <= a {
                    vec![0.5 * (a + b)]
                } else {
                    (0..PLACEMENT_OFFSETS).map(|k| a + (b - a) * k as f64 / (PLACEMENT_OFFSETS - 1) as f64).collect()
                }
            }
        }
    };
    let n = score_size as usize;
    let sample = |u: f64, v: f64| -> f32 {
        // Bilinear lookup of the candidate silhouette at unit crop coordinates (0 outside).
        let (x, y) = (u * n as f64 - 0.5, v * n as f64 - 0.5);
        if !(x > -1.0 && y > -1.0 && x < n as f64 && y < n as f64) {
            return 0.0;
        }
        let (x0, y0) = (x.floor(), y.floor());
        let (fx, fy) = ((x - x0) as f32, (y - y0) as f32);
        let at = |xx: f64, yy: f64| -> f32 {
            if xx < 0.0 || yy < 0.0 || xx >= n as f64 || yy >= n as f64 {
                0.0
            } else {
                cand.silhouette[yy as usize * n + xx as usize]
            }
        };
        (at(x0, y0) * (1.0 - fx) + at(x0 + 1.0, y0) * fx) * (1.0 - fy)
            + (at(x0, y0 + 1.0) * (1.0 - fx) + at(x0 + 1.0, y0 + 1.0) * fx) * fy
    };
    let mut best: Option<Placement> = None;
    for &s in &scales {
        let side = s * cand.crop.side;
        for &x in &positions(s, contact.left, contact.right, vl, vr, cl, cr) {
            for &y in &positions(s, contact.top, contact.bottom, vt, vb, ct, cbt) {
                let (mut inter, mut sum) = (0f32, 0f32);
                for ((p, &m), &w) in frame.pixels.iter().zip(&frame.mask).zip(&frame.inside) {
                    if w <= 0.0 {
                        continue;
                    }
                    let c = sample((p.x - x) / side + 0.5, (p.y - y) / side + 0.5);
                    inter += w * m * c;
                    sum += w * (m + c);
                }
                let union = sum - inter;
                let iou = if union > 0.0 { inter / union } else { 0.0 };
                if best.is_none_or(|b| iou > b.iou) {
                    let crop = SquareCrop { centre_x: x, centre_y: y, side, size: input.crop.size };
                    best = Some(Placement { crop, iou });
                }
            }
        }
    }
    best
}

/// The semantic distance (Eq. 7) between a truncated input and a candidate placed in its image:
/// the candidate's tokens are looked up where the placement puts them in the input's feature
/// window; tokens outside the image do not count (nothing is seen there). `None` without features.
pub fn placed_semantic_distance(input: &InputView, cand: &Candidate, placed: &Placement, score_size: u32) -> Option<f32> {
    let (a, b) = (input.features.as_ref()?, cand.features.as_ref()?);
    let (ta, tb) = (a.width, b.width);
    let fg_a = token_mask(&input.silhouette, score_size, ta);
    let fg_b = token_mask(&cand.silhouette, score_size, tb);
    let c = a.channels.min(b.channels);
    let n = input.crop.size as f64;
    let (w, h) = (input.width as f64, input.height as f64);
    let (mut sum, mut count) = (0f32, 0u32);
    for ty in 0..a.height {
        for tx in 0..ta {
            let q = Point2::new((tx as f64 + 0.5) / ta as f64 * n - 0.5, (ty as f64 + 0.5) / a.height as f64 * n - 0.5);
            let p = input.crop.image_from_crop(q);
            if p.x < -0.5 || p.y < -0.5 || p.x >= w - 0.5 || p.y >= h - 0.5 {
                continue;
            }
            let u = (p.x - placed.crop.centre_x) / placed.crop.side + 0.5;
            let v = (p.y - placed.crop.centre_y) / placed.crop.side + 0.5;
            let token_b = (u >= 0.0 && v >= 0.0 && u < 1.0 && v < 1.0)
                .then(|| ((v * b.height as f64) as usize).min(b.height - 1) * tb + ((u * tb as f64) as usize).min(tb - 1));
            let ia = ty * ta + tx;
            let in_b = token_b.is_some_and(|k| fg_b.get(k).copied().unwrap_or(false));
            if !(fg_a.get(ia).copied().unwrap_or(false) || in_b) {
                continue;
            }
            let xa = &a.data[ia * a.channels..ia * a.channels + c];
            let dot = token_b.map_or(0.0, |k| {
                let xb = &b.data[k * b.channels..k * b.channels + c];
                xa.iter().zip(xb).map(|(p, q)| p * q).sum::<f32>()
            });
            sum += 1.0 - dot;
            count += 1;
        }
    }
    Some(if count == 0 { 1.0 } else { sum / count as f32 })
}

/// Scores a truncated input against a placed candidate (higher is better), as [`score`] does for
/// whole objects: the placement's IoU, the placed semantic distance, or both.
pub fn score_placed(
    input: &InputView,
    cand: &Candidate,
    placed: &Placement,
    cfg: &PoseInitConfig,
    score_size: u32,
) -> Option<f32> {
    match cfg.score {
        PoseScore::Iou | PoseScore::IouColour => Some(placed.iou),
        PoseScore::Semantic => placed_semantic_distance(input, cand, placed, score_size).map(|d| -d),
        PoseScore::SemanticIou => {
            placed_semantic_distance(input, cand, placed, score_size).map(|d| placed.iou - cfg.semantic_weight * d)
        }
    }
}

/// The best `cfg.top_k` pose hypotheses of each input, best first.
pub fn initialise_poses(set: &CandidateSet, inputs: &[InputView], cfg: &PoseInitConfig) -> Result<Vec<Vec<PoseHypothesis>>> {
    inputs.par_iter().map(|input| initialise_pose(set, input, cfg, None)).collect()
}

/// Features standing in for the candidates' own, by candidate index (e.g. category features lifted
/// from other images); `None` for a candidate leaves it without features.
pub type CandidateFeatures<'a> = &'a (dyn Fn(usize) -> Option<FeatureGrid> + Sync);

impl Candidate {
    /// This candidate with other features.
    pub fn with_features(&self, features: Option<FeatureGrid>) -> Candidate {
        Candidate {
            azimuth_deg: self.azimuth_deg,
            elevation_deg: self.elevation_deg,
            roll_deg: self.roll_deg,
            fov_deg: self.fov_deg,
            fov_group: self.fov_group,
            camera_from_object: self.camera_from_object,
            intrinsics: self.intrinsics,
            crop: self.crop,
            bbox: self.bbox,
            silhouette: self.silhouette.clone(),
            colour: self.colour.clone(),
            features,
        }
    }
}

/// The best `cfg.top_k` pose hypotheses of one input, best first; candidates are scored with
/// `features` in place of their own when given.
pub fn initialise_pose(
    set: &CandidateSet,
    input: &InputView,
    cfg: &PoseInitConfig,
    features: Option<CandidateFeatures>,
) -> Result<Vec<PoseHypothesis>> {
    let candidate = |i: usize| -> std::borrow::Cow<Candidate> {
        match features {
            Some(f) => std::borrow::Cow::Owned(set.candidates[i].with_features(f(i))),
            None => std::borrow::Cow::Borrowed(&set.candidates[i]),
        }
    };
    {
        {
            let group = match (cfg.use_known_intrinsics, input.known_intrinsics, &input.frame) {
                (true, Some(k), None) => Some(best_fov_group(set, input, &k, cfg.fovs_deg.len())),
                _ => None,
            };
            // Truncated objects: each candidate is first placed in the image (same cut), then scored.
            let placements: Vec<Option<Placement>> = match &input.frame {
                Some(frame) => set.candidates.iter().map(|c| place_candidate(input, frame, c, set.score_size)).collect(),
                None => Vec::new(),
            };
            let mut scored: Vec<(f32, usize)> = set
                .candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| group.is_none_or(|g| c.fov_group == g))
                .filter_map(|(i, _)| {
                    let c = candidate(i);
                    match &input.frame {
                        Some(_) => placements[i].and_then(|p| score_placed(input, &c, &p, cfg, set.score_size)).map(|s| (s, i)),
                        None => score(input, &c, cfg).map(|s| (s, i)),
                    }
                })
                .collect();
            if scored.is_empty() {
                return Err(Error::InvalidInput(
                    "no candidate could be scored (semantic scoring needs features of the input and candidates)".into(),
                ));
            }
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            // Distinct hypotheses: skip candidates within `min_separation_deg` of a better one, so
            // the top k are different modes (e.g. a symmetric object's front and back), not
            // neighbours of one.
            let mut picked: Vec<(f32, usize)> = Vec::with_capacity(cfg.top_k);
            for &(s, i) in &scored {
                if picked.len() == cfg.top_k {
                    break;
                }
                let rot = |k: usize| set.candidates[k].camera_from_object.rotation.to_rotation_matrix();
                let r = rot(i);
                if picked.iter().all(|&(_, j)| rotation_error_deg(&rot(j), &r) >= cfg.min_separation_deg) {
                    picked.push((s, i));
                }
            }
            let semantic: Vec<f32> = picked
                .iter()
                .map(|&(_, i)| {
                    let cand = candidate(i);
                    match placements.get(i).copied().flatten() {
                        Some(p) => placed_semantic_distance(input, &cand, &p, set.score_size),
                        None => candidate_semantic_distance(input, &cand, set.score_size),
                    }
                    .unwrap_or(0.0)
                })
                .collect();
            let best_semantic = semantic.iter().copied().fold(f32::INFINITY, f32::min);
            picked
                .iter()
                .zip(&semantic)
                .map(|(&(s, i), &d)| {
                    let known = if cfg.use_known_intrinsics { input.known_intrinsics } else { None };
                    let placed = placements.get(i).copied().flatten();
                    let crop = placed.map_or(input.crop, |p| p.crop);
                    let (pose, intrinsics) =
                        pose_from_placed_candidate(&set.candidates[i], &crop, input.width, input.height, known)?;
                    let penalty = match (cfg.score, placed) {
                        (PoseScore::Iou, _) => 0.0,
                        (PoseScore::IouColour, Some(_)) => 0.0,
                        (PoseScore::IouColour, None) => soft_iou(&input.silhouette, &set.candidates[i].silhouette) - s,
                        (PoseScore::Semantic | PoseScore::SemanticIou, _) => cfg.semantic_weight * (d - best_semantic),
                    };
                    Ok(PoseHypothesis { camera_from_object: pose, intrinsics, score: s, penalty, candidate: i })
                })
                .collect()
        }
    }
}

/// The FoV group whose candidates subtend the angle closest to the input's crop under known `k`,
/// so perspective distortion matches.
fn best_fov_group(set: &CandidateSet, input: &InputView, k: &Intrinsics, groups: usize) -> usize {
    let input_angle = input.crop.side / (0.5 * (k.fx + k.fy));
    let mut best = (f64::INFINITY, 0);
    for g in 0..groups {
        let angles: Vec<f64> =
            set.candidates.iter().filter(|c| c.fov_group == g).map(|c| c.crop.side / c.intrinsics.fx).collect();
        if angles.is_empty() {
            continue;
        }
        let mean = angles.iter().sum::<f64>() / angles.len() as f64;
        let d = (mean / input_angle).ln().abs();
        if d < best.0 {
            best = (d, g);
        }
    }
    best.1
}

/// Maps a candidate's crop onto an input's crop: the object's origin lands where the crops say,
/// its distance keeps the angular size (from known intrinsics) or the candidate's perspective
/// (estimating the focal length), and the camera turns so the object is seen along the same ray.
pub fn pose_from_candidate(
    cand: &Candidate,
    input: &InputView,
    known: Option<Intrinsics>,
) -> Result<(Isometry3<f64>, Intrinsics)> {
    pose_from_placed_candidate(cand, &input.crop, input.width, input.height, known)
}

/// [`pose_from_candidate`] for a candidate whose crop lands on the window `input_crop` of a
/// `width` x `height` image (the input's own crop, or a [`Placement`] for a truncated object).
pub fn pose_from_placed_candidate(
    cand: &Candidate,
    input_crop: &SquareCrop,
    width: u32,
    height: u32,
    known: Option<Intrinsics>,
) -> Result<(Isometry3<f64>, Intrinsics)> {
    let radius = cand.camera_from_object.translation.vector.norm();
    let scale = input_crop.side / cand.crop.side; // input px per render px
    let origin_render = cand
        .intrinsics
        .project(&(cand.camera_from_object * nalgebra::Point3::origin()))
        .ok_or_else(|| Error::Numerical("candidate origin behind camera".into()))?;
    let in_crop = cand.crop.crop_from_image(origin_render);
    let origin_image: Point2<f64> = input_crop.image_from_crop(in_crop);
    let intrinsics = match known {
        Some(k) => k,
        None => {
            let f = cand.intrinsics.fx * scale;
            let fov = 2.0 * (0.5 * height as f64 / f).atan().to_degrees();
            Intrinsics::from_fov_y(fov, width, height)?
        }
    };
    let f_input = 0.5 * (intrinsics.fx + intrinsics.fy);
    // Same angular size: radius * (crop side / f) must match.
    let distance = radius * (cand.crop.side / cand.intrinsics.fx) / (input_crop.side / f_input);
    let ray = intrinsics.ray_direction(&origin_image).normalize();
    let align = Rotation3::rotation_between(&Vector3::z(), &ray).unwrap_or_else(Rotation3::identity);
    let rotation = align * cand.camera_from_object.rotation.to_rotation_matrix();
    let pose = Isometry3::from_parts(Translation3::from(ray * distance), UnitQuaternion::from_rotation_matrix(&rotation));
    if !pose.to_homogeneous().iter().all(|v| v.is_finite()) {
        return Err(Error::Numerical("pose from candidate is not finite".into()));
    }
    Ok((pose, intrinsics))
}
