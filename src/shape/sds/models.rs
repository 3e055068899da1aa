//! The frozen diffusion prior: which models, where they come from.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::*;
use crate::config::{Guidance, SdsConfig};
use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::random::random_varbuilder;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};

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

pub(super) fn missing_weights_dir() -> Error {
    Error::Config(
        "shape `sds` needs diffusion weights: pass --weights-dir DIR (diffusers layout of stable-diffusion-2-1-base, \
         optionally with mvdream/unet.safetensors) or set sds.weights_dir; config/tiny.yaml runs it with random tiny models"
            .into(),
    )
}

pub(super) fn not_a_weights_dir(dir: &Path) -> Error {
    Error::Weights {
        path: dir.to_path_buf(),
        message: "not a folder; expected diffusion weights in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, \
                  optional mvdream/unet.safetensors)"
            .into(),
    }
}

/// Files of a diffusers-layout weights folder.
pub(super) fn weight_file(dir: &Path, parts: &[&str]) -> PathBuf {
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

    pub(super) fn prompt_ids(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let n = ids.len();
        Ok(Tensor::from_vec(ids, (1, n), self.text.token_embedding().device())?)
    }
}
