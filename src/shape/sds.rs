//! Shape source `sds`: the paper's stages 1-2. Textual inversion (Eq. 5) finds the embeddings y* of the
//! placeholder words ("sks object") that best explain the masked input crops under a frozen diffusion
//! model; score distillation (Eq. 2-4 with lambda = 0) then optimises the canonical field so that its
//! renderings look like y* to the same model.
//!
//! What follows MVDream-threestudio (what makes it converge): 4 views per step at azimuths 90 degrees
//! apart with camera conditioning, classifier-free guidance 50, the timestep range annealed from
//! [0.98, 0.98] to [0.02, 0.50] over 8000 steps, the x0-reconstruction loss with std rescale 0.5,
//! renders at 64 px then 256 px, a Magic3D density blob at initialisation, random background colours.
//! Without an MVDream UNet, SD 2.1 guides each view alone (no camera), the same loss otherwise.
//!
//! The field is a dense density/colour grid (density = softplus(raw + blob) x scale, colour =
//! sigmoid(raw)), rendered by the same differentiable renderer as every later stage; the gradient runs
//! from the loss through the VAE encoder and the renderer to the grid. The UNet is evaluated without a
//! graph (its Jacobian is not part of SDS). Decisions the paper leaves open: textual inversion uses the
//! UNet without camera conditioning (input poses are unknown then) on crops composited over white;
//! score distillation encodes the latent mean (no latent sampling).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use image::{imageops, GrayImage, Rgb, RgbImage};
use serde::Serialize;
use tracing::info;

use crate::config::{Guidance, SdsConfig};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{pixel_grid, render_rays_tensor, CameraBatch, RenderWhat};
use crate::geometry::se3::orbit_camera_from_object;
use crate::geometry::Intrinsics;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::random::{normal_samples, random_varbuilder, splitmix};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::shape::CanonicalShape;

/// Number of diffusion training timesteps of SD 2.1 / MVDream.
pub const TRAIN_TIMESTEPS: usize = 1000;

/// The DDPM noise schedule of Stable Diffusion ("scaled linear" betas 0.00085..0.012).
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// Cumulative products of `1 - beta_t`, one per training timestep.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// SD's schedule: `beta_t = (lerp(sqrt(0.00085), sqrt(0.012), t / 999))^2`.
    pub fn stable_diffusion() -> Self {
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut prod = 1.0;
        let alphas_cumprod = (0..TRAIN_TIMESTEPS)
            .map(|t| {
                let s = a + (b - a) * t as f64 / (TRAIN_TIMESTEPS - 1) as f64;
                prod *= 1.0 - s * s;
                prod
            })
            .collect();
        Self { alphas_cumprod }
    }

    fn coefficients(&self, timesteps: &[usize], device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let mut sa = Vec::with_capacity(timesteps.len());
        let mut sb = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let ac = *self
                .alphas_cumprod
                .get(t)
                .ok_or_else(|| Error::InvalidInput(format!("timestep {t} outside 0..{TRAIN_TIMESTEPS}")))?;
            sa.push(ac.sqrt() as f32);
            sb.push((1.0 - ac).sqrt() as f32);
        }
        let n = timesteps.len();
        Ok((
            Tensor::from_vec(sa, (n, 1, 1, 1), device)?.to_dtype(dtype)?,
            Tensor::from_vec(sb, (n, 1, 1, 1), device)?.to_dtype(dtype)?,
        ))
    }

    /// `x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps` for `[B, C, H, W]` and one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(timesteps, x0.device(), x0.dtype())?;
        Ok((x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?)
    }

    /// The x0 a noise prediction implies: `(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`.
    pub fn predict_x0(&self, xt: &Tensor, eps: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(timesteps, xt.device(), xt.dtype())?;
        Ok((xt - eps.broadcast_mul(&sb)?)?.broadcast_div(&sa)?)
    }
}

/// Which UNet guides score distillation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum GuidanceKind {
    /// MVDream: views of one object attend to each other, cameras condition the UNet.
    Mvdream,
    /// Stable Diffusion 2.1: each view alone.
    StableDiffusion,
}

/// The frozen diffusion prior: tokenizer, text encoder, UNet and VAE.
pub struct DiffusionModels {
    /// Prompt tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Text encoder (OpenCLIP-H for SD 2.1).
    pub text: ClipTextModel,
    /// Encoder layers to skip at the end (1 for a full 24-layer OpenCLIP-H: SD 2 reads the penultimate layer).
    pub text_skip_layers: usize,
    /// Noise-prediction UNet.
    pub unet: UNet,
    /// Latent autoencoder.
    pub vae: Vae,
    /// How the UNet is used.
    pub kind: GuidanceKind,
    /// Noise schedule.
    pub schedule: NoiseSchedule,
    /// Where the models came from (for logs and the run's record).
    pub source: String,
}

fn missing_weights_dir() -> Error {
    Error::Config(
        "shape `sds` needs diffusion weights: pass --weights-dir DIR (diffusers layout of stable-diffusion-2-1-base, \
         optionally with mvdream/unet.safetensors) or set sds.weights_dir; config/tiny.yaml runs it with random tiny models"
            .into(),
    )
}

fn not_a_weights_dir(dir: &Path) -> Error {
    Error::Weights {
        path: dir.to_path_buf(),
        message: "not a folder; expected diffusion weights in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, \
                  optional mvdream/unet.safetensors)"
            .into(),
    }
}

/// Files of a diffusers-layout weights folder.
fn weight_file(dir: &Path, parts: &[&str]) -> PathBuf {
    parts.iter().fold(dir.to_path_buf(), |p, s| p.join(s))
}

impl DiffusionModels {
    /// Loads the models from a diffusers-layout folder: `tokenizer/{vocab.json,merges.txt}`,
    /// `text_encoder/model.safetensors`, `vae/diffusion_pytorch_model.safetensors`, and
    /// `unet/diffusion_pytorch_model.safetensors` (SD 2.1) and/or `mvdream/unet.safetensors`
    /// (MVDream, converted by `congeal convert-mvdream`). f16 on GPUs, f32 on the CPU.
    pub fn load(dir: &Path, guidance: Guidance, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(not_a_weights_dir(dir));
        }
        let dtype = if device.is_cpu() { DType::F32 } else { DType::F16 };
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let text_path = weight_file(dir, &["text_encoder", "model.safetensors"]);
        let text_cfg = ClipTextConfig::from_file(&text_path)?;
        let text_skip_layers = usize::from(text_cfg.num_hidden_layers == 24);
        let text = ClipTextModel::load(&text_path, &text_cfg, dtype, device)?;
        let vae_path = weight_file(dir, &["vae", "diffusion_pytorch_model.safetensors"]);
        let vae = Vae::load(&vae_path, &VaeConfig::from_file(&vae_path)?, dtype, device)?;
        let mv_path = weight_file(dir, &["mvdream", "unet.safetensors"]);
        let sd_path = weight_file(dir, &["unet", "diffusion_pytorch_model.safetensors"]);
        let (unet_path, kind) = match guidance {
            Guidance::Mvdream => (mv_path, GuidanceKind::Mvdream),
            Guidance::Sd => (sd_path, GuidanceKind::StableDiffusion),
            Guidance::Auto if mv_path.is_file() => (mv_path, GuidanceKind::Mvdream),
            Guidance::Auto => (sd_path, GuidanceKind::StableDiffusion),
        };
        let unet_cfg = UNetConfig::from_file(&unet_path)?;
        if kind == GuidanceKind::Mvdream && unet_cfg.camera_dim.is_none() {
            return Err(Error::Weights {
                path: unet_path,
                message: "an MVDream UNet needs the camera embedding (camera_embedding.linear_1/2)".into(),
            });
        }
        let unet = UNet::load(&unet_path, &unet_cfg, dtype, device)?;
        Ok(Self {
            tokenizer,
            text,
            text_skip_layers,
            unet,
            vae,
            kind,
            schedule: NoiseSchedule::stable_diffusion(),
            source: dir.display().to_string(),
        })
    }

    /// Seeded random tiny models (the `tiny` configuration; no weight files) in `dtype`. `kind` picks a
    /// camera-conditioned multi-view UNet or a plain one.
    pub fn random_tiny(seed: u64, kind: GuidanceKind, dtype: DType, device: &Device) -> Result<Self> {
        let text_cfg = ClipTextConfig::tiny();
        let text = ClipTextModel::from_varbuilder(&text_cfg, random_varbuilder(seed, dtype, device))?;
        let mut unet_cfg = UNetConfig::tiny();
        unet_cfg.cross_attention_dim = text_cfg.hidden_size;
        unet_cfg.camera_dim = if kind == GuidanceKind::Mvdream { Some(16) } else { None };
        let unet = UNet::from_varbuilder(&unet_cfg, random_varbuilder(seed.wrapping_add(1), dtype, device))?;
        let vae = Vae::from_varbuilder(&VaeConfig::tiny(), random_varbuilder(seed.wrapping_add(2), dtype, device))?;
        Ok(Self {
            tokenizer: ClipTokenizer::hashed(text_cfg.vocab_size, text_cfg.max_position_embeddings)?,
            text,
            text_skip_layers: 0,
            unet,
            vae,
            kind,
            schedule: NoiseSchedule::stable_diffusion(),
            source: format!("random tiny models (seed {seed})"),
        })
    }

    /// Checks, without loading anything, that `for_config` can find weights (fails fast, before the
    /// earlier stages of a run spend time).
    pub fn check_available(cfg: &SdsConfig, weights_dir: Option<&Path>) -> Result<()> {
        if cfg.random_models {
            return Ok(());
        }
        match weights_dir.map(Path::to_path_buf).or_else(|| cfg.weights_dir.as_ref().map(PathBuf::from)) {
            None => Err(missing_weights_dir()),
            Some(dir) if !dir.is_dir() => Err(not_a_weights_dir(&dir)),
            Some(_) => Ok(()),
        }
    }

    /// Models for a run: random tiny ones when `cfg.random_models`, else from `weights_dir` (the
    /// command line's `--weights-dir` wins over `cfg.weights_dir`).
    pub fn for_config(cfg: &SdsConfig, weights_dir: Option<&Path>, device: &Device) -> Result<Self> {
        if cfg.random_models {
            let kind = if cfg.guidance == Guidance::Sd { GuidanceKind::StableDiffusion } else { GuidanceKind::Mvdream };
            return Self::random_tiny(cfg.seed, kind, DType::F32, device);
        }
        let dir = weights_dir
            .map(Path::to_path_buf)
            .or_else(|| cfg.weights_dir.as_ref().map(PathBuf::from))
            .ok_or_else(missing_weights_dir)?;
        Self::load(&dir, cfg.guidance, device)
    }

    /// The model dtype (f32 on the CPU, f16 on GPUs).
    pub fn dtype(&self) -> DType {
        self.text.token_embedding().dtype()
    }

    /// Encodes a prompt into UNet conditioning `[1, L, C]` (no placeholder substitution).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.prompt_ids(prompt)?;
        self.text.forward_embeddings(&self.text.embed_tokens(&ids)?, self.text_skip_layers)
    }

    fn prompt_ids(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let n = ids.len();
        Ok(Tensor::from_vec(ids, (1, n), self.text.token_embedding().device())?)
    }
}

/// The prompt with the rows of its placeholder tokens replaced by trainable (or learned) embeddings.
pub struct PlaceholderPrompt {
    /// Token embeddings of the prompt, `[1, L, C]`, without the substitution.
    base: Tensor,
    /// Positions in the token sequence, one per placeholder row.
    pub positions: Vec<usize>,
}

impl PlaceholderPrompt {
    /// Tokenises `prompt` and finds the tokens of `words` (every token of every occurrence).
    pub fn new(models: &DiffusionModels, prompt: &str, words: &[String]) -> Result<Self> {
        let ids = models.prompt_ids(prompt)?;
        let base = models.text.embed_tokens(&ids)?.detach();
        let mut positions = Vec::new();
        for w in words {
            let found = models.tokenizer.token_positions(prompt, w)?;
            if found.is_empty() {
                return Err(Error::Config(format!("placeholder word `{w}` is not in the prompt `{prompt}`")));
            }
            positions.extend(found);
        }
        positions.sort_unstable();
        positions.dedup();
        Ok(Self { base, positions })
    }

    /// The initial values of the placeholder rows, `[P, C]`.
    pub fn initial_rows(&self) -> Result<Tensor> {
        let rows: Vec<Tensor> = self.positions.iter().map(|&p| self.base.get(0)?.get(p)).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// Token embeddings `[1, L, C]` with the placeholder rows taken from `rows` (`[P, C]`); the
    /// gradient reaches `rows`.
    pub fn embeddings(&self, rows: &Tensor) -> Result<Tensor> {
        let len = self.base.dim(1)?;
        let mut parts = Vec::with_capacity(2 * self.positions.len() + 1);
        let mut start = 0;
        for (k, &p) in self.positions.iter().enumerate() {
            if p > start {
                parts.push(self.base.narrow(1, start, p - start)?);
            }
            parts.push(rows.narrow(0, k, 1)?.unsqueeze(0)?.to_dtype(self.base.dtype())?);
            start = p + 1;
        }
        if start < len {
            parts.push(self.base.narrow(1, start, len - start)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// The result of textual inversion (y*).
#[derive(Clone, Debug)]
pub struct TextualInversion {
    /// The prompt.
    pub prompt: String,
    /// Placeholder words.
    pub words: Vec<String>,
    /// Token positions of the learned rows.
    pub positions: Vec<usize>,
    /// Learned rows `[P, C]` (f32, CPU).
    pub rows: Tensor,
    /// Mean diffusion loss per tenth of the run.
    pub loss_curve: Vec<f64>,
}

impl TextualInversion {
    /// Writes y* as safetensors (`embeddings` `[P, C]`; metadata: prompt, words, positions).
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = [
            ("prompt".to_string(), self.prompt.clone()),
            ("placeholder_words".to_string(), self.words.join(",")),
            ("positions".to_string(), self.positions.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")),
        ]
        .into_iter()
        .collect();
        let data = self.rows.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let tensors = [("embeddings".to_string(), data)].into_iter().collect();
        crate::models::convert::write_safetensors(path, &crate::models::convert::ConvertedModel { tensors, metadata })
    }
}

/// A small deterministic random stream (views, timesteps, image picks, noise).
struct Stream {
    state: u64,
}

impl Stream {
    fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x5DEE_CE66_D1CE_4E5B }
    }

    fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.state)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, r: [f64; 2]) -> f64 {
        r[0] + (r[1] - r[0]) * self.uniform()
    }

    fn normal(&mut self, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        let v = normal_samples(self.next_u64(), n);
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    }
}

/// Crops each (image, mask) to the mask's tight bbox, composites the object over white, pads to a
/// square and resizes to `size`: a `[N, 3, size, size]` tensor in [-1, 1] (the VAE's input range).
pub fn masked_square_crops(images: &[(&RgbImage, &GrayImage)], size: u32, device: &Device) -> Result<Tensor> {
    if images.is_empty() || size == 0 {
        return Err(Error::InvalidInput("textual inversion needs at least one image".into()));
    }
    let mut data = Vec::with_capacity(images.len() * 3 * (size * size) as usize);
    for (rgb, mask) in images {
        if rgb.dimensions() != mask.dimensions() {
            return Err(Error::InvalidInput(format!("image {:?} and mask {:?} differ in size", rgb.dimensions(), mask.dimensions())));
        }
        let (w, h) = rgb.dimensions();
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        for (x, y, m) in mask.enumerate_pixels() {
            if m[0] >= 128 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
        if x1 <= x0 || y1 <= y0 {
            return Err(Error::InvalidInput("empty mask: nothing to learn the object from".into()));
        }
        let side = (x1 - x0).max(y1 - y0);
        let mut square = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
        let (ox, oy) = ((side - (x1 - x0)) / 2, (side - (y1 - y0)) / 2);
        for y in y0..y1 {
            for x in x0..x1 {
                let a = mask.get_pixel(x, y)[0] as f32 / 255.0;
                let p = rgb.get_pixel(x, y);
                let c = Rgb([0, 1, 2].map(|k| (p[k] as f32 * a + 255.0 * (1.0 - a)).round() as u8));
                square.put_pixel(ox + x - x0, oy + y - y0, c);
            }
        }
        let resized = imageops::resize(&square, size, size, imageops::FilterType::Triangle);
        for c in 0..3 {
            for p in resized.pixels() {
                data.push(p[c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size as usize, size as usize), device)?)
}

fn check_finite(t: &Tensor, what: &str) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !v.is_finite() {
        return Err(Error::InvalidInput(format!("{what} is not finite ({v}); lower the learning rate or check the weights")));
    }
    Ok(v)
}

/// Textual inversion (Eq. 5): optimises the placeholder rows of the prompt's token embeddings with the
/// diffusion training loss on `crops` (`[N, 3, S, S]` in [-1, 1]); only those rows change.
pub fn textual_inversion(models: &DiffusionModels, crops: &Tensor, cfg: &SdsConfig, progress: &dyn Fn(f32)) -> Result<TextualInversion> {
    let device = crops.device().clone();
    let dtype = models.dtype();
    let n = crops.dim(0)?;
    let prompt = PlaceholderPrompt::new(models, &cfg.prompt, &cfg.placeholder_words)?;
    // Latents of every crop once (the VAE is frozen): mean and std of the latent Gaussian.
    let sf = models.vae.scaling_factor();
    let mut means = Vec::with_capacity(n);
    let mut stds = Vec::with_capacity(n);
    for i in 0..n {
        let (mean, logvar) = models.vae.encode(&crops.narrow(0, i, 1)?.to_dtype(dtype)?)?;
        means.push(mean.detach());
        stds.push((logvar * 0.5)?.exp()?.detach());
    }
    let rows = Var::from_tensor(&prompt.initial_rows()?.to_dtype(DType::F32)?)?;
    let mut opt = AdamW::new(
        vec![rows.clone()],
        ParamsAdamW { lr: cfg.ti_lr, weight_decay: cfg.ti_weight_decay, ..Default::default() },
    )?;
    let mut rng = Stream::new(cfg.seed ^ 0x7153);
    let mut losses = Vec::new();
    let mut curve = Vec::new();
    let chunk = (cfg.ti_iterations / 10).max(1);
    for step in 0..cfg.ti_iterations {
        let picks: Vec<usize> = (0..cfg.ti_batch).map(|_| (rng.next_u64() % n as u64) as usize).collect();
        let mut latents = Vec::with_capacity(picks.len());
        for &i in &picks {
            let shape = means[i].dims().to_vec();
            let z = (&means[i] + stds[i].mul(&rng.normal(&shape, &device, dtype)?)?)?;
            latents.push((z * sf)?);
        }
        let latents = Tensor::cat(&latents, 0)?;
        let b = picks.len();
        let timesteps: Vec<usize> = (0..b).map(|_| (rng.next_u64() % TRAIN_TIMESTEPS as u64) as usize).collect();
        let noise = rng.normal(latents.dims(), &device, dtype)?;
        let noisy = models.schedule.add_noise(&latents, &noise, &timesteps)?;
        let cond = models
            .text
            .forward_embeddings(&prompt.embeddings(rows.as_tensor())?, models.text_skip_layers)?;
        let cond = cond.broadcast_as((b, cond.dim(1)?, cond.dim(2)?))?;
        let t = Tensor::from_vec(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, &device)?.to_dtype(dtype)?;
        let pred = models.unet.forward(&noisy, &t, &cond, None, 1)?;
        let loss = (pred.to_dtype(DType::F32)? - noise.to_dtype(DType::F32)?)?.sqr()?.mean_all()?;
        let l = check_finite(&loss, &format!("textual inversion loss at step {step}"))?;
        opt.backward_step(&loss)?;
        losses.push(l);
        if losses.len() == chunk || step + 1 == cfg.ti_iterations {
            curve.push(losses.iter().sum::<f64>() / losses.len() as f64);
            losses.clear();
        }
        progress((step + 1) as f32 / cfg.ti_iterations.max(1) as f32);
    }
    Ok(TextualInversion {
        prompt: cfg.prompt.clone(),
        words: cfg.placeholder_words.clone(),
        positions: prompt.positions.clone(),
        rows: rows.as_tensor().detach(),
        loss_curve: curve,
    })
}

/// Bilinear resampling of `[B, C, H, W]` to `[B, C, out_h, out_w]` (half-pixel centres, no
/// antialiasing, as torch's `interpolate(mode="bilinear", align_corners=False)`), written as two
/// matrix products so that it is differentiable (candle's `upsample_bilinear2d` has no backward).
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let ah = Tensor::from_vec(bilinear_matrix(h, out_h), (out_h, h), x.device())?.to_dtype(x.dtype())?;
    let aw_t = Tensor::from_vec(bilinear_matrix(w, out_w), (out_w, w), x.device())?.to_dtype(x.dtype())?.t()?;
    Ok(ah.broadcast_matmul(x)?.broadcast_matmul(&aw_t)?)
}

/// Row-stochastic `[out, inp]` matrix of 1-D bilinear interpolation with half-pixel centres.
fn bilinear_matrix(inp: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for i in 0..out {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let f = (src - i0 as f64) as f32;
        m[i * inp + i0] += 1.0 - f;
        m[i * inp + i1] += f;
    }
    m
}

/// MVDream's camera condition for a view at (`azimuth_deg`, `elevation_deg`): the 4x4 camera-to-world
/// matrix of an OpenGL camera (x right, y up, looking down -z) on the unit sphere looking at the origin
/// in a y-up world, converted to Blender's z-up world (`[x, -z, y]`), flattened row-major. Azimuth 0
/// looks from +z and 90 from +x, as in [`orbit_camera_from_object`], so the object frame's +y is up.
pub fn mvdream_camera(azimuth_deg: f64, elevation_deg: f64) -> [f32; 16] {
    let (sa, ca) = azimuth_deg.to_radians().sin_cos();
    let (se, ce) = elevation_deg.to_radians().sin_cos();
    let pos = [ce * sa, se, ce * ca];
    let forward = [-pos[0], -pos[1], -pos[2]];
    // right = forward x up(0, 1, 0), normalised; up' = right x forward.
    let right = {
        let r = [-forward[2], 0.0, forward[0]];
        let n = (r[0] * r[0] + r[2] * r[2]).sqrt().max(1e-12);
        [r[0] / n, 0.0, r[2] / n]
    };
    let up = [
        right[1] * forward[2] - right[2] * forward[1],
        right[2] * forward[0] - right[0] * forward[2],
        right[0] * forward[1] - right[1] * forward[0],
    ];
    // Columns: right, up, -forward, position (OpenGL camera-to-world in a y-up world).
    let cols = [right, up, [-forward[0], -forward[1], -forward[2]], pos];
    let mut gl = [[0f64; 4]; 4];
    for (j, c) in cols.iter().enumerate() {
        for i in 0..3 {
            gl[i][j] = c[i];
        }
    }
    gl[3][3] = 1.0;
    // Blender world: rows (x, -z, y) of the y-up world.
    let rows = [gl[0], gl[2].map(|v| -v), gl[1], gl[3]];
    let mut out = [0f32; 16];
    for i in 0..4 {
        for j in 0..4 {
            out[i * 4 + j] = rows[i][j] as f32;
        }
    }
    out
}

/// The trainable canonical field of score distillation.
pub struct SdsField {
    /// Raw density per cell `[V, 1]` (before the blob bias and softplus).
    pub raw_density: Var,
    /// Raw colour per cell `[V, 3]` (before the sigmoid).
    pub raw_colour: Var,
    blob: Tensor,
    dims: [usize; 3],
    density_scale: f64,
}

/// `softplus(x) = max(x, 0) + ln(1 + exp(-|x|))`, stable and differentiable.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Grid bbox of the SDS field (normalised units).
const SDS_GRID_HALF: f32 = 0.5;

impl SdsField {
    /// A `grid^3` field with the Magic3D blob: bias `blob_density * (1 - |p| / blob_radius)`.
    pub fn new(cfg: &SdsConfig, device: &Device) -> Result<Self> {
        let g = cfg.grid;
        let cell = 2.0 * SDS_GRID_HALF / g as f32;
        let mut blob = Vec::with_capacity(g * g * g);
        for z in 0..g {
            for y in 0..g {
                for x in 0..g {
                    let p = [x, y, z].map(|i| -SDS_GRID_HALF + (i as f32 + 0.5) * cell);
                    let r = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt() as f64;
                    blob.push((cfg.blob_density * (1.0 - r / cfg.blob_radius)) as f32);
                }
            }
        }
        let v = g * g * g;
        Ok(Self {
            raw_density: Var::zeros((v, 1), DType::F32, device)?,
            raw_colour: Var::zeros((v, 3), DType::F32, device)?,
            blob: Tensor::from_vec(blob, (v, 1), device)?,
            dims: [g; 3],
            density_scale: cfg.density_scale,
        })
    }

    fn density(&self) -> Result<Tensor> {
        Ok((softplus(&(self.raw_density.as_tensor() + &self.blob)?)? * self.density_scale)?)
    }

    /// The field as the renderer sees it (differentiable in both grids; no host copy).
    pub fn field(&self) -> Result<CanonicalField> {
        Ok(CanonicalField {
            dims: self.dims,
            grid_min: [-SDS_GRID_HALF; 3],
            grid_max: [SDS_GRID_HALF; 3],
            density: self.density()?,
            colour: candle_nn::ops::sigmoid(self.raw_colour.as_tensor())?,
            nocs_min: [-SDS_GRID_HALF; 3],
            nocs_max: [SDS_GRID_HALF; 3],
            units_per_normalised: 1.0,
            bounding_radius: SDS_GRID_HALF * 3f32.sqrt(),
            density_per_occupancy: SURFACE_DENSITY * 2.0,
            host: None,
        })
    }

    /// Freezes the field into a canonical shape: the occupied region (density above
    /// [`SURFACE_DENSITY`]) defines the canonical bbox, rescaled so its longest side is 1 as for
    /// templates; NOCS refers to that bbox.
    pub fn freeze(&self) -> Result<CanonicalShape> {
        let colour = candle_nn::ops::sigmoid(&self.raw_colour.as_tensor().detach())?;
        // Haze below HAZE_DENSITY is cleared: it would widen the silhouettes beyond the shape's
        // bounding sphere, which the later stages frame their cameras by.
        let mut host = self.density()?.detach().flatten_all()?.to_vec1::<f32>()?;
        for d in host.iter_mut() {
            if *d < HAZE_DENSITY {
                *d = 0.0;
            }
        }
        let g = self.dims[0];
        let cell = 2.0 * SDS_GRID_HALF / g as f32;
        let (mut lo, mut hi) = ([f32::MAX; 3], [f32::MIN; 3]);
        let mut radius = 0f32;
        let mut surface = false;
        for z in 0..g {
            for y in 0..g {
                for x in 0..g {
                    let d = host[(z * g + y) * g + x];
                    if d <= 0.0 {
                        continue;
                    }
                    let c = [x, y, z].map(|i| -SDS_GRID_HALF + (i as f32 + 0.5) * cell);
                    radius = radius.max((c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt() + 0.87 * cell);
                    if d > SURFACE_DENSITY {
                        surface = true;
                        for k in 0..3 {
                            lo[k] = lo[k].min(c[k] - 0.5 * cell);
                            hi[k] = hi[k].max(c[k] + 0.5 * cell);
                        }
                    }
                }
            }
        }
        let density = Tensor::from_vec(host.clone(), (host.len(), 1), self.raw_density.as_tensor().device())?;
        if !surface {
            radius = 0.0;
        }
        if radius == 0.0 {
            return Err(Error::InvalidInput(format!(
                "score distillation left an empty field (no density above {SURFACE_DENSITY}); try more iterations or a larger blob"
            )));
        }
        let extent = (0..3).map(|k| hi[k] - lo[k]).fold(0f32, f32::max);
        let occupied = host.iter().filter(|d| **d > SURFACE_DENSITY).count();
        let max_density = host.iter().copied().fold(0f32, f32::max);
        info!("sds field: {occupied} of {} cells above density {SURFACE_DENSITY} (max {max_density:.1}), bbox {lo:?}..{hi:?}", host.len());
        let s = 1.0 / extent;
        let field = CanonicalField::from_parts(
            self.dims,
            ([-SDS_GRID_HALF * s; 3], [SDS_GRID_HALF * s; 3]),
            (density * extent as f64)?,
            colour,
            (lo.map(|v| v * s), hi.map(|v| v * s)),
            extent as f64,
            radius * s,
            SURFACE_DENSITY * 2.0 * extent,
        )?;
        Ok(CanonicalShape { field, bbox: (lo.map(f64::from), hi.map(f64::from)) })
    }
}

/// Density (1 / normalised units of the unit SDS grid) taken as the surface: iso-level 0.5 of the
/// mesh, and the threshold of the occupied bbox.
pub const SURFACE_DENSITY: f32 = 10.0;

/// Density below which the frozen field is cleared (haze that would only blur silhouettes).
pub const HAZE_DENSITY: f32 = 1.0;

/// What score distillation did, for the run's record.
#[derive(Clone, Debug, Serialize)]
pub struct SdsReport {
    /// Where the models came from.
    pub models: String,
    /// MVDream or SD 2.1.
    pub guidance: GuidanceKind,
    /// Textual inversion loss per tenth of its run.
    pub ti_loss_curve: Vec<f64>,
    /// SDS loss per tenth of its run.
    pub sds_loss_curve: Vec<f64>,
    /// Seconds in textual inversion.
    pub ti_seconds: f64,
    /// Seconds in score distillation.
    pub sds_seconds: f64,
}

/// The views of one score-distillation step: `cfg.views` cameras at azimuths `360 / views` degrees
/// apart around the object, sharing elevation, FoV and distance.
pub struct SdsViews {
    /// The cameras for the renderer.
    pub cameras: CameraBatch,
    /// MVDream camera conditions `[V, 16]` ([`mvdream_camera`]).
    pub mv_cameras: Tensor,
    /// Render side in pixels.
    pub res: u32,
}

impl SdsViews {
    /// Views starting at `azimuth0_deg`; `distance_scale` multiplies the distance at which the unit
    /// grid's half-side just fills the vertical FoV.
    pub fn new(views: usize, res: u32, azimuth0_deg: f64, elevation_deg: f64, fov_deg: f64, distance_scale: f64, device: &Device) -> Result<Self> {
        let dist = distance_scale * SDS_GRID_HALF as f64 / (0.5 * fov_deg.to_radians()).tan();
        let mut poses = Vec::with_capacity(views);
        let mut intr = Vec::with_capacity(views);
        let mut cams = Vec::with_capacity(views * 16);
        for k in 0..views {
            let az = azimuth0_deg + 360.0 * k as f64 / views as f64;
            poses.push(orbit_camera_from_object(az, elevation_deg, dist));
            intr.push(Intrinsics::from_fov_y(fov_deg, res, res)?);
            cams.extend(mvdream_camera(az, elevation_deg));
        }
        Ok(Self {
            cameras: CameraBatch::from_poses(&poses, &intr, device)?,
            mv_cameras: Tensor::from_vec(cams, (views, 16), device)?,
            res,
        })
    }
}

fn sample_views(cfg: &SdsConfig, res: u32, rng: &mut Stream, device: &Device) -> Result<SdsViews> {
    let az0 = rng.range([-180.0, 180.0]);
    let el = rng.range(cfg.elevation_deg);
    let fov = rng.range(cfg.fov_deg);
    let dist = rng.range(cfg.distance_scale);
    SdsViews::new(cfg.views, res, az0, el, fov, dist, device)
}

/// Regularisation statistics of one step's renders (differentiable).
pub struct RenderStats {
    /// Mean rendered opacity over all pixels (the sparsity regulariser).
    pub mean_opacity: Tensor,
    /// Ref-NeRF orientation penalty summed over the rays and divided by the number of rays the
    /// object covers (opacity > 0.5), when asked for.
    pub orientation: Option<Tensor>,
}

/// Renders the views over `background` (`[3]` in [0, 1]): `[V, 3, res, res]` in [0, 1], and the
/// regulariser statistics.
fn render_views(
    field: &CanonicalField,
    views: &SdsViews,
    background: &[f32; 3],
    samples: usize,
    orientation: bool,
) -> Result<(Tensor, RenderStats)> {
    let device = field.device();
    let n = views.cameras.len();
    let res = views.res as usize;
    let pixels = pixel_grid(views.res, views.res, device)?.broadcast_as((n, res * res, 2))?.contiguous()?;
    let rays = views.cameras.rays(&pixels)?;
    let r = render_rays_tensor(field, &rays, samples, RenderWhat { colour: true, orientation, ..Default::default() })?;
    let colour = r.colour.ok_or_else(|| Error::InvalidInput("renderer returned no colour".into()))?;
    let bg = Tensor::from_vec(background.to_vec(), (1, 3), device)?;
    let alpha = r.opacity.unsqueeze(1)?;
    let rgb = (colour + alpha.affine(-1.0, 1.0)?.broadcast_mul(&bg)?)?;
    let img = rgb.reshape((n, res, res, 3))?.permute((0, 3, 1, 2))?.contiguous()?;
    let orientation = match r.orientation {
        Some(o) => {
            let covered = r.opacity.detach().ge(0.5)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?.max(1.0);
            Some((o.sum_all()? / covered as f64)?)
        }
        None => None,
    };
    Ok((img, RenderStats { mean_opacity: r.opacity.mean_all()?, orientation }))
}

/// Renders `views` of `field` over `background`, resamples them to `guidance_resolution` and encodes
/// them: the scaled latent means `[V, C, h, w]` (differentiable in the field's grids) and the
/// regulariser statistics (the orientation penalty when `orientation`).
pub fn render_latents(
    models: &DiffusionModels,
    field: &CanonicalField,
    views: &SdsViews,
    background: &[f32; 3],
    samples_per_ray: usize,
    guidance_resolution: u32,
    orientation: bool,
) -> Result<(Tensor, RenderStats)> {
    let (img, stats) = render_views(field, views, background, samples_per_ray, orientation)?;
    let gr = guidance_resolution as usize;
    let img = resize_bilinear(&img, gr, gr)?.affine(2.0, -1.0)?.to_dtype(models.dtype())?;
    let (mean, _) = models.vae.encode(&img)?;
    Ok(((mean * models.vae.scaling_factor())?, stats))
}

/// Score distillation (Eq. 2-4, lambda = 0): optimises an [`SdsField`] under the frozen prior
/// conditioned on `cond` (y*, `[1, L, C]`) against `uncond` (`[1, L, C]`).
pub fn score_distillation(
    models: &DiffusionModels,
    cond: &Tensor,
    uncond: &Tensor,
    cfg: &SdsConfig,
    device: &Device,
    progress: &dyn Fn(f32),
) -> Result<(SdsField, Vec<f64>)> {
    let dtype = models.dtype();
    let field = SdsField::new(cfg, device)?;
    let mut opt = AdamW::new(
        vec![field.raw_density.clone(), field.raw_colour.clone()],
        ParamsAdamW { lr: cfg.grid_lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let v = cfg.views;
    let multiview = models.kind == GuidanceKind::Mvdream;
    let (l, c) = (cond.dim(1)?, cond.dim(2)?);
    let ehs = Tensor::cat(&[uncond.broadcast_as((v, l, c))?, cond.broadcast_as((v, l, c))?], 0)?.to_dtype(dtype)?.detach();
    let mut rng = Stream::new(cfg.seed ^ 0x5d5);
    let mut losses = Vec::new();
    let mut curve = Vec::new();
    let chunk = (cfg.iterations / 10).max(1);
    for step in 0..cfg.iterations {
        let frac = (step as f64 / cfg.anneal_steps.max(1) as f64).min(1.0);
        let lo = cfg.t_start[0] + (cfg.t_end[0] - cfg.t_start[0]) * frac;
        let hi = cfg.t_start[1] + (cfg.t_end[1] - cfg.t_start[1]) * frac;
        let t = ((rng.range([lo, hi]) * TRAIN_TIMESTEPS as f64) as usize).clamp(1, TRAIN_TIMESTEPS - 1);
        let res = if step >= cfg.high_res_from { cfg.high_res } else { cfg.low_res };
        let views = sample_views(cfg, res, &mut rng, device)?;
        let background = if cfg.random_background {
            [rng.uniform() as f32, rng.uniform() as f32, rng.uniform() as f32]
        } else {
            [1.0; 3]
        };
        let f = field.field()?;
        let (latents, stats) = render_latents(
            models,
            &f,
            &views,
            &background,
            cfg.samples_per_ray,
            cfg.guidance_resolution,
            cfg.orientation_weight > 0.0,
        )?;
        let noise = rng.normal(latents.dims(), device, dtype)?;
        let ts = vec![t; v];
        let noisy = models.schedule.add_noise(&latents.detach(), &noise, &ts)?;
        let t2 = Tensor::full(t as f32, 2 * v, device)?.to_dtype(dtype)?;
        let cams = if multiview { Some(Tensor::cat(&[&views.mv_cameras, &views.mv_cameras], 0)?.to_dtype(dtype)?) } else { None };
        let eps = models
            .unet
            .forward(&Tensor::cat(&[&noisy, &noisy], 0)?, &t2, &ehs, cams.as_ref(), if multiview { v } else { 1 })?
            .detach();
        let eps_u = eps.narrow(0, 0, v)?;
        let eps_c = eps.narrow(0, v, v)?;
        let eps_cfg = (&eps_u + ((&eps_c - &eps_u)? * cfg.guidance_scale)?)?;
        let mut target = models.schedule.predict_x0(&noisy, &eps_cfg, &ts)?;
        if cfg.recon_std_rescale > 0.0 {
            let nocfg = models.schedule.predict_x0(&noisy, &eps_c, &ts)?;
            let std = |x: &Tensor| -> Result<f64> {
                let x = x.to_dtype(DType::F64)?;
                let m = x.mean_all()?.to_scalar::<f64>()?;
                Ok((x - m)?.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt())
            };
            // One object per step, so one factor for its views (MVDream reshapes by object).
            let factor = (std(&nocfg)? + 1e-8) / (std(&target)? + 1e-8);
            let adjusted = (&target * factor)?;
            target = ((adjusted * cfg.recon_std_rescale)? + (target * (1.0 - cfg.recon_std_rescale))?)?;
        }
        let diff = (latents.to_dtype(DType::F32)? - target.detach().to_dtype(DType::F32)?)?;
        let mut loss = (diff.sqr()?.sum_all()? * (0.5 / v as f64))?;
        if cfg.sparsity_weight > 0.0 {
            loss = (loss + (stats.mean_opacity.to_dtype(DType::F32)? * cfg.sparsity_weight)?)?;
        }
        if let Some(o) = &stats.orientation {
            loss = (loss + (o.to_dtype(DType::F32)? * cfg.orientation_weight)?)?;
        }
        let lv = check_finite(&loss, &format!("score distillation loss at step {step}"))?;
        opt.backward_step(&loss)?;
        losses.push(lv);
        if losses.len() == chunk || step + 1 == cfg.iterations {
            curve.push(losses.iter().sum::<f64>() / losses.len() as f64);
            losses.clear();
        }
        progress((step + 1) as f32 / cfg.iterations.max(1) as f32);
    }
    Ok((field, curve))
}

/// Stages 1-2 end to end: textual inversion on the masked inputs, then score distillation; writes
/// `textual_inversion.safetensors` and `sds.json` into `out_dir` when given.
pub fn build_sds_shape(
    images: &[(&RgbImage, &GrayImage)],
    cfg: &SdsConfig,
    weights_dir: Option<&Path>,
    device: &Device,
    out_dir: Option<&Path>,
    progress: &dyn Fn(&str, f32),
) -> Result<(CanonicalShape, SdsReport)> {
    cfg.validate()?;
    let models = DiffusionModels::for_config(cfg, weights_dir, device)?;
    info!("sds: {:?} guidance from {}", models.kind, models.source);
    let t = Instant::now();
    let crops = masked_square_crops(images, cfg.ti_resolution, device)?;
    let ti = textual_inversion(&models, &crops, cfg, &|f| progress("textual_inversion", f))?;
    let ti_seconds = t.elapsed().as_secs_f64();
    info!("textual inversion: {} steps in {ti_seconds:.1}s, loss {:?}", cfg.ti_iterations, ti.loss_curve);
    let t = Instant::now();
    let prompt = PlaceholderPrompt::new(&models, &cfg.prompt, &cfg.placeholder_words)?;
    let cond = models
        .text
        .forward_embeddings(&prompt.embeddings(&ti.rows.to_dtype(models.dtype())?)?, models.text_skip_layers)?
        .detach();
    let uncond = models.encode_prompt(&cfg.negative_prompt)?.detach();
    let (field, sds_curve) = score_distillation(&models, &cond, &uncond, cfg, device, &|f| progress("score_distillation", f))?;
    let sds_seconds = t.elapsed().as_secs_f64();
    info!("score distillation: {} steps in {sds_seconds:.1}s, loss {:?}", cfg.iterations, sds_curve);
    let shape = field.freeze()?;
    let report = SdsReport {
        models: models.source.clone(),
        guidance: models.kind,
        ti_loss_curve: ti.loss_curve.clone(),
        sds_loss_curve: sds_curve,
        ti_seconds,
        sds_seconds,
    };
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        ti.save(&dir.join("textual_inversion.safetensors"))?;
        let json = serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let path = dir.join("sds.json");
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    }
    Ok((shape, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_closed_form_and_inverts() {
        let s = NoiseSchedule::stable_diffusion();
        // diffusers' scaled_linear: first beta 0.00085, last 0.012.
        assert!((s.alphas_cumprod[0] - (1.0 - 0.00085)).abs() < 1e-12);
        let last_ratio = s.alphas_cumprod[999] / s.alphas_cumprod[998];
        assert!((1.0 - last_ratio - 0.012).abs() < 1e-9);
        assert!((s.alphas_cumprod[999] - 0.0046).abs() < 2e-4, "{}", s.alphas_cumprod[999]);
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let eps = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        let xt = s.add_noise(&x0, &eps, &[10, 900]).unwrap();
        let back = s.predict_x0(&xt, &eps, &[10, 900]).unwrap();
        let d = (back - x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn bilinear_resize_matches_direct_interpolation_and_has_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((1, 1, 3, 4)).unwrap();
        let y = resize_bilinear(&x, 6, 8).unwrap();
        // Half-pixel centres: output (0,0) samples source (-0.25,-0.25) -> clamped to (0,0);
        // output (1,1) samples (0.25, 0.25): 0.75^2*0 + 0.75*0.25*1 + 0.25*0.75*4 + 0.25^2*5.
        let v = y.to_vec3::<f32>().unwrap_or_default();
        let v = if v.is_empty() { y.squeeze(0).unwrap().to_vec3::<f32>().unwrap() } else { v };
        assert!((v[0][0][0] - 0.0).abs() < 1e-6);
        let expect = 0.75 * 0.25 * 1.0 + 0.25 * 0.75 * 4.0 + 0.0625 * 5.0;
        assert!((v[0][1][1] - expect).abs() < 1e-5, "{} vs {expect}", v[0][1][1]);
        let var = Var::from_tensor(&x).unwrap();
        let g = resize_bilinear(var.as_tensor(), 6, 8).unwrap().sum_all().unwrap().backward().unwrap();
        // Each output distributes weight 1 over the inputs: gradients sum to the output count.
        let total = g.get(var.as_tensor()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((total - 48.0).abs() < 1e-3, "{total}");
    }

    #[test]
    fn mvdream_camera_is_a_unit_sphere_camera_to_world() {
        for (az, el) in [(0.0, 0.0), (90.0, 15.0), (-135.0, 30.0)] {
            let m = mvdream_camera(az, el);
            let r = |i: usize, j: usize| m[i * 4 + j] as f64;
            for a in 0..3 {
                for b in 0..3 {
                    let dot: f64 = (0..3).map(|k| r(k, a) * r(k, b)).sum();
                    assert!((dot - if a == b { 1.0 } else { 0.0 }).abs() < 1e-6);
                }
            }
            let t = [r(0, 3), r(1, 3), r(2, 3)];
            assert!(((t[0] * t[0] + t[1] * t[1] + t[2] * t[2]).sqrt() - 1.0).abs() < 1e-6);
            // Blender z-up: elevation is the z component of the camera position.
            assert!((t[2] - el.to_radians().sin()).abs() < 1e-6);
            // The camera looks at the origin: its -z axis (third column, negated) is -position.
            for k in 0..3 {
                assert!((r(k, 2) - t[k]).abs() < 1e-6);
            }
            assert_eq!(&m[12..], &[0.0, 0.0, 0.0, 1.0]);
        }
        // Azimuth 0, elevation 0: camera on the object's +z (Blender -y), right = +x.
        let m = mvdream_camera(0.0, 0.0);
        assert!((m[7] + 1.0).abs() < 1e-6 && (m[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn blob_field_renders_an_opaque_centre_and_freezes_to_a_unit_bbox() {
        let cfg = SdsConfig { grid: 16, ..SdsConfig::default() };
        let field = SdsField::new(&cfg, &Device::Cpu).unwrap();
        let shape = field.freeze().unwrap();
        let (lo, hi) = (shape.field.nocs_min, shape.field.nocs_max);
        let extent = (0..3).map(|k| hi[k] - lo[k]).fold(0f32, f32::max);
        assert!((extent - 1.0).abs() < 1e-5, "{extent}");
        let mut rng = Stream::new(1);
        let views = sample_views(&cfg, 16, &mut rng, &Device::Cpu).unwrap();
        let (img, stats) = render_views(&field.field().unwrap(), &views, &[1.0, 1.0, 1.0], 32, true).unwrap();
        assert_eq!(img.dims(), &[4, 3, 16, 16]);
        let o = stats.mean_opacity.to_scalar::<f32>().unwrap();
        // A ball's density falls outwards, so the normals where the weight is (its front) face the
        // cameras: a small penalty (from what light reaches the back half of the soft blob).
        let ball = stats.orientation.unwrap().to_scalar::<f32>().unwrap();
        // Turned inside out (no blob; density growing outwards), the normals face away: a large penalty.
        let inverted = SdsField::new(&SdsConfig { blob_density: 0.0, ..cfg.clone() }, &Device::Cpu).unwrap();
        let g = 16;
        let cell = 1.0 / g as f32;
        let radial: Vec<f32> = (0..g * g * g)
            .map(|i| {
                let (x, y, z) = (i % g, (i / g) % g, i / (g * g));
                let p = [x, y, z].map(|k| -0.5 + (k as f32 + 0.5) * cell);
                20.0 * (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt() - 4.0
            })
            .collect();
        inverted.raw_density.set(&Tensor::from_vec(radial, (g * g * g, 1), &Device::Cpu).unwrap()).unwrap();
        let (_, stats) = render_views(&inverted.field().unwrap(), &views, &[1.0, 1.0, 1.0], 32, true).unwrap();
        let inside_out = stats.orientation.unwrap().to_scalar::<f32>().unwrap();
        assert!(inside_out > 5.0 * ball, "orientation penalty: ball {ball}, inverted ball {inside_out}");
        assert!(o > 0.02 && o < 0.9, "mean opacity {o}");
        // The frozen field is what pose initialisation renders: its candidates must see it.
        let pcfg = crate::config::Config::default().pose_init;
        let pcfg = crate::config::PoseInitConfig { azimuths: 4, elevations: 2, fovs_deg: vec![30.0], render_size: 32, ..pcfg };
        let set = crate::congeal::pose_init::render_candidates(&shape.field, &pcfg, 1 << 16).unwrap();
        assert_eq!(set.candidates.len(), 8);
    }
}
