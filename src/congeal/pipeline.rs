//! Algorithm 1 as one readable function: shape -> candidate renders -> pose initialisation ->
//! pose refinement -> outputs. The CLI and the ROS node both call [`run`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use nalgebra::{Isometry3, Translation3};
use tracing::{info, warn};

use crate::collection::{Collection, LoadedImage, SquareCrop};
use crate::config::Config;
use crate::congeal::coord_maps::forward::{coordinate_warps, pose_rasters};
use crate::congeal::coord_maps::StoredWarp;
use crate::congeal::features::{masked_crop, FeatureExtractor};
use crate::congeal::pose_init::{self, InputView, PoseHypothesis};
use crate::congeal::pose_refine::{refine_poses, FeatureTarget, RefineResult, RefineSettings, RefineTarget};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::geometry::Intrinsics;
use crate::output::images::{write_images, PosedImage};
use crate::output::result::{CandidateInfo, CanonicalInfo, RunResult, SkippedImage};
use crate::shape::{build_shape, BuiltShape, ShapeInputs, ShapeSpec};

/// Receives progress: stage name and the fraction of that stage done (0..1).
pub type ProgressFn<'a> = &'a (dyn Fn(&str, f32) + Sync);

/// A progress sink that ignores everything.
pub fn no_progress(_: &str, _: f32) {}

/// An image that made it through loading, with everything the stages need.
pub(crate) struct Prepared {
    /// Position in the collection.
    pub(crate) index: usize,
    /// Image path relative to the collection.
    pub(crate) file: String,
    /// The image and its mask.
    pub(crate) image: LoadedImage,
    /// The image as pose initialisation sees it (with its features once computed).
    pub(crate) view: InputView,
}

/// Poses of a set of images against a canonical shape (normalised frame), with their fit.
#[derive(Clone, Debug)]
pub struct Registration {
    /// camera_from_object per image, normalised object frame.
    pub camera_from_object: Vec<Isometry3<f64>>,
    /// Intrinsics per image.
    pub intrinsics: Vec<Intrinsics>,
    /// Final IoU per image.
    pub iou: Vec<f32>,
    /// Candidate info of each winner.
    pub init_info: Vec<CandidateInfo>,
}

/// Runs the whole pipeline on `collection` and writes the outputs into `out_dir` (re-exported as
/// `congeal::run`).
///
/// # Examples
///
/// ```no_run
/// use std::path::Path;
///
/// use congeal::{collection::Collection, config::Config, shape::ShapeSpec};
///
/// let collection = Collection::load(Path::new("demo/duck"))?;
/// let config = Config::from_yaml_file(Path::new("config/fast.yaml"))?;
/// // The collection's template.obj as the canonical shape; progress goes nowhere.
/// let shape = ShapeSpec::Template(None);
/// let result = congeal::run(&collection, &shape, &config, Path::new("runs/duck"), &congeal::no_progress)?;
/// for image in &result.images {
///     println!("{}: camera_from_object {:?}, IoU {:.2}", image.file, image.camera_from_object, image.score);
/// }
/// # Ok::<(), congeal::Error>(())
/// ```
pub fn run(
    collection: &Collection,
    shape: &ShapeSpec,
    config: &Config,
    out_dir: &Path,
    progress: ProgressFn,
) -> Result<RunResult> {
    config.validate()?;
    shape.check_available(config)?;
    let device = config.device()?;
    let mut timings = BTreeMap::new();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    // Stage 0: inputs; bad images are skipped with their reason, never fatal unless none is left.
    let t = Instant::now();
    let (mut prepared, skipped) = load_inputs(collection, config, &device, progress)?;
    timings.insert("load".to_string(), t.elapsed().as_secs_f64());

    // Semantic features of the inputs (Sec. 3.2), computed once.
    let extractor = input_features(&mut prepared, config, &device, progress, &mut timings)?;

    // Stages 1-2: canonical shape.
    let t = Instant::now();
    let images: Vec<(&image::RgbImage, &image::GrayImage)> = prepared.iter().map(|p| (&p.image.rgb, &p.image.mask)).collect();
    let inputs =
        ShapeInputs { default_template: collection.template.as_deref(), images: &images, out_dir: Some(out_dir), progress };
    let BuiltShape { shape: shape_built, timings_s } = build_shape(shape, &inputs, config, &device)?;
    timings.extend(timings_s);
    progress("shape", 1.0);
    timings.insert("shape".to_string(), t.elapsed().as_secs_f64());
    info!("canonical field {:?} voxels in {:.1}s", shape_built.field.dims, t.elapsed().as_secs_f64());
    let field = &shape_built.field;

    // Stages 3-4: poses.
    let views: Vec<InputView> = prepared.iter().map(|p| p.view.clone()).collect();
    let masks: Vec<&image::GrayImage> = prepared.iter().map(|p| &p.image.mask).collect();
    let registration = register(field, &views, &masks, config, extractor.as_ref(), progress, &mut timings)?;

    // Stage 5: canonical coordinate maps (Eq. 10-13).
    let t = Instant::now();
    let warps: Vec<Option<StoredWarp>> = match (&extractor, config.coord_maps.enabled) {
        (Some(ex), true) => {
            coordinate_warps(field, &prepared, &registration, ex, config, &mut timings)?.into_iter().map(Some).collect()
        }
        _ => vec![None; prepared.len()],
    };
    timings.insert("coord_maps".to_string(), t.elapsed().as_secs_f64());
    progress("coord_maps", 1.0);

    // Outputs: per image (forward maps, overlays), then the shape.
    let t = Instant::now();
    let posed = prepared
        .iter()
        .zip(&warps)
        .enumerate()
        .map(|(k, (p, warp))| posed_image(p, &registration, k, warp.as_ref(), collection, field, config));
    let images = write_images(out_dir, &config.output, prepared.len(), posed, &|f| progress("outputs", f))?;
    let mesh = crate::field::field_mesh(field)?;
    mesh.write_ply(out_dir.join("canonical.ply"))?;
    crate::shape::model::save_model(&shape_built, &out_dir.join("model"))?;
    timings.insert("outputs".to_string(), t.elapsed().as_secs_f64());

    let result = RunResult {
        collection: collection.root.to_string_lossy().to_string(),
        shape_source: shape.kind().to_string(),
        canonical: CanonicalInfo { mesh: "canonical.ply".into(), bbox_min: shape_built.bbox.0, bbox_max: shape_built.bbox.1 },
        images,
        skipped,
        timings_s: timings,
    };
    result.save(out_dir)?;
    let yaml = serde_yaml::to_string(config).map_err(|e| Error::Config(format!("cannot serialise the configuration: {e}")))?;
    std::fs::write(out_dir.join("config.yaml"), yaml).map_err(|e| Error::io(out_dir.join("config.yaml"), e))?;
    Ok(result)
}

/// Image `k` of a run as [`write_images`] takes it: its registration, its warp and the rasters
/// rendered at its pose.
fn posed_image<'a>(
    p: &'a Prepared,
    registration: &Registration,
    k: usize,
    warp: Option<&'a StoredWarp>,
    collection: &Collection,
    field: &CanonicalField,
    config: &Config,
) -> Result<PosedImage<'a, StoredWarp>> {
    let pose = registration.camera_from_object[k];
    let intrinsics = registration.intrinsics[k];
    Ok(PosedImage {
        index: p.index,
        file: p.file.clone(),
        rgb: &p.image.rgb,
        mask: &p.image.mask,
        mask_has_file: collection.has_mask_file(p.index),
        camera_from_object: to_canonical_units(&pose, field.units_per_normalised),
        intrinsics,
        score: registration.iou[k],
        init: registration.init_info[k].clone(),
        border: p.view.contact,
        warp,
        rasters: pose_rasters(field, &p.view, &p.image.mask, &pose, &intrinsics, warp, config)?,
    })
}

/// Loads every image of `collection` with its mask (built-in U^2-Net-p masks for images without a
/// mask file, if the weights are there) and its pose-initialisation view. Bad images are returned as
/// skipped with their reason; none usable is an error.
fn load_inputs(
    collection: &Collection,
    config: &Config,
    device: &candle_core::Device,
    progress: ProgressFn,
) -> Result<(Vec<Prepared>, Vec<SkippedImage>)> {
    let mut prepared = Vec::new();
    let mut skipped: Vec<SkippedImage> = collection
        .unreadable
        .iter()
        .map(|(file, reason)| SkippedImage { file: file.to_string_lossy().to_string(), reason: reason.clone() })
        .collect();
    let segmenter = if (0..collection.images.len()).any(|i| !collection.has_mask_file(i)) {
        match crate::config::resolve_weights(&config.masks.weights)
            .and_then(|p| crate::collection::segment::Segmenter::load(&p, device))
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("images without masks must carry an alpha channel: {e}");
                None
            }
        }
    } else {
        None
    };
    for (i, entry) in collection.images.iter().enumerate() {
        let file = entry.rgb.to_string_lossy().to_string();
        let loaded = collection.load_image_or_segment(i, segmenter.as_ref()).and_then(|image| {
            let view = pose_init::input_view(&image.rgb, &image.mask, entry.intrinsics, &config.pose_init)?;
            Ok((image, view))
        });
        match loaded {
            Ok((image, view)) => prepared.push(Prepared { index: i, file, image, view }),
            Err(e) => {
                warn!("skipping {file}: {e}");
                skipped.push(SkippedImage { file, reason: e.to_string() });
            }
        }
        progress("load", (i + 1) as f32 / collection.images.len().max(1) as f32);
    }
    if prepared.is_empty() {
        return Err(Error::Collection {
            path: collection.root.clone(),
            message: format!("no usable image ({} skipped)", skipped.len()),
        });
    }
    Ok((prepared, skipped))
}

/// Loads the feature extractor when the configuration needs features, and computes the inputs'
/// features (Sec. 3.2) once.
fn input_features(
    prepared: &mut [Prepared],
    config: &Config,
    device: &candle_core::Device,
    progress: ProgressFn,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Option<FeatureExtractor>> {
    let t = Instant::now();
    if !config.needs_features() {
        return Ok(None);
    }
    let ex = FeatureExtractor::load(&config.features, device)?;
    let mut views: Vec<InputView> = prepared.iter().map(|p| p.view.clone()).collect();
    let images: Vec<(&image::RgbImage, &image::GrayImage)> = prepared.iter().map(|p| (&p.image.rgb, &p.image.mask)).collect();
    attach_input_features(&mut views, &images, &ex)?;
    for (p, v) in prepared.iter_mut().zip(views) {
        p.view = v;
    }
    progress("features", 1.0);
    timings.insert("features_inputs".to_string(), t.elapsed().as_secs_f64());
    Ok(Some(ex))
}

/// The square window (image pixels) DINOv2 sees of an input: its pose-initialisation crop at the
/// extractor's input size.
pub fn feature_window(view: &InputView, input_size: u32) -> SquareCrop {
    SquareCrop { size: input_size, ..view.crop }
}

/// Computes the DINOv2 features of inputs (their masked square crops).
pub fn attach_input_features(
    views: &mut [InputView],
    images: &[(&image::RgbImage, &image::GrayImage)],
    extractor: &FeatureExtractor,
) -> Result<()> {
    if views.len() != images.len() {
        return Err(Error::InvalidInput(format!("{} views but {} images", views.len(), images.len())));
    }
    let crops: Vec<Vec<[f32; 3]>> = views
        .iter()
        .zip(images)
        .map(|(v, (rgb, mask))| masked_crop(rgb, mask, &feature_window(v, extractor.input_size())))
        .collect();
    let feats = extractor.extract(&crops)?;
    for (v, f) in views.iter_mut().zip(feats) {
        v.features = Some(f);
    }
    Ok(())
}

/// Stages 3-4 for a set of prepared inputs: candidate search, then refinement of the `top_k`
/// hypotheses, keeping the best fit per image, then refinement of the winners.
pub fn register(
    field: &CanonicalField,
    views: &[InputView],
    masks: &[&image::GrayImage],
    config: &Config,
    extractor: Option<&FeatureExtractor>,
    progress: ProgressFn,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Registration> {
    let mut set = pose_init::render_candidates(field, &config.pose_init, config.render.chunk_rays)?;
    timings.insert("pose_init_candidate_render".to_string(), set.render_seconds);
    if config.pose_init.score.is_semantic() {
        let ex = extractor.ok_or_else(|| Error::Config("semantic pose scoring needs DINOv2 features".into()))?;
        let groups = pose_init::needed_fov_groups(&set, views, &config.pose_init);
        attach_candidate_features(&mut set, field, ex, config, groups.as_deref())?;
        timings.insert("pose_init_candidate_features".to_string(), set.feature_seconds);
        *timings.entry("pose_init".to_string()).or_default() += set.feature_seconds;
    }
    progress("pose_init", 0.5);
    let registration = register_with_candidates(field, &set, views, masks, config, progress, timings)?;
    // Stage 4b: the collection re-aligned against its own category features. It starts from the
    // first registration, so a failure there (logged) keeps that one.
    let first = registration.clone();
    let registration =
        match crate::congeal::category::align_category(field, &set, views, masks, registration, config, progress, timings) {
            Ok(r) => r,
            Err(e) => {
                warn!("category alignment failed, keeping the template alignment: {e}");
                first
            }
        };
    // pose_init = candidate rendering + scoring.
    *timings.entry("pose_init".to_string()).or_default() += set.render_seconds;
    Ok(registration)
}

/// [`register`] with candidates rendered earlier (e.g. cached per model, so registering one new image
/// costs only its scoring and refinement).
pub fn register_with_candidates(
    field: &CanonicalField,
    set: &pose_init::CandidateSet,
    views: &[InputView],
    masks: &[&image::GrayImage],
    config: &Config,
    progress: ProgressFn,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Registration> {
    let t = Instant::now();
    let hypotheses = pose_init::initialise_poses(set, views, &config.pose_init)?;
    progress("pose_init", 1.0);
    timings.insert("pose_init".to_string(), t.elapsed().as_secs_f64());
    info!("{} candidates scored against {} images", set.candidates.len(), views.len());

    let t = Instant::now();
    let refiner = Refiner::new(field, views, masks, config)?;
    let k = hypotheses.iter().map(Vec::len).max().unwrap_or(1);
    let first_iters = if k > 1 { refiner.hypothesis_iterations() } else { 0 };
    let total_iters = refiner.total_iterations();
    // Phase A: every hypothesis of every image; per image the best refined silhouette fit minus the
    // semantic disagreement of its candidate (silhouettes cannot tell a symmetric object's front
    // from its back).
    let mut chosen: Vec<usize> = vec![0; views.len()];
    let mut state: Vec<Refined> = hypotheses
        .iter()
        .map(|h| Refined { camera_from_object: h[0].camera_from_object, intrinsics: h[0].intrinsics, iou: 0.0 })
        .collect();
    if first_iters > 0 {
        let all: Vec<usize> = (0..views.len()).collect();
        let refined = refiner
            .refine_hypotheses(&all, &hypotheses, first_iters, &|it| progress("pose_refine", it as f32 / total_iters as f32))?;
        for (i, rs) in refined.into_iter().enumerate() {
            let best = (0..rs.len())
                .max_by(|&a, &b| (rs[a].iou - hypotheses[i][a].penalty).total_cmp(&(rs[b].iou - hypotheses[i][b].penalty)));
            if let Some(j) = best {
                chosen[i] = j;
                state[i] = rs[j];
            }
        }
    }
    // Phase B: the winners.
    let all: Vec<usize> = (0..views.len()).collect();
    refiner.refine_selected(&mut state, &all, total_iters - first_iters, &|it| {
        progress("pose_refine", (first_iters + it) as f32 / total_iters as f32)
    })?;
    timings.insert("pose_refine".to_string(), t.elapsed().as_secs_f64());
    let init_info = chosen.iter().zip(&hypotheses).map(|(&j, h)| candidate_info(set, &h[j])).collect();
    Ok(Registration {
        camera_from_object: state.iter().map(|r| r.camera_from_object).collect(),
        intrinsics: state.iter().map(|r| r.intrinsics).collect(),
        iou: state.iter().map(|r| r.iou).collect(),
        init_info,
    })
}

/// The result.json record of the candidate a hypothesis came from.
pub(crate) fn candidate_info(set: &pose_init::CandidateSet, h: &PoseHypothesis) -> CandidateInfo {
    let c = &set.candidates[h.candidate];
    CandidateInfo { azimuth_deg: c.azimuth_deg, elevation_deg: c.elevation_deg, fov_deg: c.fov_deg, score: h.score }
}

/// One refined camera and its silhouette fit.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refined {
    /// camera_from_object, normalised object frame.
    pub(crate) camera_from_object: Isometry3<f64>,
    /// Intrinsics (focal possibly refined).
    pub(crate) intrinsics: Intrinsics,
    /// Silhouette IoU after refinement.
    pub(crate) iou: f32,
}

/// Pose refinement (Algorithm 1, line 8) of a set of images with the configuration's settings: the
/// window each image is fitted on and whether its focal length is free.
pub(crate) struct Refiner<'a> {
    field: &'a CanonicalField,
    config: &'a Config,
    targets: Vec<RefineTarget>,
    free_focal: Vec<bool>,
}

impl<'a> Refiner<'a> {
    /// Targets of `views` (masks on a window around each; the whole image for a truncated object,
    /// whose cut edges are not its own).
    pub(crate) fn new(
        field: &'a CanonicalField,
        views: &[InputView],
        masks: &[&image::GrayImage],
        config: &'a Config,
    ) -> Result<Self> {
        let rc = &config.pose_refine;
        let targets = views
            .iter()
            .zip(masks)
            .map(|(v, m)| {
                let crop = match &v.frame {
                    Some(_) => SquareCrop::whole_image(v.width, v.height, rc.truncated_ray_grid),
                    None => SquareCrop::around(&v.bbox, rc.crop_margin, rc.ray_grid)?,
                };
                Ok(RefineTarget::new(crop, m))
            })
            .collect::<Result<_>>()?;
        let free_focal = views
            .iter()
            .map(|v| rc.optimise_fov && !(config.pose_init.use_known_intrinsics && v.known_intrinsics.is_some()))
            .collect();
        Ok(Self { field, config, targets, free_focal })
    }

    /// All refinement iterations of a pose (`pose_refine.iterations`, at least 1).
    pub(crate) fn total_iterations(&self) -> usize {
        self.config.pose_refine.iterations.max(1)
    }

    /// Iterations spent on each hypothesis before the best is chosen.
    pub(crate) fn hypothesis_iterations(&self) -> usize {
        self.config.pose_refine.hypothesis_iterations.min(self.total_iterations())
    }

    fn settings(&self, iterations: usize) -> RefineSettings {
        let rc = &self.config.pose_refine;
        RefineSettings { iterations, lr: rc.lr, focal_lr: rc.fov_lr, samples_per_ray: self.config.render.samples_per_ray }
    }

    /// Refines every hypothesis of the images `which` (`hypotheses[k]` belong to image `which[k]`) for
    /// `iterations` in one batch; the results in the layout of `hypotheses`.
    pub(crate) fn refine_hypotheses(
        &self,
        which: &[usize],
        hypotheses: &[Vec<PoseHypothesis>],
        iterations: usize,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<Vec<Refined>>> {
        if which.len() != hypotheses.len() || which.iter().any(|&i| i >= self.targets.len()) {
            return Err(Error::InvalidInput(format!("{} hypothesis lists for images {which:?}", hypotheses.len())));
        }
        let (mut owner, mut p0, mut k0, mut tg, mut ff) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (k, (&i, hs)) in which.iter().zip(hypotheses).enumerate() {
            for h in hs {
                owner.push(k);
                p0.push(h.camera_from_object);
                k0.push(h.intrinsics);
                tg.push(self.targets[i].clone());
                ff.push(self.free_focal[i]);
            }
        }
        let mut out: Vec<Vec<Refined>> = hypotheses.iter().map(|h| Vec::with_capacity(h.len())).collect();
        if p0.is_empty() {
            return Ok(out);
        }
        let result: RefineResult =
            refine_poses(self.field, &p0, &k0, &tg, &ff, &self.settings(iterations), &mut |it, _| progress(it))?;
        for (r, &i) in owner.iter().enumerate() {
            out[i].push(Refined {
                camera_from_object: result.camera_from_object[r],
                intrinsics: result.intrinsics[r],
                iou: result.iou[r],
            });
        }
        Ok(out)
    }

    /// Refines the images `which` further from `state` for `iterations` (none: unchanged).
    pub(crate) fn refine_selected(
        &self,
        state: &mut [Refined],
        which: &[usize],
        iterations: usize,
        progress: &dyn Fn(usize),
    ) -> Result<()> {
        self.refine_selected_with(state, which, iterations, Vec::new(), progress)
    }

    /// [`Refiner::refine_selected`] with a semantic term per image (`features[k]` for `which[k]`;
    /// missing or `None`: silhouette only).
    pub(crate) fn refine_selected_with(
        &self,
        state: &mut [Refined],
        which: &[usize],
        iterations: usize,
        mut features: Vec<Option<FeatureTarget>>,
        progress: &dyn Fn(usize),
    ) -> Result<()> {
        if iterations == 0 || which.is_empty() {
            return Ok(());
        }
        let p0: Vec<_> = which.iter().map(|&i| state[i].camera_from_object).collect();
        let k0: Vec<_> = which.iter().map(|&i| state[i].intrinsics).collect();
        features.resize(which.len(), None);
        let tg: Vec<_> =
            which.iter().zip(features).map(|(&i, features)| RefineTarget { features, ..self.targets[i].clone() }).collect();
        let ff: Vec<_> = which.iter().map(|&i| self.free_focal[i]).collect();
        let result = refine_poses(self.field, &p0, &k0, &tg, &ff, &self.settings(iterations), &mut |it, _| progress(it))?;
        for (r, &i) in which.iter().enumerate() {
            state[i] = Refined {
                camera_from_object: result.camera_from_object[r],
                intrinsics: result.intrinsics[r],
                iou: result.iou[r],
            };
        }
        Ok(())
    }
}

/// Registers one image against a model whose candidates were rendered earlier (`set`, a cache kept
/// per model): input view, DINOv2 features of the input and of the candidate FoV groups it needs
/// (semantic scoring only, computed once per group), then [`register_with_candidates`]. Used by the
/// node's `~/register`, by tracking re-initialisation and by the tracking benchmark.
pub fn register_frame(
    field: &CanonicalField,
    set: &mut pose_init::CandidateSet,
    rgb: &image::RgbImage,
    mask: &image::GrayImage,
    known: Option<Intrinsics>,
    config: &Config,
    extractor: Option<&FeatureExtractor>,
) -> Result<Registration> {
    let mut view = pose_init::input_view(rgb, mask, known, &config.pose_init)?;
    if config.pose_init.score.is_semantic() {
        let ex = extractor.ok_or_else(|| Error::Config("semantic pose scoring needs DINOv2 features".into()))?;
        attach_input_features(std::slice::from_mut(&mut view), &[(rgb, mask)], ex)?;
        let groups = pose_init::needed_fov_groups(set, std::slice::from_ref(&view), &config.pose_init);
        attach_candidate_features(set, field, ex, config, groups.as_deref())?;
    }
    let mut timings = BTreeMap::new();
    register_with_candidates(field, set, &[view], &[mask], config, &no_progress, &mut timings)
}

/// [`pose_init::attach_candidate_features`] with the configuration's settings: DINOv2 features of
/// the candidates in the FoV `groups` (all when `None`) that have none yet.
pub fn attach_candidate_features(
    set: &mut pose_init::CandidateSet,
    field: &CanonicalField,
    extractor: &FeatureExtractor,
    config: &Config,
    groups: Option<&[usize]>,
) -> Result<()> {
    pose_init::attach_candidate_features(
        set,
        field,
        extractor,
        &config.features,
        config.pose_init.samples_per_ray,
        config.render.chunk_rays,
        groups,
    )
}

/// Converts a normalised-frame pose to canonical units.
fn to_canonical_units(pose: &Isometry3<f64>, units_per_normalised: f64) -> Isometry3<f64> {
    Isometry3::from_parts(Translation3::from(pose.translation.vector * units_per_normalised), pose.rotation)
}
