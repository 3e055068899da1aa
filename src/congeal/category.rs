//! Stage 4b, category-level alignment: congealing in its classic sense. After the first registration
//! against one template, the DINOv2 tokens of every aligned image are lifted onto the canonical shape
//! (each image at its pose; a surface point takes the image's token under its projection when the
//! image sees it), and every image is aligned again against what the *other* images put there: the
//! candidate views are scored against these category features instead of features of renders of one
//! instance, the best hypotheses are refined, and among them (and the current pose) the one with the
//! best silhouette fit minus category disagreement is kept. Rounds repeat while an image moves.
//!
//! A flipped image puts its features on the wrong side of the shape, but it is one of many: the
//! majority sets what each part of the canonical shape looks like, and the flipped image then agrees
//! better with the features of its true pose. Leaving each image out of the features it is scored
//! against keeps an image from confirming its own pose. When a whole instance is flipped the same way
//! it can still confirm itself (half and half, nothing settles it): `category.template_weight` adds
//! the template's own candidate views, whose poses are exact, as an anchor.
//!
//! Last, images whose silhouette the shape does not explain well (`category.feature_max_iou`) are
//! refined once more with a semantic term next to the IoU ([`FeatureTarget`]): the points of each
//! token of the shape seen at the pose carry the category feature there, and the pose moves them onto
//! image tokens that look alike. A different instance's silhouette pulls the template into a wrong tilt
//! (the silhouette of a taller or lower chair fits best tipped); the parts' appearance holds it.

use std::collections::BTreeMap;
use std::time::Instant;

use nalgebra::{Isometry3, Point2, Point3, UnitQuaternion, Vector3};
use rayon::prelude::*;
use tracing::{debug, info};

use crate::collection::SquareCrop;
use crate::config::{Config, PoseInitConfig};
use crate::congeal::coord_maps::FeatureGrid;
use crate::congeal::features::{semantic_distance, token_mask};
use crate::congeal::pipeline::{candidate_info, ProgressFn, Refined, Refiner, Registration};
use crate::congeal::pose_init::{initialise_pose, CandidateSet, InputView, PoseHypothesis};
use crate::congeal::pose_refine::FeatureTarget;
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{render_rays_host, CameraBatch, RenderWhat};
use crate::geometry::metrics::rotation_error_deg;
use crate::geometry::Intrinsics;

/// A camera looking at the canonical shape through a square window of its image.
#[derive(Clone, Copy, Debug)]
pub struct WindowCamera {
    /// camera_from_object, normalised object frame.
    pub camera_from_object: Isometry3<f64>,
    /// Intrinsics of the whole image.
    pub intrinsics: Intrinsics,
    /// The window (image pixels); its raster size is ignored.
    pub window: SquareCrop,
}

/// Object-frame surface points seen through `n x n` rays over each camera's window (row-major, `None`
/// where the ray misses: opacity below one half).
pub fn surface_points(
    field: &CanonicalField,
    cameras: &[WindowCamera],
    n: u32,
    samples_per_ray: usize,
    chunk_rays: usize,
) -> Result<Vec<Vec<Option<Point3<f64>>>>> {
    if cameras.is_empty() {
        return Ok(Vec::new());
    }
    let m = (n * n) as usize;
    let pixels: Vec<Vec<Point2<f64>>> = cameras.iter().map(|c| SquareCrop { size: n, ..c.window }.sample_pixels()).collect();
    let per_batch = (chunk_rays / m).max(1);
    let device = field.device().clone();
    let mut out = Vec::with_capacity(cameras.len());
    for (batch, batch_pixels) in cameras.chunks(per_batch).zip(pixels.chunks(per_batch)) {
        let poses: Vec<_> = batch.iter().map(|c| c.camera_from_object).collect();
        let intr: Vec<_> = batch.iter().map(|c| c.intrinsics).collect();
        let cams = CameraBatch::from_poses(&poses, &intr, &device)?;
        let flat: Vec<f32> = batch_pixels.iter().flatten().flat_map(|p| [p.x as f32, p.y as f32]).collect();
        let px = candle_core::Tensor::from_vec(flat, (batch.len(), m, 2), &device)?;
        let rays = cams.rays(&px)?;
        let what = RenderWhat { depth: true, ..Default::default() };
        let host = render_rays_host(field, &rays, samples_per_ray, what, chunk_rays)?;
        for (k, (cam, pix)) in batch.iter().zip(batch_pixels).enumerate() {
            // CameraBatch casts rays with the mean focal length; depth is along z.
            let f = 0.5 * (cam.intrinsics.fx + cam.intrinsics.fy);
            let object_from_camera = cam.camera_from_object.inverse();
            let points = pix
                .iter()
                .enumerate()
                .map(|(r, p)| {
                    let (a, z) = (host.opacity[k * m + r], host.depth.get(k * m + r).copied().unwrap_or(0.0) as f64);
                    (a >= 0.5 && z > 0.0 && z.is_finite()).then(|| {
                        let in_camera = Point3::new((p.x - cam.intrinsics.cx) / f * z, (p.y - cam.intrinsics.cy) / f * z, z);
                        object_from_camera * in_camera
                    })
                })
                .collect();
            out.push(points);
        }
    }
    Ok(out)
}

/// An aligned image as a source of features for the canonical shape.
#[derive(Clone, Debug)]
pub struct LiftSource<'a> {
    /// The image's camera, window = its feature window.
    pub camera: WindowCamera,
    /// Its DINOv2 tokens over the window.
    pub features: &'a FeatureGrid,
    /// Its mask on the window (`mask_size²`, row-major).
    pub mask: &'a [f32],
    /// Side of the mask raster.
    pub mask_size: u32,
    /// z-depth of the canonical shape at the image's pose on a `depth_size²` raster of the window
    /// (0 where the shape is not seen).
    pub depth: Vec<f32>,
    /// Side of the depth raster.
    pub depth_size: u32,
    /// How far behind the rendered depth a point still counts as seen (normalised units).
    pub depth_tolerance: f64,
    /// How much this image counts (its confidence in its pose), in [0, 1].
    pub weight: f32,
}

impl<'a> LiftSource<'a> {
    /// The source of an image at `camera` (its depth rendered from `field`).
    pub fn new(
        field: &CanonicalField,
        camera: WindowCamera,
        features: &'a FeatureGrid,
        mask: &'a [f32],
        mask_size: u32,
        config: &Config,
    ) -> Result<Self> {
        let c = &config.category;
        let n = c.depth_grid;
        let points = surface_points(field, &[camera], n, config.render.samples_per_ray, config.render.chunk_rays)?;
        let depth = points
            .first()
            .map(|pts| pts.iter().map(|p| p.map_or(0.0, |p| (camera.camera_from_object * p).z as f32)).collect())
            .unwrap_or_default();
        if mask.len() != (mask_size * mask_size) as usize {
            return Err(Error::InvalidInput(format!("mask of {} values for a {mask_size}² raster", mask.len())));
        }
        Ok(Self {
            camera,
            features,
            mask,
            mask_size,
            depth,
            depth_size: n,
            depth_tolerance: c.depth_tolerance as f64 * field.bounding_radius as f64,
            weight: 1.0,
        })
    }

    /// Unit-square window coordinates of an object point this image sees on the object (in front of
    /// the camera, inside the window and the mask, not hidden behind the shape); `None` otherwise.
    pub fn sees(&self, point_in_object: &Point3<f64>) -> Option<(f64, f64)> {
        let in_camera = self.camera.camera_from_object * point_in_object;
        let k = &self.camera.intrinsics;
        if in_camera.z <= 1e-9 {
            return None;
        }
        let f = 0.5 * (k.fx + k.fy);
        let pixel = Point2::new(f * in_camera.x / in_camera.z + k.cx, f * in_camera.y / in_camera.z + k.cy);
        let raster_index = |size: u32| -> Option<usize> {
            let q = SquareCrop { size, ..self.camera.window }.crop_from_image(pixel);
            let (x, y) = (q.x.round(), q.y.round());
            let last = (size - 1) as f64;
            (x >= 0.0 && y >= 0.0 && x <= last && y <= last).then(|| y as usize * size as usize + x as usize)
        };
        let d = self.depth.get(raster_index(self.depth_size)?).copied()? as f64;
        if d <= 0.0 || in_camera.z > d + self.depth_tolerance {
            return None;
        }
        if self.mask.get(raster_index(self.mask_size)?).copied()? < 0.5 {
            return None;
        }
        let q = SquareCrop { size: 1, ..self.camera.window }.crop_from_image(pixel);
        Some((q.x + 0.5, q.y + 0.5))
    }

    /// Adds `sign` x this image's weighted feature at each point it sees to `sum` (`points[t]` feed
    /// token `t`; `sum` is `tokens x channels`; grids normalise each token, so sums need no count).
    fn accumulate(&self, points: &[Vec<Point3<f64>>], sign: f32, sum: &mut [f32]) {
        let c = self.features.channels;
        let w = sign * self.weight;
        for (t, pts) in points.iter().enumerate() {
            for p in pts {
                if let Some((x, y)) = self.sees(p) {
                    self.features.add_bilinear(x, y, w, &mut sum[t * c..(t + 1) * c]);
                }
            }
        }
    }
}

/// Surface points grouped by token: the `tokens x tokens` tokens of a window, each with the points of
/// its `subsamples²` rays that hit the shape.
pub fn token_points(points: &[Option<Point3<f64>>], tokens: usize, subsamples: usize) -> Vec<Vec<Point3<f64>>> {
    let n = tokens * subsamples;
    let mut out = vec![Vec::with_capacity(subsamples * subsamples); tokens * tokens];
    for (r, p) in points.iter().enumerate().take(n * n) {
        if let Some(p) = p {
            let (x, y) = (r % n, r / n);
            out[(y / subsamples) * tokens + x / subsamples].push(*p);
        }
    }
    out
}

/// Which tokens the shape covers: at least half of their rays hit.
fn covered_tokens(points: &[Vec<Point3<f64>>], subsamples: usize) -> Vec<bool> {
    points.iter().map(|p| 2 * p.len() >= subsamples * subsamples).collect()
}

/// Features of the category on a window's tokens: the mean of the features the sources put on the
/// points of each token (leaving out the sources `exclude`), as a grid; tokens no source sees are zero.
pub fn category_grid(
    sources: &[LiftSource],
    points: &[Vec<Point3<f64>>],
    tokens: usize,
    exclude: &[usize],
) -> Result<FeatureGrid> {
    let c = sources.first().map_or(1, |s| s.features.channels);
    let mut sum = vec![0f32; tokens * tokens * c];
    for (i, s) in sources.iter().enumerate() {
        if !exclude.contains(&i) {
            s.accumulate(points, 1.0, &mut sum);
        }
    }
    FeatureGrid::new(tokens, tokens, c, sum)
}

/// The lifted features of every candidate view, summed over all sources (so one source can be left
/// out by subtracting its share).
struct CandidateSums<'a> {
    /// Surface points per candidate and token (candidate feature windows).
    points: &'a [Vec<Vec<Point3<f64>>>],
    /// Per candidate: `tokens² x channels` sums.
    sums: Vec<Vec<f32>>,
    tokens: usize,
    channels: usize,
}

impl<'a> CandidateSums<'a> {
    fn new(points: &'a [Vec<Vec<Point3<f64>>>], sources: &[LiftSource], tokens: usize) -> Self {
        let channels = sources.first().map_or(1, |s| s.features.channels);
        let sums = points
            .par_iter()
            .map(|pts| {
                let mut sum = vec![0f32; tokens * tokens * channels];
                for s in sources {
                    s.accumulate(pts, 1.0, &mut sum);
                }
                sum
            })
            .collect();
        Self { points, sums, tokens, channels }
    }

    /// Candidate `c`'s category features without the share of `source`.
    fn without(&self, c: usize, source: &LiftSource) -> Option<FeatureGrid> {
        let mut sum = self.sums.get(c)?.clone();
        source.accumulate(&self.points[c], -1.0, &mut sum);
        FeatureGrid::new(self.tokens, self.tokens, self.channels, sum).ok()
    }
}

/// Category semantic distance of image `j` at a pose: Eq. 7 between its tokens and the category
/// features the other sources put on the shape seen at that pose, over the union of the two
/// foregrounds.
fn category_distance(
    field: &CanonicalField,
    sources: &[LiftSource],
    exclude: &[usize],
    view: &InputView,
    score_size: u32,
    cameras: &[WindowCamera],
    config: &Config,
) -> Result<Vec<f32>> {
    let features = view.features.as_ref().ok_or_else(|| Error::InvalidInput("category alignment needs input features".into()))?;
    let tokens = features.width;
    let sub = config.category.subsamples as usize;
    let pts = surface_points(field, cameras, (tokens * sub) as u32, config.render.samples_per_ray, config.render.chunk_rays)?;
    let input_fg = token_mask(&view.silhouette, score_size, tokens);
    pts.iter()
        .map(|p| {
            let tp = token_points(p, tokens, sub);
            let grid = category_grid(sources, &tp, tokens, exclude)?;
            Ok(semantic_distance(features, &input_fg, &grid, &covered_tokens(&tp, sub)))
        })
        .collect()
}

/// The least weight an image keeps in the category features.
const MIN_CONFIDENCE: f32 = 0.05;

/// An image's weight in the category features from its margin (how much lower its pose's category
/// distance is than the best alternative's).
fn confidence_of(margin: f32, scale: f32) -> f32 {
    (margin / scale).clamp(MIN_CONFIDENCE, 1.0)
}

/// The pose turned half way round each object axis (about the object's origin): the hypotheses that
/// silhouettes confuse most (front/back, upside down), tried whatever the candidates say.
fn half_turns(current: &Refined) -> Vec<PoseHypothesis> {
    [Vector3::x_axis(), Vector3::y_axis(), Vector3::z_axis()]
        .iter()
        .map(|axis| {
            let turn = UnitQuaternion::from_axis_angle(axis, std::f64::consts::PI);
            PoseHypothesis {
                camera_from_object: Isometry3::from_parts(
                    current.camera_from_object.translation,
                    current.camera_from_object.rotation * turn,
                ),
                intrinsics: current.intrinsics,
                score: f32::NAN,
                penalty: 0.0,
                candidate: usize::MAX,
            }
        })
        .collect()
}

/// The template's own views as fixed feature sources (`category.template_weight`, spread over at
/// most `category.template_views` candidates that have DINOv2 features, evenly along the candidate
/// list): their poses are exact, so they anchor the category features. Empty when the weight is 0.
fn template_sources<'a>(field: &CanonicalField, set: &'a CandidateSet, config: &Config) -> Result<Vec<LiftSource<'a>>> {
    let c = &config.category;
    let featured: Vec<_> = set.candidates.iter().filter_map(|k| k.features.as_ref().map(|f| (k, f))).collect();
    if c.template_weight <= 0.0 || c.template_views == 0 || featured.is_empty() {
        return Ok(Vec::new());
    }
    let count = featured.len().min(c.template_views);
    let weight = c.template_weight / count as f32;
    (0..count)
        .map(|k| {
            let (cand, features) = featured[k * featured.len() / count];
            let camera =
                WindowCamera { camera_from_object: cand.camera_from_object, intrinsics: cand.intrinsics, window: cand.crop };
            let mut source = LiftSource::new(field, camera, features, &cand.silhouette, set.score_size, config)?;
            source.weight = weight;
            Ok(source)
        })
        .collect()
}

/// How much of `category.feature_weight` an image gets from its silhouette fit: none at
/// `feature_max_iou` and above (the shape explains the silhouette, which then pins the pose more
/// finely than 14-pixel tokens can), all of it from `feature_max_iou - 0.1` down.
fn feature_share(iou: f32, max_iou: f32) -> f32 {
    ((max_iou - iou) / 0.1).clamp(0.0, 1.0)
}

/// Every image as a feature source at its pose in `state`, weighted by its `confidence`, followed by
/// the template's `anchors`.
fn category_sources<'a>(
    field: &CanonicalField,
    views: &'a [InputView],
    state: &[Refined],
    confidence: &[f32],
    anchors: &[LiftSource<'a>],
    score_size: u32,
    config: &Config,
) -> Result<Vec<LiftSource<'a>>> {
    let mut sources: Vec<LiftSource> = views
        .iter()
        .zip(state)
        .zip(confidence)
        .map(|((v, s), w)| {
            let camera = WindowCamera { camera_from_object: s.camera_from_object, intrinsics: s.intrinsics, window: v.crop };
            let features = v.features.as_ref().ok_or_else(|| Error::InvalidInput("input without features".into()))?;
            let mut source = LiftSource::new(field, camera, features, &v.silhouette, score_size, config)?;
            source.weight = *w;
            Ok(source)
        })
        .collect::<Result<_>>()?;
    // The template's views come after the images (never left out: they are not images).
    sources.extend(anchors.iter().cloned());
    Ok(sources)
}

/// The semantic term of every image at its current pose ([`FeatureTarget::from_tokens`]): each token
/// of the shape seen through the image's feature window (at least half its rays hit) carries the
/// category feature the other sources put there.
fn feature_targets(
    field: &CanonicalField,
    views: &[InputView],
    state: &[Refined],
    sources: &[LiftSource],
    config: &Config,
) -> Result<Vec<Option<FeatureTarget>>> {
    let c = &config.category;
    let sub = c.subsamples as usize;
    views
        .par_iter()
        .enumerate()
        .map(|(i, v)| {
            let weight = c.feature_weight * feature_share(state[i].iou, c.feature_max_iou);
            let Some(image) = v.features.as_ref().filter(|_| weight > 0.0) else { return Ok(None) };
            let tokens = image.width;
            let camera = sources[i].camera;
            let pts =
                surface_points(field, &[camera], (tokens * sub) as u32, config.render.samples_per_ray, config.render.chunk_rays)?;
            let tp = token_points(pts.first().map(|p| p.as_slice()).unwrap_or(&[]), tokens, sub);
            let grid = category_grid(sources, &tp, tokens, &[i])?;
            let covered = covered_tokens(&tp, sub);
            Ok(FeatureTarget::from_tokens(&tp, &covered, &grid.data, image, v.crop, weight as f64))
        })
        .collect()
}

/// Stage 4b: re-aligns a registration against the category features of the collection (see the
/// module docs). Returns the registration unchanged when the stage is off (`category.rounds` 0), the
/// collection is smaller than `category.min_images`, or inputs lack features.
#[allow(clippy::too_many_arguments)]
pub fn align_category(
    field: &CanonicalField,
    set: &CandidateSet,
    views: &[InputView],
    masks: &[&image::GrayImage],
    mut registration: Registration,
    config: &Config,
    progress: ProgressFn,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Registration> {
    let c = &config.category;
    let have_features = views.iter().all(|v| v.features.is_some());
    if c.rounds == 0 || views.len() < c.min_images.max(2) || !have_features {
        return Ok(registration);
    }
    let start = Instant::now();
    let tokens = views.iter().find_map(|v| v.features.as_ref()).map_or(1, |f| f.width);
    let sub = c.subsamples as usize;
    let refiner = Refiner::new(field, views, masks, config)?;
    let score_size = set.score_size;
    // Surface points of every candidate's feature window (candidate render pixels), once.
    let candidate_cameras: Vec<WindowCamera> = set
        .candidates
        .iter()
        .map(|c| WindowCamera { camera_from_object: c.camera_from_object, intrinsics: c.intrinsics, window: c.crop })
        .collect();
    let n = (tokens * sub) as u32;
    let candidate_points: Vec<Vec<Vec<Point3<f64>>>> =
        surface_points(field, &candidate_cameras, n, config.pose_init.samples_per_ray, config.render.chunk_rays)?
            .iter()
            .map(|p| token_points(p, tokens, sub))
            .collect();
    let anchors = template_sources(field, set, config)?;
    let mut state: Vec<Refined> = (0..views.len())
        .map(|i| Refined {
            camera_from_object: registration.camera_from_object[i],
            intrinsics: registration.intrinsics[i],
            iou: registration.iou[i],
        })
        .collect();
    // Confidence of each image in its pose: how much better its pose agrees with the category than
    // the alternatives tried (all 1 in the first round).
    let mut confidence = vec![1.0f32; views.len()];
    // An image that would move back to a pose it left is ambiguous and returns to its first pose for good.
    let original = (state.clone(), registration.init_info.clone());
    let mut frozen = vec![false; views.len()];
    let mut history: Vec<Vec<Isometry3<f64>>> = state.iter().map(|s| vec![s.camera_from_object]).collect();
    for round in 0..c.rounds {
        let sources = category_sources(field, views, &state, &confidence, &anchors, score_size, config)?;
        let sums = CandidateSums::new(&candidate_points, &sources, tokens);
        // Hypotheses against the category features (each image left out of its own).
        let init_cfg = PoseInitConfig { top_k: c.top_k, ..config.pose_init.clone() };
        let hypotheses: Vec<Vec<PoseHypothesis>> = views
            .par_iter()
            .enumerate()
            .map(|(j, v)| {
                let features = |ci: usize| sums.without(ci, &sources[j]);
                let mut hs = initialise_pose(set, v, &init_cfg, Some(&features))?;
                if c.half_turns {
                    hs.extend(half_turns(&state[j]));
                }
                Ok(hs)
            })
            .collect::<Result<_>>()?;
        // Each image tries the distinct modes away from its pose whose category distance, before
        // refinement, is not far above its current pose's (the others would not be chosen).
        let sep = config.pose_init.min_separation_deg;
        let window_camera = |i: usize, pose: Isometry3<f64>, intrinsics: Intrinsics| WindowCamera {
            camera_from_object: pose,
            intrinsics,
            window: views[i].crop,
        };
        let tried: Vec<(Vec<PoseHypothesis>, f32)> = hypotheses
            .par_iter()
            .enumerate()
            .map(|(i, hs)| {
                let current = state[i].camera_from_object.rotation.to_rotation_matrix();
                let far: Vec<&PoseHypothesis> = hs
                    .iter()
                    .filter(|h| rotation_error_deg(&current, &h.camera_from_object.rotation.to_rotation_matrix()) >= sep)
                    .collect();
                let mut cameras = vec![window_camera(i, state[i].camera_from_object, state[i].intrinsics)];
                cameras.extend(far.iter().map(|h| window_camera(i, h.camera_from_object, h.intrinsics)));
                let d = category_distance(field, &sources, &[i], &views[i], score_size, &cameras, config)?;
                let margin = d[1..].iter().copied().fold(f32::INFINITY, f32::min) - d[0];
                let kept =
                    far.into_iter().zip(&d[1..]).filter(|(_, dh)| **dh < d[0] + c.trial_slack).map(|(h, _)| h.clone()).collect();
                Ok((kept, margin))
            })
            .collect::<Result<_>>()?;
        let (trials, margins): (Vec<Vec<PoseHypothesis>>, Vec<f32>) = tried.into_iter().unzip();
        if c.confidence_scale > 0.0 {
            for (w, m) in confidence.iter_mut().zip(&margins) {
                *w = confidence_of(*m, c.confidence_scale);
            }
        }
        let moving: Vec<usize> = (0..views.len()).filter(|&i| !frozen[i] && !trials[i].is_empty()).collect();
        info!("category round {}: {} of {} images try other poses", round + 1, moving.len(), views.len());
        if moving.is_empty() {
            break;
        }
        let batch: Vec<Vec<PoseHypothesis>> = moving.iter().map(|&i| trials[i].clone()).collect();
        let first = refiner.hypothesis_iterations().max(1);
        let refined = refiner.refine_hypotheses(&moving, &batch, first, &|_| ())?;
        // The current pose (already refined) is refined hypothesis 0; trial k is refined hypothesis k + 1.
        let refined: Vec<Vec<Refined>> =
            moving.iter().zip(refined).map(|(&i, rs)| std::iter::once(state[i]).chain(rs).collect()).collect();
        let mut changed = Vec::new();
        let mut reverted = 0;
        for ((&i, rs), hs) in moving.iter().zip(&refined).zip(&batch) {
            let cameras: Vec<WindowCamera> = rs
                .iter()
                .map(|r| WindowCamera {
                    camera_from_object: r.camera_from_object,
                    intrinsics: r.intrinsics,
                    window: views[i].crop,
                })
                .collect();
            let d = category_distance(field, &sources, &[i], &views[i], score_size, &cameras, config)?;
            let fit: Vec<f32> = rs.iter().zip(&d).map(|(r, d)| r.iou - c.semantic_weight * d).collect();

            // Moving needs category evidence: a distance lower than the current pose's by at least
            // `min_improvement` (nearby poses of one instance differ by less), a silhouette fit not
            // worse by more than `max_iou_loss`, and a better combined fit.
            let best = (1..rs.len())
                .filter(|&k| d[k] <= d[0] - c.min_improvement && rs[k].iou >= rs[0].iou - c.max_iou_loss)
                .max_by(|&a, &b| fit[a].total_cmp(&fit[b]))
                .filter(|&k| fit[k] > fit[0])
                .unwrap_or(0);
            debug!(
                "image {i}: IoU {:?} category distance {:?} -> hypothesis {best}",
                rs.iter().map(|r| r.iou).collect::<Vec<_>>(),
                d
            );
            if c.confidence_scale > 0.0 {
                let others = d.iter().enumerate().filter(|(k, _)| *k != best).map(|(_, v)| *v);
                let margin = others.fold(f32::INFINITY, f32::min) - d[best];
                confidence[i] = confidence_of(margin, c.confidence_scale);
            }
            let rotation = |p: &Isometry3<f64>| p.rotation.to_rotation_matrix();
            let back = best != 0
                && history[i][..history[i].len() - 1]
                    .iter()
                    .any(|p| rotation_error_deg(&rotation(p), &rotation(&rs[best].camera_from_object)) < sep);
            if back {
                state[i] = original.0[i];
                registration.init_info[i] = original.1[i].clone();
                frozen[i] = true;
                reverted += 1;
                continue;
            }
            if best != 0 {
                let h = &hs[best - 1];
                if h.candidate < set.candidates.len() {
                    registration.init_info[i] = candidate_info(set, h);
                }
                history[i].push(rs[best].camera_from_object);
                changed.push(i);
            }
            state[i] = rs[best];
        }
        info!("category round {}: {} images changed pose, {reverted} returned to their first", round + 1, changed.len());
        refiner.refine_selected(
            &mut state,
            &changed,
            refiner.total_iterations() - first.min(refiner.total_iterations()),
            &|_| (),
        )?;
        progress("category", (round + 1) as f32 / c.rounds as f32);
        if changed.is_empty() && reverted == 0 {
            break;
        }
    }
    if c.feature_weight > 0.0 && c.feature_iterations > 0 {
        let sources = category_sources(field, views, &state, &confidence, &anchors, score_size, config)?;
        let terms = feature_targets(field, views, &state, &sources, config)?;
        // Only the images that get the term: the others keep the poses their silhouettes settled.
        let (which, terms): (Vec<usize>, Vec<Option<FeatureTarget>>) =
            terms.into_iter().enumerate().filter(|(_, t)| t.is_some()).unzip();
        refiner.refine_selected_with(&mut state, &which, c.feature_iterations, terms, &|_| ())?;
        info!(
            "category: last refinement with the category features ({} iterations) for {} of {} images",
            c.feature_iterations,
            which.len(),
            views.len()
        );
    }
    registration.camera_from_object = state.iter().map(|r| r.camera_from_object).collect();
    registration.intrinsics = state.iter().map(|r| r.intrinsics).collect();
    registration.iou = state.iter().map(|r| r.iou).collect();
    timings.insert("category".to_string(), start.elapsed().as_secs_f64());
    Ok(registration)
}
