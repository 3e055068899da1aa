//! Run configuration (serde/YAML). Profiles: `config/default.yaml` (the paper's settings),
//! `config/fast.yaml` (CPU-friendly), `config/tiny.yaml` (smoke tests). Every field has a default, so
//! a profile file only needs the values it changes.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration of a congealing run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Tensor device: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Canonical field built from a template mesh.
    pub template: TemplateConfig,
    /// Volume rendering settings shared by the stages.
    pub render: RenderConfig,
    /// Pose initialisation by exhaustive candidate search (Algorithm 1, lines 4-7).
    pub pose_init: PoseInitConfig,
    /// Pose refinement by gradient descent on the IoU loss (Algorithm 1, line 8).
    pub pose_refine: PoseRefineConfig,
    /// Canonical coordinate maps (Eq. 10-16): the warp from each image to its rendering.
    pub coord_maps: CoordMapsConfig,
    /// DINOv2 semantic features (pose initialisation, coordinate maps, 2D matching baseline).
    pub features: FeaturesConfig,
    /// Built-in foreground masks (U^2-Net-p) for images that come without one.
    pub masks: MasksConfig,
    /// What `congeal run` writes besides result.json.
    pub output: OutputConfig,
    /// Shape source `sds`: textual inversion (Eq. 5) and score distillation (Eq. 2-4).
    pub sds: SdsConfig,
    /// Keypoint transfer (`congeal transfer`).
    pub transfer: TransferConfig,
    /// Live tracking (the ROS node's `track` mode): warm-started refinement per frame.
    pub track: TrackConfig,
    /// Category-level alignment (stage 4b): re-align every image against DINOv2 features lifted from
    /// the other aligned images onto the canonical shape.
    pub category: CategoryConfig,
}

/// Category-level alignment: after the first registration, the DINOv2 tokens of the aligned images
/// are lifted onto the canonical shape (each image at its pose, visible surface only) and every image
/// is scored again against the features the *other* images put on each candidate view, instead of
/// features of renders of one template; images whose best hypothesis moves are refined again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CategoryConfig {
    /// Re-alignment rounds (0 = off). Stops early when no image changes its pose.
    pub rounds: usize,
    /// Below this many registered images the stage is skipped (too few to lift from).
    pub min_images: usize,
    /// Weight of the category semantic distance when choosing among refined hypotheses (the
    /// silhouette IoU has weight 1).
    pub semantic_weight: f32,
    /// Surface points per token side that carry features (`subsamples²` per token).
    pub subsamples: u32,
    /// A surface point is seen by an image when its depth is within this fraction of the shape's
    /// bounding radius of the image's rendered depth there.
    pub depth_tolerance: f32,
    /// Rays per side of the depth raster rendered over each image's feature window (visibility).
    pub depth_grid: u32,
    /// Hypotheses per image from the candidates scored against the category features.
    pub top_k: usize,
    /// Also try the current pose turned half way round each object axis (front/back flips).
    pub half_turns: bool,
    /// An image moves only to a pose whose category distance is at least this much lower than its
    /// current pose's (poses 30-40 deg apart on one instance differ by 0.004-0.018 on the duck, front
    /// and back of the evenly textured sofa-burlap by up to ~0.03).
    pub min_improvement: f32,
    /// From the second round on, each image's features count with weight `margin / confidence_scale`
    /// (clamped to [0.05, 1]), `margin` = how much lower its pose's category distance is than the best
    /// alternative's; 0 = every image counts fully.
    pub confidence_scale: f32,
    /// A hypothesis is refined only when its category distance before refinement is below the
    /// current pose's plus this (larger = more hypotheses refined, slower).
    pub trial_slack: f32,
    /// A move may lower the image's silhouette IoU (both poses refined) by at most this: category
    /// evidence overrules the silhouette only within what nearby poses of one shape fit alike.
    /// Measured (config/fast_224.yaml): the moves that corrected dtu-house poses cost at most 0.033
    /// IoU; the two that flipped evenly textured sofa-burlap images cost 0.069 and 0.078; every move
    /// on chairs-mixed raised the IoU.
    pub max_iou_loss: f32,
    /// How many images the template's own views count for in the category features, in total (0 =
    /// the collection alone). The template's renders (the candidates' DINOv2 features, at poses known
    /// exactly) anchor the features, so an instance whose images are all flipped the same way cannot
    /// outvote the rest of the collection by confirming its own flips. Off by default: measured
    /// (config/fast_224.yaml) it helps where the template's features are reliable and hurts where its
    /// own candidates flip (`scripts/bench/real.sh`: dogs-dev 3D-aware PCK 19.0 -> 21.2 at 10; chairs-mixed median 16.5 deg ->
    /// 17.3 at 4, 21.2 at 10).
    pub template_weight: f32,
    /// At most this many template views (candidates with features, evenly spread) carry that weight.
    pub template_views: usize,
    /// Weight of the semantic term in a last refinement after the rounds: each token of the shape seen
    /// at an image's pose carries the category feature the other images put there, and the pose moves
    /// those points onto image tokens that look alike (0 = off). Measured (config/fast_224.yaml,
    /// chairs-mixed / chairs-heldout median rotation error): 0: 16.5 / 12.9 deg; 10: 15.6 / 10.7;
    /// 30: 13.8 / 14.3, with the chairs-mixed joint transfer 46.3 -> 43.4 PCK at 30 (46.1 at 10).
    pub feature_weight: f32,
    /// Iterations of that last refinement.
    pub feature_iterations: usize,
    /// Images whose silhouette IoU is at least this get no semantic term; below it the weight
    /// ramps up to the full `feature_weight` at 0.1 less.
    pub feature_max_iou: f32,
}

impl Default for CategoryConfig {
    fn default() -> Self {
        Self {
            rounds: 3,
            min_images: 4,
            semantic_weight: 3.0,
            subsamples: 2,
            depth_tolerance: 0.1,
            depth_grid: 48,
            top_k: 3,
            half_turns: true,
            min_improvement: 0.04,
            confidence_scale: 0.1,
            trial_slack: 0.1,
            max_iou_loss: 0.05,
            template_weight: 0.0,
            template_views: 48,
            feature_weight: 10.0,
            feature_iterations: 300,
            feature_max_iou: 0.9,
        }
    }
}

impl CategoryConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.feature_weight.is_finite() && self.feature_weight >= 0.0) {
            return Err(Error::Config(format!("category.feature_weight must be finite and >= 0, got {}", self.feature_weight)));
        }
        if !self.feature_max_iou.is_finite() {
            return Err(Error::Config(format!("category.feature_max_iou must be finite, got {}", self.feature_max_iou)));
        }
        if !(self.semantic_weight.is_finite() && self.semantic_weight >= 0.0) {
            return Err(Error::Config(format!("category.semantic_weight must be finite and >= 0, got {}", self.semantic_weight)));
        }
        if !(self.max_iou_loss.is_finite()) {
            return Err(Error::Config(format!("category.max_iou_loss must be finite, got {}", self.max_iou_loss)));
        }
        if !(self.trial_slack.is_finite()) {
            return Err(Error::Config(format!("category.trial_slack must be finite, got {}", self.trial_slack)));
        }
        if !(self.confidence_scale.is_finite() && self.confidence_scale >= 0.0) {
            return Err(Error::Config(format!(
                "category.confidence_scale must be finite and >= 0, got {}",
                self.confidence_scale
            )));
        }
        if !(self.min_improvement.is_finite() && self.min_improvement >= 0.0) {
            return Err(Error::Config(format!("category.min_improvement must be finite and >= 0, got {}", self.min_improvement)));
        }
        if !(self.template_weight.is_finite() && self.template_weight >= 0.0) {
            return Err(Error::Config(format!("category.template_weight must be finite and >= 0, got {}", self.template_weight)));
        }
        if !(self.depth_tolerance.is_finite() && self.depth_tolerance > 0.0) {
            return Err(Error::Config(format!("category.depth_tolerance must be finite and > 0, got {}", self.depth_tolerance)));
        }
        if self.subsamples == 0 || self.subsamples > 8 || self.depth_grid < 4 || self.min_images < 2 || self.top_k == 0 {
            return Err(Error::Config("category: subsamples in 1..=8, depth_grid >= 4, min_images >= 2, top_k >= 1".into()));
        }
        Ok(())
    }
}

/// Keypoint transfer between images of a run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Weight `lambda` of the canonical-coordinate term in the 3D-aware joint cost
    /// `(1 - cos(f_src, f_dst)) + lambda * |x_src - x_dst|` (features: DINOv2, unit length; `x`:
    /// forward-map NOCS, unit box). 0 is the 2D baseline (Eq. 18); large values approach the pure
    /// canonical-coordinate transfer (Eq. 17). The default suits rigid objects the template fits;
    /// on articulated ones (real dogs) any weight above 0 loses to features alone
    /// (`scripts/bench/nocs_weight.sh`).
    pub nocs_weight: f32,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self { nocs_weight: 1.0 }
    }
}

/// Live tracking: each frame's pose is refined from the previous frame's for a few Adam steps on a
/// small silhouette raster; the candidate search runs again when the fit drops.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrackConfig {
    /// Adam iterations per tracked frame.
    pub iterations: usize,
    /// Rays per side of the square window around the frame's mask.
    pub ray_grid: u32,
    /// Samples per ray while tracking.
    pub samples_per_ray: usize,
    /// Adam learning rate of the se(3) correction.
    pub lr: f64,
    /// Padding of the window around the tight mask bbox (fraction of its longer side, each side).
    pub crop_margin: f64,
    /// Re-initialise (candidate search) when the fit (silhouette IoU) after refinement is below this.
    pub min_score: f32,
    /// Re-initialise when the fit of the predicted pose, before refinement, is below this (a sudden
    /// jump of the camera or the object).
    pub min_initial_score: f32,
    /// Re-initialise when the fit of the predicted pose is this much below the previous frame's fit
    /// (a jump; smooth motion keeps the two close).
    pub max_drop: f32,
    /// Constant-velocity prediction: the share (0..1) of the last frame-to-frame motion applied to
    /// the previous pose before refinement (0 = start from the previous pose).
    pub velocity: f64,
    /// Refinement iterations of a re-initialisation (the candidate search's `pose_refine.iterations`
    /// while tracking; its hypothesis phase keeps the same share). Tracking refines further on every
    /// frame, so a re-initialisation needs fewer than a job.
    pub reinit_iterations: usize,
}

impl Default for TrackConfig {
    fn default() -> Self {
        Self {
            iterations: 12,
            ray_grid: 32,
            samples_per_ray: 32,
            lr: 0.01,
            crop_margin: 0.1,
            min_score: 0.8,
            min_initial_score: 0.5,
            max_drop: 0.15,
            velocity: 0.8,
            reinit_iterations: 60,
        }
    }
}

impl TrackConfig {
    /// The configuration of a re-initialisation: `config` with `reinit_iterations` of refinement.
    pub fn reinit_config(&self, config: &Config) -> Config {
        let mut c = config.clone();
        let r = &mut c.pose_refine;
        let total = r.iterations.max(1);
        let iterations = self.reinit_iterations.clamp(1, total);
        r.hypothesis_iterations = r.hypothesis_iterations * iterations / total;
        r.iterations = iterations;
        c
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if self.ray_grid < 4 || self.samples_per_ray < 2 {
            return Err(Error::Config("track.ray_grid >= 4 and track.samples_per_ray >= 2".into()));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0 && (0.0..1.0).contains(&self.crop_margin)) {
            return Err(Error::Config("track.lr must be finite and >= 0, track.crop_margin in [0, 1)".into()));
        }
        if !(0.0..=1.0).contains(&self.min_score) || !(0.0..=1.0).contains(&self.min_initial_score) {
            return Err(Error::Config(format!(
                "track.min_score and track.min_initial_score must be in [0, 1], got {} and {}",
                self.min_score, self.min_initial_score
            )));
        }
        if !(0.0..=1.0).contains(&self.max_drop) {
            return Err(Error::Config(format!("track.max_drop must be in [0, 1], got {}", self.max_drop)));
        }
        if !(0.0..=1.0).contains(&self.velocity) {
            return Err(Error::Config(format!("track.velocity must be in [0, 1], got {}", self.velocity)));
        }
        Ok(())
    }
}

/// Which diffusion model guides score distillation.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Guidance {
    /// MVDream 4-view UNet when `weights_dir` has one (`mvdream/unet.safetensors`), else SD 2.1.
    Auto,
    /// MVDream sd-v2.1-base-4view: 4 views per step with camera conditioning.
    Mvdream,
    /// Stable Diffusion 2.1 base, single-view guidance.
    Sd,
}

/// Textual inversion and score distillation (paper stages 1-2). Defaults are the paper's settings
/// and what makes MVDream-threestudio converge; `config/tiny.yaml` runs them with random tiny models.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SdsConfig {
    /// Folder with the diffusion weights in the diffusers layout (`unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, optional `mvdream/unet.safetensors`); `--weights-dir` overrides it.
    pub weights_dir: Option<String>,
    /// Use seeded random tiny models instead of weight files (mechanics only, no shape quality).
    pub random_models: bool,
    /// Guidance model.
    pub guidance: Guidance,
    /// Prompt whose placeholder words are optimised (paper: "a photo of sks object").
    pub prompt: String,
    /// Words of the prompt whose token embeddings textual inversion optimises.
    pub placeholder_words: Vec<String>,
    /// Negative (unconditional) prompt for classifier-free guidance.
    pub negative_prompt: String,
    /// Textual inversion iterations (paper: 1000).
    pub ti_iterations: usize,
    /// Textual inversion AdamW learning rate (paper: 0.02).
    pub ti_lr: f64,
    /// Textual inversion AdamW weight decay (paper: 0.01).
    pub ti_weight_decay: f64,
    /// Images per textual-inversion step.
    pub ti_batch: usize,
    /// Side of the square crops fed to the VAE in textual inversion (512 for SD 2.1, 256 for MVDream).
    pub ti_resolution: u32,
    /// Score distillation iterations (paper: 10000).
    pub iterations: usize,
    /// AdamW learning rate of the density/colour grid (0.01, as for grid/hash encodings; the paper's
    /// 1e-3 is for its NeRF MLP, which the dense-grid field does not have).
    pub grid_lr: f64,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Views rendered per step (MVDream: 4, at azimuths 90 degrees apart).
    pub views: usize,
    /// Timestep range (fractions of the training schedule) at the first step.
    pub t_start: [f64; 2],
    /// Timestep range reached after `anneal_steps`.
    pub t_end: [f64; 2],
    /// Steps over which the timestep range is annealed linearly.
    pub anneal_steps: usize,
    /// Rescale of the x0 reconstruction's standard deviation (MVDream `recon_std_rescale`).
    pub recon_std_rescale: f64,
    /// Render side before `high_res_from`.
    pub low_res: u32,
    /// Render side from `high_res_from` on.
    pub high_res: u32,
    /// Step at which renders switch to `high_res`.
    pub high_res_from: usize,
    /// Side of the square images given to the VAE encoder (MVDream: 256).
    pub guidance_resolution: u32,
    /// Density/colour grid cells per side.
    pub grid: usize,
    /// Samples per ray when rendering the field.
    pub samples_per_ray: usize,
    /// Magic3D density blob: peak bias added to the raw density at the centre.
    pub blob_density: f64,
    /// Magic3D density blob radius (normalised units; the field spans [-0.5, 0.5]^3).
    pub blob_radius: f64,
    /// Density = softplus(raw + blob) x this (1 / normalised units).
    pub density_scale: f64,
    /// Weight of the orientation regulariser (Ref-NeRF: normals facing away from the camera).
    pub orientation_weight: f64,
    /// Weight of the sparsity regulariser (mean rendered opacity).
    pub sparsity_weight: f64,
    /// Composite renders over a random background colour (else white).
    pub random_background: bool,
    /// Camera elevation range (degrees) of the sampled views.
    pub elevation_deg: [f64; 2],
    /// Vertical FoV range (degrees) of the sampled views.
    pub fov_deg: [f64; 2],
    /// Camera distance as a multiple of the distance at which the unit field just fills the view.
    pub distance_scale: [f64; 2],
    /// Seed of every random draw (views, timesteps, noise, random models).
    pub seed: u64,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            weights_dir: None,
            random_models: false,
            guidance: Guidance::Auto,
            prompt: "a photo of sks object".into(),
            placeholder_words: vec!["sks".into(), "object".into()],
            negative_prompt: String::new(),
            ti_iterations: 1000,
            ti_lr: 0.02,
            ti_weight_decay: 0.01,
            ti_batch: 1,
            ti_resolution: 512,
            iterations: 10000,
            grid_lr: 0.01,
            guidance_scale: 50.0,
            views: 4,
            t_start: [0.98, 0.98],
            t_end: [0.02, 0.50],
            anneal_steps: 8000,
            recon_std_rescale: 0.5,
            low_res: 64,
            high_res: 256,
            high_res_from: 5000,
            guidance_resolution: 256,
            grid: 64,
            samples_per_ray: 64,
            blob_density: 10.0,
            blob_radius: 0.25,
            density_scale: 2.0,
            orientation_weight: 0.0,
            sparsity_weight: 0.0,
            random_background: true,
            elevation_deg: [0.0, 30.0],
            fov_deg: [15.0, 60.0],
            distance_scale: [0.8, 1.0],
            seed: 0,
        }
    }
}

impl SdsConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        let pos = [self.ti_lr, self.grid_lr, self.guidance_scale, self.density_scale, self.blob_radius];
        if pos.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::Config(
                "sds: learning rates, guidance_scale, density_scale and blob_radius must be finite and > 0".into(),
            ));
        }
        let ranges = [self.t_start, self.t_end];
        if ranges.iter().any(|r| !(r[0].is_finite() && r[1].is_finite() && 0.0 < r[0] && r[0] <= r[1] && r[1] < 1.0)) {
            return Err(Error::Config("sds: timestep ranges must satisfy 0 < lo <= hi < 1".into()));
        }
        if self.views == 0 || self.grid < 4 || self.samples_per_ray < 2 || self.low_res < 8 || self.high_res < 8 {
            return Err(Error::Config("sds: views >= 1, grid >= 4, samples_per_ray >= 2, low/high_res >= 8".into()));
        }
        if self.ti_batch == 0 || self.ti_resolution < 8 || self.guidance_resolution < 8 {
            return Err(Error::Config("sds: ti_batch >= 1, ti_resolution and guidance_resolution >= 8".into()));
        }
        if self.placeholder_words.is_empty() {
            return Err(Error::Config("sds: placeholder_words must name at least one word of the prompt".into()));
        }
        let pairs = [self.elevation_deg, self.fov_deg, self.distance_scale];
        if pairs.iter().any(|r| !(r[0].is_finite() && r[1].is_finite() && r[0] <= r[1]))
            || self.fov_deg[0] <= 1.0
            || self.fov_deg[1] >= 170.0
            || self.distance_scale[0] <= 0.0
        {
            return Err(Error::Config(
                "sds: elevation/fov/distance ranges must be ordered, fov in (1, 170), distance > 0".into(),
            ));
        }
        let weights =
            [self.ti_weight_decay, self.recon_std_rescale, self.orientation_weight, self.sparsity_weight, self.blob_density];
        if weights.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(Error::Config("sds: weights, weight decay and blob_density must be finite and >= 0".into()));
        }
        Ok(())
    }
}

/// DINOv2 features.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesConfig {
    /// DINOv2 weights (safetensors in the HuggingFace naming); see [`resolve_weights`] for how a
    /// relative path is found.
    pub weights: String,
    /// Block whose tokens are used (0-based); `null` = the last block after the final layer norm.
    pub layer: Option<usize>,
    /// Square side of the crops fed to DINOv2 (a multiple of 14): 224 gives 16 x 16 tokens.
    pub input_size: u32,
    /// Candidate renderings for semantic scoring are rendered at this size, then resampled to
    /// `input_size` (smaller is faster, blurrier).
    pub render_size: u32,
    /// Images per DINOv2 forward pass.
    pub batch: usize,
}

/// Built-in masks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MasksConfig {
    /// U^2-Net-p weights (safetensors, our naming); found like [`FeaturesConfig::weights`].
    pub weights: String,
}

/// Canonical coordinate maps: the optimisation of Eq. 10 (defaults: the paper's AdamW lr 0.01, 4000 iterations, λ_l2 = 10).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CoordMapsConfig {
    /// Optimise the warps (else the forward map is the NOCS rendering at the pose, ũ = u).
    pub enabled: bool,
    /// Warp nodes per side.
    pub grid: usize,
    /// AdamW iterations.
    pub iterations: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW decoupled weight decay on the displacement `ũ - u`.
    pub weight_decay: f64,
    /// Weight of `||ũ - u||²` (normalised coordinates).
    pub lambda_l2: f64,
    /// Weight of the smoothness loss (Eq. 16).
    pub lambda_smooth: f64,
    /// Huber threshold of the total-variation term (normalised coordinates).
    pub huber_delta: f64,
}

impl Default for CoordMapsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            grid: 32,
            iterations: 4000,
            lr: 0.01,
            weight_decay: 0.01,
            lambda_l2: 10.0,
            lambda_smooth: 0.0,
            huber_delta: 1.0,
        }
    }
}

impl CoordMapsConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        let finite = [self.lr, self.weight_decay, self.lambda_l2, self.lambda_smooth, self.huber_delta];
        if self.grid < 2 || finite.iter().any(|v| !(v.is_finite() && *v >= 0.0)) || self.huber_delta <= 0.0 {
            return Err(Error::Config("coord_maps: grid >= 2, finite non-negative lr/weights, huber_delta > 0".into()));
        }
        Ok(())
    }
}

/// Template mesh -> canonical field.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateConfig {
    /// Voxels along the longest side of the template's bbox.
    pub resolution: usize,
    /// Empty voxels kept around the mesh.
    pub padding_voxels: usize,
    /// Box-blur the occupancy once (smoother silhouette edge). Off by default: the surface shell already
    /// puts the silhouette ~0.7 voxel outside the mesh and the blur adds as much again, a band that the
    /// IoU refinement absorbs by turning the object (sofa-burlap: 15-50 deg drift from the true pose).
    pub smoothing: bool,
    /// Optical thickness of one voxel of full occupancy (density = this / voxel size).
    pub opacity_per_voxel: f32,
}

/// Volume rendering.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RenderConfig {
    /// Samples per ray between the ray's entry into and exit from the field's bbox.
    pub samples_per_ray: usize,
    /// Rays per chunk when rendering without gradients (bounds memory).
    pub chunk_rays: usize,
}

/// Candidate scoring for pose initialisation.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PoseScore {
    /// Soft IoU of the cropped silhouettes (`lambda_IoU = 1`).
    Iou,
    /// IoU plus a colour term (chromaticity of the cropped rendering vs the cropped image).
    IouColour,
    /// The paper's pose initialisation: DINOv2 semantic distance (Eq. 6-7) over the union of the two
    /// foregrounds (`lambda_zeta = 1, lambda_IoU = 0`).
    Semantic,
    /// Semantic distance and IoU together (`semantic_weight`, `lambda_IoU = 1`).
    SemanticIou,
}

impl PoseScore {
    /// Whether this score needs DINOv2 features.
    pub fn is_semantic(self) -> bool {
        matches!(self, PoseScore::Semantic | PoseScore::SemanticIou)
    }
}

/// Pose initialisation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoseInitConfig {
    /// Candidate fields of view (vertical, degrees).
    pub fovs_deg: Vec<f64>,
    /// Number of azimuths uniformly over [-180, 180).
    pub azimuths: usize,
    /// Number of elevations uniformly over [min, max] below.
    pub elevations: usize,
    /// Lowest candidate elevation, degrees.
    pub elevation_min_deg: f64,
    /// Highest candidate elevation, degrees.
    pub elevation_max_deg: f64,
    /// Candidate roll angles, degrees (the paper uses only 0).
    pub rolls_deg: Vec<f64>,
    /// Candidate renders are square, this many pixels.
    pub render_size: u32,
    /// Samples per ray for candidate renders.
    pub samples_per_ray: usize,
    /// Crops (candidate and input) are resampled to this square size before scoring.
    pub score_size: u32,
    /// Padding around the tight mask bbox, as a fraction of its longer side, on each side.
    pub crop_margin: f64,
    /// Use known intrinsics (collection K, camera_info) instead of searching the FoV.
    pub use_known_intrinsics: bool,
    /// Hypotheses per image carried into refinement (the best `top_k` candidates).
    pub top_k: usize,
    /// Hypotheses of one image differ in rotation by at least this much, degrees.
    pub min_separation_deg: f64,
    /// Scoring function.
    pub score: PoseScore,
    /// Weight of the colour term when `score` is `iou_colour`.
    pub colour_weight: f32,
    /// Weight of the semantic distance when choosing among refined hypotheses (and in
    /// `semantic_iou` scoring): silhouettes alone cannot tell a symmetric object's front from its back.
    pub semantic_weight: f32,
    /// Objects cut by the image border (mask touching it) are compared in the image's own frame:
    /// each candidate is placed so its silhouette meets the uncut mask edges, scored with the same
    /// cut, and refinement ignores what lies beyond the border. `false`: tight crops as for whole
    /// objects (the paper's Sec. 3.4).
    pub truncation_aware: bool,
    /// Raster side (pixels) of the whole-image window in which truncated objects are placed.
    pub frame_size: u32,
}

/// Pose refinement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoseRefineConfig {
    /// Total Adam iterations.
    pub iterations: usize,
    /// Iterations spent on all `top_k` hypotheses before keeping the best one per image.
    pub hypothesis_iterations: usize,
    /// Adam learning rate for the se(3) correction.
    pub lr: f64,
    /// Adam learning rate for the log focal length.
    pub fov_lr: f64,
    /// Rays per side of the square window rendered around each image's mask.
    pub ray_grid: u32,
    /// Rays per side of the whole-image window of an object cut by the frame (see
    /// `pose_init.truncation_aware`): its cut silhouette says less, so finer detail matters
    /// (dtu-house, fast_224: 65 % -> 76 % of images under 15 deg going from 32 to 64).
    pub truncated_ray_grid: u32,
    /// Padding of that window around the tight mask bbox (fraction of its longer side, each side).
    pub crop_margin: f64,
    /// Optimise the focal length (FoV) too; ignored for images with known intrinsics when
    /// `pose_init.use_known_intrinsics` is set.
    pub optimise_fov: bool,
}

/// Outputs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Write `nocs/NNN.png`.
    pub nocs: bool,
    /// Write overlays and a contact sheet.
    pub overlays: bool,
    /// Opacity of the rendered shape drawn over each image.
    pub overlay_strength: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            template: TemplateConfig::default(),
            render: RenderConfig::default(),
            pose_init: PoseInitConfig::default(),
            pose_refine: PoseRefineConfig::default(),
            coord_maps: CoordMapsConfig::default(),
            features: FeaturesConfig::default(),
            masks: MasksConfig::default(),
            output: OutputConfig::default(),
            sds: SdsConfig::default(),
            transfer: TransferConfig::default(),
            track: TrackConfig::default(),
            category: CategoryConfig::default(),
        }
    }
}

impl Default for TemplateConfig {
    fn default() -> Self {
        Self { resolution: 96, padding_voxels: 2, smoothing: false, opacity_per_voxel: 4.0 }
    }
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self { samples_per_ray: 96, chunk_rays: 32768 }
    }
}

impl Default for PoseInitConfig {
    fn default() -> Self {
        Self {
            fovs_deg: vec![15.0, 37.5, 60.0],
            azimuths: 16,
            elevations: 16,
            elevation_min_deg: -90.0,
            elevation_max_deg: 90.0,
            rolls_deg: vec![0.0],
            render_size: 64,
            samples_per_ray: 64,
            score_size: 32,
            crop_margin: 0.05,
            use_known_intrinsics: true,
            top_k: 4,
            min_separation_deg: 30.0,
            score: PoseScore::Semantic,
            colour_weight: 0.5,
            semantic_weight: 1.0,
            truncation_aware: true,
            frame_size: 48,
        }
    }
}

impl Default for PoseRefineConfig {
    fn default() -> Self {
        Self {
            iterations: 1000,
            hypothesis_iterations: 200,
            lr: 1e-3,
            fov_lr: 1e-3,
            ray_grid: 64,
            truncated_ray_grid: 64,
            crop_margin: 0.15,
            optimise_fov: true,
        }
    }
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self { weights: "weights/dinov2_vits14.safetensors".into(), layer: None, input_size: 224, render_size: 224, batch: 8 }
    }
}

impl Default for MasksConfig {
    fn default() -> Self {
        Self { weights: "weights/u2netp.safetensors".into() }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { nocs: true, overlays: true, overlay_strength: 0.5 }
    }
}

impl Config {
    /// Reads a YAML file; fields it leaves out keep their defaults.
    pub fn from_yaml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Config = serde_yaml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that would otherwise fail deep inside a stage.
    pub fn validate(&self) -> Result<()> {
        let p = &self.pose_init;
        if p.fovs_deg.is_empty() || p.fovs_deg.iter().any(|f| !(f.is_finite() && *f > 1.0 && *f < 170.0)) {
            return Err(Error::Config(format!("pose_init.fovs_deg must be non-empty, in (1, 170): {:?}", p.fovs_deg)));
        }
        if p.azimuths == 0 || p.elevations == 0 || p.rolls_deg.is_empty() {
            return Err(Error::Config("pose_init needs at least one azimuth, elevation and roll".into()));
        }
        if p.render_size < 8 || p.score_size < 4 || p.top_k == 0 || p.frame_size < 8 {
            return Err(Error::Config("pose_init.render_size >= 8, score_size >= 4, frame_size >= 8, top_k >= 1".into()));
        }
        if !(0.0..1.0).contains(&p.crop_margin) || !(0.0..1.0).contains(&self.pose_refine.crop_margin) {
            return Err(Error::Config("crop margins must be in [0, 1)".into()));
        }
        if self.render.samples_per_ray < 2 || self.render.chunk_rays == 0 {
            return Err(Error::Config("render.samples_per_ray >= 2 and chunk_rays >= 1".into()));
        }
        if self.template.resolution < 8 {
            return Err(Error::Config("template.resolution must be >= 8".into()));
        }
        if self.pose_refine.ray_grid < 4 || self.pose_refine.truncated_ray_grid < 4 {
            return Err(Error::Config("pose_refine.ray_grid and truncated_ray_grid must be >= 4".into()));
        }
        let r = &self.pose_refine;
        if !(r.lr.is_finite() && r.lr >= 0.0 && r.fov_lr.is_finite() && r.fov_lr >= 0.0) {
            return Err(Error::Config("pose_refine learning rates must be finite and >= 0".into()));
        }
        let f = &self.features;
        if f.input_size < 14 || !f.input_size.is_multiple_of(14) || f.render_size < 8 || f.batch == 0 {
            return Err(Error::Config(format!(
                "features.input_size must be a positive multiple of 14 (got {}), render_size >= 8, batch >= 1",
                f.input_size
            )));
        }
        if !(self.transfer.nocs_weight.is_finite() && self.transfer.nocs_weight >= 0.0) {
            return Err(Error::Config(format!(
                "transfer.nocs_weight must be finite and >= 0, got {}",
                self.transfer.nocs_weight
            )));
        }
        if !(self.pose_init.semantic_weight.is_finite() && self.pose_init.semantic_weight >= 0.0) {
            return Err(Error::Config("pose_init.semantic_weight must be finite and >= 0".into()));
        }
        if !(p.colour_weight.is_finite() && p.colour_weight >= 0.0) {
            return Err(Error::Config(format!("pose_init.colour_weight must be finite and >= 0, got {}", p.colour_weight)));
        }
        if !(p.min_separation_deg.is_finite() && p.min_separation_deg >= 0.0) {
            return Err(Error::Config(format!(
                "pose_init.min_separation_deg must be finite and >= 0, got {}",
                p.min_separation_deg
            )));
        }
        let angles_finite = [p.elevation_min_deg, p.elevation_max_deg].iter().chain(&p.rolls_deg).all(|a| a.is_finite());
        if !angles_finite || p.elevation_min_deg > p.elevation_max_deg {
            return Err(Error::Config(format!(
                "pose_init elevations must be finite with elevation_min_deg <= elevation_max_deg, and rolls_deg finite \
                 (got {}..{}, rolls {:?})",
                p.elevation_min_deg, p.elevation_max_deg, p.rolls_deg
            )));
        }
        if p.samples_per_ray < 2 {
            return Err(Error::Config(format!("pose_init.samples_per_ray must be >= 2, got {}", p.samples_per_ray)));
        }
        let t = &self.template;
        if !(t.opacity_per_voxel.is_finite() && t.opacity_per_voxel > 0.0) {
            return Err(Error::Config(format!("template.opacity_per_voxel must be finite and > 0, got {}", t.opacity_per_voxel)));
        }
        // Raster sides: large enough for any real use, small enough that a typo cannot ask for
        // tens of GB (sizes are squared and multiplied by batch and channels).
        let sides = [
            ("pose_init.render_size", p.render_size),
            ("pose_init.score_size", p.score_size),
            ("pose_init.frame_size", p.frame_size),
            ("pose_refine.ray_grid", self.pose_refine.ray_grid),
            ("pose_refine.truncated_ray_grid", self.pose_refine.truncated_ray_grid),
            ("features.input_size", f.input_size),
            ("features.render_size", f.render_size),
        ];
        if let Some((name, v)) = sides.iter().find(|(_, v)| *v > MAX_RASTER_SIDE) {
            return Err(Error::Config(format!("{name} must be <= {MAX_RASTER_SIDE}, got {v}")));
        }
        if p.azimuths * p.elevations * p.rolls_deg.len() * p.fovs_deg.len() > MAX_CANDIDATES {
            return Err(Error::Config(format!(
                "pose_init asks for {} x {} x {} x {} candidates, more than {MAX_CANDIDATES}",
                p.fovs_deg.len(),
                p.azimuths,
                p.elevations,
                p.rolls_deg.len()
            )));
        }
        self.coord_maps.validate()?;
        self.sds.validate()?;
        self.track.validate()?;
        self.category.validate()?;
        parse_device(&self.device).map(|_| ())
    }

    /// Whether a run with this configuration needs DINOv2 (semantic pose scoring or coordinate maps).
    pub fn needs_features(&self) -> bool {
        self.pose_init.score.is_semantic() || self.coord_maps.enabled
    }

    /// The candle device named by `device`.
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
}

/// Largest side accepted for a raster setting (pixels or rays).
pub const MAX_RASTER_SIDE: u32 = 4096;
/// Largest number of pose-initialisation candidates accepted (the paper's grid is 768).
pub const MAX_CANDIDATES: usize = 100_000;

/// The profiles shipped in `config/`, built into the binary: (name, YAML).
const BUILTIN_PROFILES: [(&str, &str); 4] = [
    ("default", include_str!("../config/default.yaml")),
    ("fast", include_str!("../config/fast.yaml")),
    ("fast_224", include_str!("../config/fast_224.yaml")),
    ("tiny", include_str!("../config/tiny.yaml")),
];

impl Config {
    /// A built-in profile by name: `default` (alias `paper`: the paper's settings, for a GPU), `fast`
    /// (the CPU profile), `fast_224`, `tiny`.
    pub fn builtin(name: &str) -> Result<Self> {
        let name = if name == "paper" { "default" } else { name };
        let (_, text) = BUILTIN_PROFILES.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            Error::Config(format!(
                "unknown profile `{name}` (expected {} or paper)",
                BUILTIN_PROFILES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let config: Config = serde_yaml::from_str(text).map_err(|e| Error::Config(format!("built-in profile `{name}`: {e}")))?;
        config.validate()?;
        Ok(config)
    }
}

/// Environment variable naming a folder to look for weight files in.
pub const WEIGHTS_DIR_ENV: &str = "CONGEAL_WEIGHTS_DIR";

/// Finds a weight file: an absolute path is used as is; a relative one is tried against the working
/// directory, then `$CONGEAL_WEIGHTS_DIR` (by file name), then this installation's source folder.
/// The error names every place tried and how to create the file.
pub fn resolve_weights(path: &str) -> Result<PathBuf> {
    let given = PathBuf::from(path);
    let mut tried = Vec::new();
    if given.is_absolute() {
        tried.push(given.clone());
    } else {
        tried.push(given.clone());
        if let (Some(dir), Some(name)) = (std::env::var_os(WEIGHTS_DIR_ENV), given.file_name()) {
            tried.push(PathBuf::from(dir).join(name));
        }
        tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(&given));
    }
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(Error::Weights {
        path: given,
        message: format!(
            "file not found (tried {}); run scripts/setup_weights.sh to fetch and convert the shipped weights, \
             or point the configuration at your own file",
            tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// Parses `cpu`, `cuda`, `cuda:N` into a candle device.
pub fn parse_device(name: &str) -> Result<Device> {
    match name.trim() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| Error::Config(format!("device `cuda`: {e}"))),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n).map_err(|e| Error::Config(format!("device `{other}`: {e}"))),
            _ => Err(Error::Config(format!("unknown device `{other}` (expected cpu, cuda or cuda:N)"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_are_the_shipped_files() {
        for name in ["default", "fast", "fast_224", "tiny"] {
            let file =
                Config::from_yaml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/{name}.yaml"))).unwrap();
            assert_eq!(Config::builtin(name).unwrap(), file, "{name}");
        }
        assert_eq!(Config::builtin("paper").unwrap(), Config::builtin("default").unwrap());
        assert_ne!(Config::builtin("fast").unwrap(), Config::builtin("default").unwrap());
        let e = Config::builtin("turbo").unwrap_err().to_string();
        assert!(e.contains("turbo") && e.contains("fast"), "{e}");
    }

    #[test]
    fn track_settings_are_checked() {
        let bad = Config { track: TrackConfig { min_score: 1.5, ..TrackConfig::default() }, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("min_score"));
        let bad = Config { track: TrackConfig { velocity: -0.1, ..TrackConfig::default() }, ..Config::default() };
        assert!(bad.validate().is_err());
        assert!(Config::default().validate().is_ok());
    }

    /// Values that used to pass and then failed deep inside a stage (NaN scores, empty renders blamed
    /// on the field, rasters of tens of GB) are refused by name; the shipped profiles pass.
    #[test]
    fn settings_that_break_later_stages_are_refused_by_name() {
        let with_init = |f: &dyn Fn(&mut PoseInitConfig)| {
            let mut c = Config::default();
            f(&mut c.pose_init);
            c.validate().map_err(|e| e.to_string())
        };
        type Edit<'a> = &'a dyn Fn(&mut PoseInitConfig);
        let cases: [(&str, Edit); 6] = [
            ("colour_weight", &|p| p.colour_weight = f32::NAN),
            ("min_separation_deg", &|p| p.min_separation_deg = f64::NAN),
            ("elevation", &|p| p.elevation_max_deg = f64::INFINITY),
            ("elevation", &|p| (p.elevation_min_deg, p.elevation_max_deg) = (50.0, -50.0)),
            ("samples_per_ray", &|p| p.samples_per_ray = 1),
            ("render_size", &|p| p.render_size = 50_000),
        ];
        for (name, f) in cases {
            let e = with_init(f).unwrap_err();
            assert!(e.contains(name), "{name}: {e}");
        }
        assert!(with_init(&|p| p.azimuths = 1_000_000).unwrap_err().contains("candidates"));
        for v in [0.0, -1.0, f32::NAN] {
            let c = Config { template: TemplateConfig { opacity_per_voxel: v, ..Default::default() }, ..Config::default() };
            assert!(c.validate().unwrap_err().to_string().contains("opacity_per_voxel"), "{v}");
        }
        for name in ["default", "fast", "fast_224", "tiny"] {
            assert!(Config::builtin(name).unwrap().validate().is_ok(), "{name}");
        }
    }

    #[test]
    fn reinitialisation_refines_less_than_a_job() {
        let fast = Config::builtin("fast").unwrap();
        let r = fast.track.reinit_config(&fast);
        assert_eq!(r.pose_refine.iterations, fast.track.reinit_iterations);
        assert!(r.pose_refine.hypothesis_iterations < fast.pose_refine.hypothesis_iterations);
        assert_eq!(r.pose_init, fast.pose_init, "the candidate settings are the model's");
        let few = Config { pose_refine: PoseRefineConfig { iterations: 10, ..Default::default() }, ..Config::default() };
        assert_eq!(few.track.reinit_config(&few).pose_refine.iterations, 10, "never more than a job");
    }
}
