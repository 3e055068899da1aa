//! Algorithm 1 as one readable function: shape -> candidate renders -> pose initialisation ->
//! pose refinement -> outputs. The CLI and the ROS node both call [`run`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use nalgebra::{Isometry3, Translation3};
use tracing::{info, warn};

use crate::collection::{Collection, LoadedImage, SquareCrop};
use crate::config::Config;
use crate::congeal::coord_maps::{optimise_warps, Warp, WarpProblem};
use crate::congeal::transfer::StoredWarp;
use crate::congeal::features::{masked_crop, FeatureExtractor};
use crate::congeal::pose_init::{self, window_intrinsics, InputView, PoseHypothesis};
use crate::congeal::pose_refine::{refine_poses, RefineResult, RefineSettings, RefineTarget};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{render_rays_host, CameraBatch, HostRendering, RenderWhat};
use crate::geometry::se3::isometry_to_row_major;
use crate::geometry::Intrinsics;
use crate::output::result::{CandidateInfo, CanonicalInfo, ImageResult, RunResult, SkippedImage};
use crate::shape::{build_shape, CanonicalShape, ShapeSpec};

/// Receives progress: stage name and the fraction of that stage done (0..1).
pub type ProgressFn<'a> = &'a (dyn Fn(&str, f32) + Sync);

/// A progress sink that ignores everything.
pub fn no_progress(_: &str, _: f32) {}

/// An image that made it through loading, with everything the stages need.
struct Prepared {
    index: usize,
    file: String,
    image: LoadedImage,
    view: InputView,
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

/// Runs the whole pipeline on `collection` and writes the outputs into `out_dir`.
pub fn run(collection: &Collection, shape: &ShapeSpec, config: &Config, out_dir: &Path, progress: ProgressFn) -> Result<RunResult> {
    config.validate()?;
    if *shape == ShapeSpec::Sds {
        crate::shape::sds::DiffusionModels::check_available(&config.sds, None)?;
    }
    let device = config.device()?;
    let mut timings = BTreeMap::new();
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    // Inputs: bad images are skipped with their reason, never fatal unless none is left.
    let t = Instant::now();
    let mut prepared = Vec::new();
    let mut skipped = Vec::new();
    // Built-in masks (U^2-Net-p) for images without a mask file, if the weights are there.
    let segmenter = if (0..collection.images.len()).any(|i| !collection.has_mask_file(i)) {
        match crate::config::resolve_weights(&config.masks.weights)
            .and_then(|p| crate::collection::segment::Segmenter::load(&p, &device))
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
    timings.insert("load".to_string(), t.elapsed().as_secs_f64());

    // Semantic features of the inputs (Sec. 3.2), computed once.
    let t = Instant::now();
    let extractor = if config.needs_features() { Some(FeatureExtractor::load(&config.features, &device)?) } else { None };
    if let Some(ex) = &extractor {
        let mut views: Vec<InputView> = prepared.iter().map(|p| p.view.clone()).collect();
        let images: Vec<(&image::RgbImage, &image::GrayImage)> =
            prepared.iter().map(|p| (&p.image.rgb, &p.image.mask)).collect();
        attach_input_features(&mut views, &images, ex)?;
        for (p, v) in prepared.iter_mut().zip(views) {
            p.view = v;
        }
        progress("features", 1.0);
        timings.insert("features_inputs".to_string(), t.elapsed().as_secs_f64());
    }

    // Stage 2: canonical shape.
    let t = Instant::now();
    let shape_built: CanonicalShape = match shape {
        ShapeSpec::Sds => {
            // Stages 1-2 learn from the masked inputs themselves.
            let images: Vec<(&image::RgbImage, &image::GrayImage)> =
                prepared.iter().map(|p| (&p.image.rgb, &p.image.mask)).collect();
            let (built, report) =
                crate::shape::sds::build_sds_shape(&images, &config.sds, None, &device, Some(&out_dir.join("sds")), progress)?;
            timings.insert("textual_inversion".to_string(), report.ti_seconds);
            timings.insert("score_distillation".to_string(), report.sds_seconds);
            built
        }
        _ => build_shape(shape, collection.template.as_deref(), config, &device)?,
    };
    progress("shape", 1.0);
    timings.insert("shape".to_string(), t.elapsed().as_secs_f64());
    info!("canonical field {:?} voxels in {:.1}s", shape_built.field.dims, t.elapsed().as_secs_f64());

    // Stages 3-4: poses.
    let views: Vec<InputView> = prepared.iter().map(|p| p.view.clone()).collect();
    let masks: Vec<&image::GrayImage> = prepared.iter().map(|p| &p.image.mask).collect();
    let registration = register(&shape_built.field, &views, &masks, config, extractor.as_ref(), progress, &mut timings)?;

    // Stage 5: canonical coordinate maps (Eq. 10-13).
    let t = Instant::now();
    let field = &shape_built.field;
    let warps: Vec<Option<StoredWarp>> = match (&extractor, config.coord_maps.enabled) {
        (Some(ex), true) => coordinate_warps(field, &prepared, &registration, ex, config, &mut timings)?.into_iter().map(Some).collect(),
        _ => vec![None; prepared.len()],
    };
    timings.insert("coord_maps".to_string(), t.elapsed().as_secs_f64());
    progress("coord_maps", 1.0);

    // Outputs.
    let t = Instant::now();
    let mut images = Vec::with_capacity(prepared.len());
    let mut overlays = Vec::new();
    for (k, p) in prepared.iter().enumerate() {
        let pose = registration.camera_from_object[k];
        let intr = registration.intrinsics[k];
        let nocs_file = format!("nocs/{:03}.png", p.index);
        if config.output.nocs || config.output.overlays {
            let window = render_window(&p.view, config.pose_refine.crop_margin)?;
            let (rendering, rect) = render_full(field, &pose, &intr, &window, config)?;
            if config.output.nocs {
                let (w, h) = (intr.width, intr.height);
                let mask: Vec<bool> = p.image.mask.pixels().map(|px| px.0[0] >= 128).collect();
                let rendered = full_raster(&rendering.nocs, &rect, w, h, [0.0; 3]);
                let alpha = full_raster(&rendering.opacity, &rect, w, h, 0.0);
                let rendered_fg: Vec<bool> = alpha.iter().map(|a| *a >= 0.5).collect();
                let nocs = forward_map(&rendered, &rendered_fg, &mask, w, h, warps[k].as_ref())?;
                crate::output::write_nocs_png(&out_dir.join(&nocs_file), w, h, &nocs, &mask)?;
                crate::output::write_nocs_png(&out_dir.join(format!("nocs_render/{:03}.png", p.index)), w, h, &rendered, &rendered_fg)?;
                let picture = crate::output::nocs_color_image(w, h, &nocs, &mask);
                crate::output::save_png(&picture, &out_dir.join(format!("nocs_vis/{:03}.png", p.index)))?;
                if let Some(stored) = &warps[k] {
                    crate::output::write_json(&out_dir.join(format!("warps/{:03}.json", p.index)), stored)?;
                }
            }
            if config.output.overlays {
                let (w, h) = (intr.width, intr.height);
                let colour = full_raster(&rendering.colour, &rect, w, h, [0.0; 3]);
                let alpha = full_raster(&rendering.opacity, &rect, w, h, 0.0);
                let colour: Vec<[f32; 3]> = colour
                    .iter()
                    .zip(&alpha)
                    .map(|(c, a)| if *a > 1e-3 { c.map(|v| (v / a).clamp(0.0, 1.0)) } else { [0.0; 3] })
                    .collect();
                let over = crate::output::overlay(&p.image.rgb, &colour, &alpha, config.output.overlay_strength);
                crate::output::save_png(&over, &out_dir.join(format!("overlays/{:03}.png", p.index)))?;
                overlays.push(over);
            }
        }
        // Masks that no file holds (alpha or built-in segmenter) are kept with the run, so that later
        // commands (e.g. `congeal transfer --method 2d`) see the same foreground.
        let mask_file = if collection.has_mask_file(p.index) {
            None
        } else {
            let rel = format!("masks/{:03}.png", p.index);
            crate::output::save_gray_png(&p.image.mask, &out_dir.join(&rel))?;
            Some(rel)
        };
        let canonical_pose = to_canonical_units(&pose, field.units_per_normalised);
        images.push(ImageResult {
            file: p.file.clone(),
            camera_from_object: isometry_to_row_major(&canonical_pose),
            k: intrinsics_rows(&intr),
            fov_deg: intr.fov_y_deg(),
            fov_deg_x: intr.fov_x_deg(),
            score: registration.iou[k],
            size: [intr.width, intr.height],
            init: registration.init_info[k].clone(),
            nocs: config.output.nocs.then(|| nocs_file.clone()),
            nocs_render: config.output.nocs.then(|| format!("nocs_render/{:03}.png", p.index)),
            warp: (config.output.nocs && warps[k].is_some()).then(|| format!("warps/{:03}.json", p.index)),
            mask: mask_file,
        });
        progress("outputs", (k + 1) as f32 / prepared.len() as f32);
    }
    if !overlays.is_empty() {
        let sheet = crate::output::contact_sheet(&overlays, 8, 160);
        crate::output::save_png(&sheet, &out_dir.join("contact_sheet.png"))?;
    }
    let mesh = crate::field::field_mesh(field)?;
    mesh.write_ply(&out_dir.join("canonical.ply"))?;
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

/// Eq. 10 for every image: render the shape at the estimated pose over the image's feature window,
/// take its DINOv2 features, and optimise the warp from the input's features to the rendering's.
fn coordinate_warps(
    field: &CanonicalField,
    prepared: &[Prepared],
    registration: &Registration,
    extractor: &FeatureExtractor,
    config: &Config,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Vec<StoredWarp>> {
    let t = Instant::now();
    let size = extractor.input_size();
    let windows: Vec<SquareCrop> = prepared.iter().map(|p| feature_window(&p.view, size)).collect();
    let device = field.device();
    let pixels_one = crate::field::render::pixel_grid(size, size, device)?;
    let mut crops = Vec::with_capacity(prepared.len());
    for (k, window) in windows.iter().enumerate() {
        let intr = window_intrinsics(&registration.intrinsics[k], window);
        let cams = CameraBatch::from_poses(&[registration.camera_from_object[k]], &[intr], device)?;
        let rays = cams.rays(&pixels_one)?;
        let what = RenderWhat { colour: true, ..Default::default() };
        let host = render_rays_host(field, &rays, config.render.samples_per_ray, what, config.render.chunk_rays)?;
        crops.push(host.colour);
    }
    let rendered = extractor.extract(&crops)?;
    let mut problems = Vec::with_capacity(prepared.len());
    for (k, p) in prepared.iter().enumerate() {
        let input = p.view.features.as_ref().ok_or_else(|| Error::InvalidInput("input features missing".into()))?;
        let window = windows[k];
        let mask = &p.image.mask;
        let fg = |x: f64, y: f64| -> bool {
            let q = window.image_from_crop(nalgebra::Point2::new(x * size as f64 - 0.5, y * size as f64 - 0.5));
            let (px, py) = (q.x.round(), q.y.round());
            px >= 0.0
                && py >= 0.0
                && (px as u32) < mask.width()
                && (py as u32) < mask.height()
                && mask.get_pixel(px as u32, py as u32)[0] >= 128
        };
        problems.push(WarpProblem::new(input, &rendered[k], &fg, config.coord_maps.grid)?);
    }
    timings.insert("coord_maps_renders_features".to_string(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    let warps = optimise_warps(&problems, &config.coord_maps)?;
    timings.insert("coord_maps_optimise".to_string(), t.elapsed().as_secs_f64());
    for (k, (p, w)) in problems.iter().zip(&warps).enumerate() {
        info!(
            "{}: coordinate map semantic distance {:.3} -> {:.3}",
            prepared[k].file,
            p.semantic_distance(&Warp::identity(w.grid)),
            p.semantic_distance(w)
        );
    }
    Ok(windows.into_iter().zip(warps).map(|(crop, warp)| StoredWarp { crop, warp }).collect())
}

/// The forward canonical coordinate map (Eq. 11 after Eq. 10) on an image's mask pixels: each
/// pixel's warped position ũ (itself when there is no warp) looks up the rendered NOCS; where ũ
/// misses the rendered silhouette, the nearest rendered pixel is used.
pub fn forward_map(
    rendered: &[[f32; 3]],
    rendered_fg: &[bool],
    mask: &[bool],
    width: u32,
    height: u32,
    warp: Option<&StoredWarp>,
) -> Result<Vec<[f32; 3]>> {
    use kiddo::{KdTree, SquaredEuclidean};
    let n = (width * height) as usize;
    if rendered.len() != n || rendered_fg.len() != n || mask.len() != n {
        return Err(Error::InvalidInput("forward map rasters differ in size".into()));
    }
    let mut tree: KdTree<f64, 2> = KdTree::new();
    for (i, _) in rendered_fg.iter().enumerate().filter(|(_, f)| **f) {
        tree.add(&[(i as u32 % width) as f64, (i as u32 / width) as f64], i as u64);
    }
    if tree.size() == 0 {
        return Err(Error::Numerical("the rendering at the estimated pose is empty".into()));
    }
    let mut out = vec![[0f32; 3]; n];
    for i in (0..n).filter(|&i| mask[i]) {
        let p = nalgebra::Point2::new((i as u32 % width) as f64, (i as u32 / width) as f64);
        let q = match warp {
            Some(w) => {
                let q = w.apply_pixel([p.x, p.y]);
                nalgebra::Point2::new(q[0], q[1])
            }
            None => p,
        };
        let (x, y) = (q.x.round(), q.y.round());
        let direct = (x >= 0.0 && y >= 0.0 && x < width as f64 && y < height as f64)
            .then(|| (y as u32 * width + x as u32) as usize)
            .filter(|&j| rendered_fg[j]);
        let j = match direct {
            Some(j) => j,
            None => tree.nearest_one::<SquaredEuclidean>(&[q.x, q.y]).item as usize,
        };
        out[i] = rendered[j];
    }
    Ok(out)
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
        pose_init::attach_candidate_features(
            &mut set,
            field,
            ex,
            &config.features,
            config.pose_init.samples_per_ray,
            config.render.chunk_rays,
            groups.as_deref(),
        )?;
        timings.insert("pose_init_candidate_features".to_string(), set.feature_seconds);
        *timings.entry("pose_init".to_string()).or_default() += set.feature_seconds;
    }
    progress("pose_init", 0.5);
    let registration = register_with_candidates(field, &set, views, masks, config, progress, timings)?;
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
    let rc = &config.pose_refine;
    let targets: Vec<RefineTarget> = views
        .iter()
        .zip(masks)
        .map(|(v, m)| {
            let crop = SquareCrop::around(&v.bbox, rc.crop_margin, rc.ray_grid)?;
            Ok(RefineTarget { mask: crop.resample_mask(m), crop })
        })
        .collect::<Result<_>>()?;
    let free_focal: Vec<bool> = views
        .iter()
        .map(|v| rc.optimise_fov && !(config.pose_init.use_known_intrinsics && v.known_intrinsics.is_some()))
        .collect();
    let total_iters = rc.iterations.max(1);
    let k = hypotheses.iter().map(Vec::len).max().unwrap_or(1);
    let first_iters = if k > 1 { rc.hypothesis_iterations.min(total_iters) } else { 0 };
    let settings = |iterations| RefineSettings {
        iterations,
        lr: rc.lr,
        focal_lr: rc.fov_lr,
        samples_per_ray: config.render.samples_per_ray,
    };

    // Phase A: every hypothesis of every image.
    let mut chosen: Vec<PoseHypothesis> = hypotheses.iter().map(|h| h[0].clone()).collect();
    let mut poses: Vec<Isometry3<f64>> = chosen.iter().map(|h| h.camera_from_object).collect();
    let mut intrinsics: Vec<Intrinsics> = chosen.iter().map(|h| h.intrinsics).collect();
    let mut iou: Vec<f32> = vec![0.0; views.len()];
    if first_iters > 0 {
        let mut owner = Vec::new();
        let (mut p0, mut k0, mut tg, mut ff) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, hs) in hypotheses.iter().enumerate() {
            for (j, h) in hs.iter().enumerate() {
                owner.push((i, j));
                p0.push(h.camera_from_object);
                k0.push(h.intrinsics);
                tg.push(targets[i].clone());
                ff.push(free_focal[i]);
            }
        }
        let result: RefineResult = refine_poses(field, &p0, &k0, &tg, &ff, &settings(first_iters), &mut |it, _| {
            progress("pose_refine", it as f32 / total_iters as f32)
        })?;
        let mut best = vec![f32::NEG_INFINITY; views.len()];
        for (r, &(i, j)) in owner.iter().enumerate() {
            // Refined silhouette fit, minus the colour disagreement of the candidate (if scored):
            // silhouettes cannot tell a symmetric object's front from its back.
            let fit = result.iou[r] - hypotheses[i][j].penalty;
            if fit > best[i] {
                best[i] = fit;
                poses[i] = result.camera_from_object[r];
                intrinsics[i] = result.intrinsics[r];
                chosen[i] = hypotheses[i][j].clone();
                iou[i] = result.iou[r];
            }
        }
    }
    // Phase B: the winners.
    let rest = total_iters - first_iters;
    if rest > 0 {
        let result = refine_poses(field, &poses, &intrinsics, &targets, &free_focal, &settings(rest), &mut |it, _| {
            progress("pose_refine", (first_iters + it) as f32 / total_iters as f32)
        })?;
        poses = result.camera_from_object;
        intrinsics = result.intrinsics;
        iou = result.iou;
    }
    timings.insert("pose_refine".to_string(), t.elapsed().as_secs_f64());
    let init_info = chosen
        .iter()
        .map(|h| {
            let c = &set.candidates[h.candidate];
            CandidateInfo { azimuth_deg: c.azimuth_deg, elevation_deg: c.elevation_deg, fov_deg: c.fov_deg, score: h.score }
        })
        .collect();
    Ok(Registration { camera_from_object: poses, intrinsics, iou, init_info })
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
        pose_init::attach_candidate_features(
            set,
            field,
            ex,
            &config.features,
            config.pose_init.samples_per_ray,
            config.render.chunk_rays,
            groups.as_deref(),
        )?;
    }
    let mut timings = BTreeMap::new();
    register_with_candidates(field, set, &[view], &[mask], config, &no_progress, &mut timings)
}

/// The square window around an input's mask that refinement and the output renders cover.
fn render_window(view: &InputView, margin: f64) -> Result<SquareCrop> {
    SquareCrop::around(&view.bbox, margin, view.crop.size)
}

/// An axis-aligned block of integer pixels `[x0, x1) x [y0, y1)`.
#[derive(Clone, Copy, Debug)]
struct PixelRect {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
}

impl PixelRect {
    /// The pixels of `window` that lie inside a `width` x `height` image.
    fn of_window(window: &SquareCrop, width: u32, height: u32) -> Self {
        let half = 0.5 * window.side;
        let clip = |v: f64, hi: u32| v.max(0.0).min(hi as f64) as u32;
        Self {
            x0: clip((window.centre_x - half).floor(), width),
            y0: clip((window.centre_y - half).floor(), height),
            x1: clip((window.centre_x + half).ceil() + 1.0, width),
            y1: clip((window.centre_y + half).ceil() + 1.0, height),
        }
    }

    fn len(&self) -> usize {
        ((self.x1 - self.x0) * (self.y1 - self.y0)) as usize
    }
}

/// Places per-pixel values of `rect` into a full `width` x `height` raster filled with `fill`.
fn full_raster<T: Copy>(values: &[T], rect: &PixelRect, width: u32, height: u32, fill: T) -> Vec<T> {
    let mut out = vec![fill; (width * height) as usize];
    let w = (rect.x1 - rect.x0) as usize;
    if w == 0 {
        return out;
    }
    for (row, chunk) in values.chunks(w).enumerate() {
        let y = rect.y0 as usize + row;
        if y >= height as usize {
            break;
        }
        let start = y * width as usize + rect.x0 as usize;
        out[start..start + chunk.len()].copy_from_slice(chunk);
    }
    out
}

/// Converts a normalised-frame pose to canonical units.
fn to_canonical_units(pose: &Isometry3<f64>, units_per_normalised: f64) -> Isometry3<f64> {
    Isometry3::from_parts(Translation3::from(pose.translation.vector * units_per_normalised), pose.rotation)
}

/// K as row-major rows.
fn intrinsics_rows(k: &Intrinsics) -> [[f64; 3]; 3] {
    [[k.fx, 0.0, k.cx], [0.0, k.fy, k.cy], [0.0, 0.0, 1.0]]
}

/// Renders opacity, colour and NOCS for every integer pixel of `window` (clipped to the image).
fn render_full(
    field: &CanonicalField,
    pose: &Isometry3<f64>,
    intr: &Intrinsics,
    window: &SquareCrop,
    config: &Config,
) -> Result<(HostRendering, PixelRect)> {
    let rect = PixelRect::of_window(window, intr.width, intr.height);
    let mut pixels = Vec::with_capacity(rect.len() * 2);
    for y in rect.y0..rect.y1 {
        for x in rect.x0..rect.x1 {
            pixels.push(x as f32);
            pixels.push(y as f32);
        }
    }
    let device = field.device();
    let cams = CameraBatch::from_poses(&[*pose], &[*intr], device)?;
    let pixels = candle_core::Tensor::from_vec(pixels, (1, rect.len(), 2), device)?;
    let rays = cams.rays(&pixels)?;
    let what = RenderWhat { colour: true, nocs: true, ..Default::default() };
    let host = render_rays_host(field, &rays, config.render.samples_per_ray, what, config.render.chunk_rays)?;
    Ok((host, rect))
}
