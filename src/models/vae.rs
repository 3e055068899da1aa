//! The Stable Diffusion (2.1) VAE, diffusers' `AutoencoderKL`, in the diffusers naming; our own code.
//!
//! Architecture (diffusers 0.31 `Encoder` / `Decoder` with the default `DownEncoderBlock2D` /
//! `UpDecoderBlock2D` blocks, `norm_type="group"`):
//! - ResNet blocks: GroupNorm (eps 1e-6), SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv, plus the input
//!   (through a 1x1 `conv_shortcut` when the channel count changes); no time embedding, output scale 1;
//! - encoder: `conv_in`, per level `layers_per_block` ResNets then (all but the last level) a
//!   downsampler that pads one zero row/column at the bottom/right and applies a 3x3 stride-2 conv
//!   without padding; a mid block (ResNet, single-head self-attention over the HxW positions with a
//!   GroupNorm in front and a residual connection, ResNet); GroupNorm, SiLU, `conv_out` to
//!   `2 * latent_channels`; then the 1x1 `quant_conv`, whose output splits into mean and log-variance
//!   (the latter clamped to [-30, 20], as diffusers' `DiagonalGaussianDistribution` does);
//! - decoder: the 1x1 `post_quant_conv`, `conv_in`, mid block, per level (channels reversed)
//!   `layers_per_block + 1` ResNets then (all but the last level) nearest x2 upsampling and a 3x3 conv;
//!   GroupNorm, SiLU, `conv_out`.
//!
//! Every operation is differentiable in candle (norms and softmax come from [`super::ops`]), so
//! gradients flow from [`Vae::encode`]'s outputs back to the input images (score distillation) and to
//! the weights.
//!
//! Weights: one safetensors file in the diffusers naming (`encoder.*`, `decoder.*`, `quant_conv.*`,
//! `post_quant_conv.*`); the mid-block attention may use the current names `to_q/to_k/to_v/to_out.0`
//! or the legacy `query/key/value/proj_attn`. Latents are "unscaled": multiply [`Vae::encode`]'s mean
//! by [`Vae::scaling_factor`] before the UNet and divide by it before [`Vae::decode`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::ops::{self, Conv2d, GroupNorm, Linear};
use crate::error::{Error, Result};

/// GroupNorm epsilon used throughout the VAE.
const NORM_EPS: f64 = 1e-6;
/// Stable Diffusion's latent scaling factor (SD 1.x and 2.x).
const SD_SCALING_FACTOR: f64 = 0.18215;
/// What a VAE weight file is expected to hold (for error messages).
const WHAT: &str = "a diffusers AutoencoderKL safetensors file (encoder.*, decoder.*, quant_conv, post_quant_conv)";

/// Architecture of an `AutoencoderKL` (the subset of diffusers' config that the SD VAEs use).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels taken by the encoder (3).
    pub in_channels: usize,
    /// Image channels produced by the decoder (3).
    pub out_channels: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Channels of each resolution level, finest first (SD: 128, 256, 512, 512); the image side
    /// shrinks by `2^(levels - 1)`.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more per level).
    pub layers_per_block: usize,
    /// Groups of every GroupNorm (32).
    pub norm_num_groups: usize,
    /// Factor applied to latents before the diffusion model (0.18215 for SD 1.x/2.x).
    pub scaling_factor: f64,
}

impl VaeConfig {
    /// The Stable Diffusion 2.1 (and 1.x) VAE: 3 -> 4 latent channels, levels 128/256/512/512, 2 ResNets
    /// per level, 32 groups, scaling factor 0.18215 (downsampling factor 8).
    pub fn sd21() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: SD_SCALING_FACTOR,
        }
    }

    /// A tiny model for CPU runs and tests: levels 16/32, 1 ResNet per level, 8 groups (factor 2).
    pub fn tiny() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            scaling_factor: SD_SCALING_FACTOR,
        }
    }

    /// The factor by which the encoder shrinks each image side: `2^(levels - 1)`.
    pub fn downsampling_factor(&self) -> usize {
        1usize << self.block_out_channels.len().saturating_sub(1).min(30)
    }

    /// Checks that the configuration describes a buildable model.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("VAE: {m}")));
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return bad(format!(
                "zero channels (in {}, out {}, latent {})",
                self.in_channels, self.out_channels, self.latent_channels
            ));
        }
        if self.block_out_channels.is_empty() || self.block_out_channels.len() > 16 {
            return bad(format!("{} resolution levels (expected 1 to 16)", self.block_out_channels.len()));
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block is 0".into());
        }
        if self.norm_num_groups == 0 {
            return bad("norm_num_groups is 0".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return bad(format!("level width {c} is not a positive multiple of norm_num_groups {}", self.norm_num_groups));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad(format!("scaling_factor {} is not a positive number", self.scaling_factor));
        }
        Ok(())
    }

    /// Reads only the header of a diffusers-named safetensors file and infers the architecture from
    /// the tensor shapes. `norm_num_groups` and `scaling_factor` cannot be seen in shapes: they come
    /// from the file's `__metadata__` when present, else 32 and 0.18215 (the SD values).
    pub fn from_file(path: &Path) -> Result<Self> {
        let ops::SafetensorsHeader { shapes: tensors, metadata } = ops::read_safetensors_header(path, WHAT)?;
        let err = |m: String| Error::weights(path, format!("{m}; expected {WHAT}"));
        let shape = |name: &str, rank: usize| -> Result<&Vec<usize>> {
            match tensors.get(name) {
                Some(s) if s.len() == rank => Ok(s),
                Some(s) => Err(err(format!("tensor {name} has shape {s:?}, expected rank {rank}"))),
                None => Err(err(format!("missing tensor {name}"))),
            }
        };
        let in_channels = shape("encoder.conv_in.weight", 4)?[1];
        let mut block_out_channels = Vec::new();
        while let Some(s) = tensors.get(&format!("encoder.down_blocks.{}.resnets.0.conv1.weight", block_out_channels.len())) {
            let c = *s.first().ok_or_else(|| err("a conv1 weight of rank 0".into()))?;
            block_out_channels.push(c);
        }
        if block_out_channels.is_empty() {
            return Err(err("missing tensor encoder.down_blocks.0.resnets.0.conv1.weight".into()));
        }
        let mut layers_per_block = 0;
        while tensors.contains_key(&format!("encoder.down_blocks.0.resnets.{layers_per_block}.conv1.weight")) {
            layers_per_block += 1;
        }
        let latent_channels = shape("decoder.conv_in.weight", 4)?[1];
        let out_channels = shape("decoder.conv_out.weight", 4)?[0];
        let parse = |key: &str| -> Result<Option<f64>> {
            match metadata.get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| err(format!("metadata {key} = {v:?} is not a number"))),
            }
        };
        let norm_num_groups = match parse("norm_num_groups")? {
            None => 32,
            Some(g) if g >= 1.0 && g.fract() == 0.0 => g as usize,
            Some(g) => return Err(err(format!("metadata norm_num_groups = {g} is not a positive integer"))),
        };
        let cfg = Self {
            in_channels,
            out_channels,
            latent_channels,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            scaling_factor: parse("scaling_factor")?.unwrap_or(SD_SCALING_FACTOR),
        };
        cfg.validate().map_err(|e| err(format!("inferred configuration {cfg:?} is unusable: {e}")))?;
        Ok(cfg)
    }
}

/// Errors unless every element of `x` is finite (one reduction, read back to the host).
fn check_finite(x: &Tensor, what: &str) -> Result<()> {
    let s = x.detach().to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!("{what} contain NaN or infinite values")))
    }
}

/// diffusers' `ResnetBlock2D` without time embedding.
#[derive(Clone, Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(vb: &VarBuilder, groups: usize, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(vb, "norm1", groups, in_c, NORM_EPS)?,
            conv1: Conv2d::load(vb, "conv1", in_c, out_c, 3, 1, 1)?,
            norm2: GroupNorm::load(vb, "norm2", groups, out_c, NORM_EPS)?,
            conv2: Conv2d::load(vb, "conv2", out_c, out_c, 3, 1, 1)?,
            shortcut: if in_c != out_c { Some(Conv2d::load(vb, "conv_shortcut", in_c, out_c, 1, 1, 0)?) } else { None },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// diffusers' single-head `Attention` over the spatial positions of `[B, C, H, W]`, with a GroupNorm
/// in front and a residual connection.
#[derive(Clone, Debug)]
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn load(vb: &VarBuilder, groups: usize, c: usize) -> Result<Self> {
        // Legacy (pre-0.14 diffusers) checkpoints name the projections query/key/value/proj_attn.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        Ok(Self {
            norm: GroupNorm::load(vb, "group_norm", groups, c, NORM_EPS)?,
            q: Linear::load(vb, names[0], c, c, true)?,
            k: Linear::load(vb, names[1], c, c, true)?,
            v: Linear::load(vb, names[2], c, c, true)?,
            out: Linear::load(vb, names[3], c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let attended = ops::attention(&self.q.forward(&tokens)?, &self.k.forward(&tokens)?, &self.v.forward(&tokens)?, 1, None)?;
        let y = self.out.forward(&attended)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((y + x)?)
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: ResNet, attention, ResNet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: SpatialAttention,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn load(vb: &VarBuilder, groups: usize, c: usize) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::load(&vb.pp("resnets.0"), groups, c, c)?,
            attention: SpatialAttention::load(&vb.pp("attentions.0"), groups, c)?,
            resnet1: ResnetBlock::load(&vb.pp("resnets.1"), groups, c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.resnet0.forward(x)?;
        let x = self.attention.forward(&x)?;
        self.resnet1.forward(&x)
    }
}

/// One resolution level: ResNets, then an optional resampling conv.
#[derive(Clone, Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let chans = &cfg.block_out_channels;
        let last = chans[chans.len() - 1];
        let conv_in = Conv2d::load(vb, "conv_in", cfg.in_channels, chans[0], 3, 1, 1)?;
        let mut down = Vec::with_capacity(chans.len());
        let mut in_c = chans[0];
        for (i, &out_c) in chans.iter().enumerate() {
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                let c = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock::load(&bvb.pp(format!("resnets.{j}")), g, c, out_c)?);
            }
            let resample = if i + 1 < chans.len() {
                // Padding is applied asymmetrically in `forward`, so the conv itself has none.
                Some(Conv2d::load(&bvb, "downsamplers.0.conv", out_c, out_c, 3, 2, 0)?)
            } else {
                None
            };
            down.push(Level { resnets, resample });
            in_c = out_c;
        }
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::load(&vb.pp("mid_block"), g, last)?,
            norm_out: GroupNorm::load(vb, "conv_norm_out", g, last, NORM_EPS)?,
            conv_out: Conv2d::load(vb, "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for r in &level.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                // diffusers' Downsample2D with padding 0: one zero row at the bottom, one column at the right.
                h = conv.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: &VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = reversed[0];
        let first = reversed[reversed.len() - 1];
        let mut up = Vec::with_capacity(reversed.len());
        let mut in_c = top;
        for (i, &out_c) in reversed.iter().enumerate() {
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                let c = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock::load(&bvb.pp(format!("resnets.{j}")), g, c, out_c)?);
            }
            let resample =
                if i + 1 < reversed.len() { Some(Conv2d::load(&bvb, "upsamplers.0.conv", out_c, out_c, 3, 1, 1)?) } else { None };
            up.push(Level { resnets, resample });
            in_c = out_c;
        }
        Ok(Self {
            conv_in: Conv2d::load(vb, "conv_in", cfg.latent_channels, top, 3, 1, 1)?,
            mid: MidBlock::load(&vb.pp("mid_block"), g, top)?,
            up,
            norm_out: GroupNorm::load(vb, "conv_norm_out", g, first, NORM_EPS)?,
            conv_out: Conv2d::load(vb, "conv_out", first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in &self.up {
            for r in &level.resnets {
                h = r.forward(&h)?;
            }
            if let Some(conv) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// The Stable Diffusion VAE (diffusers `AutoencoderKL`): images in [-1, 1] <-> unscaled latents.
#[derive(Clone, Debug)]
pub struct Vae {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    dtype: DType,
}

impl Vae {
    /// Loads a diffusers-named safetensors file (as `dtype` on `device`) for the architecture `cfg`
    /// (see [`VaeConfig::from_file`]). A missing or unreadable file, a missing tensor or a tensor of
    /// the wrong shape is an [`Error::Weights`] naming the file and the tensor.
    pub fn load(path: &Path, cfg: &VaeConfig, dtype: DType, device: &Device) -> Result<Self> {
        let vb = ops::open_safetensors(path, dtype, device, WHAT)?;
        Self::from_varbuilder(cfg, vb).map_err(|e| match e {
            Error::Tensor(e) => Error::weights(path, format!("{e}; expected {WHAT}")),
            Error::Config(m) => Error::weights(path, format!("{m}; expected {WHAT}")),
            other => other,
        })
    }

    /// Builds the model from a [`VarBuilder`] rooted at the diffusers names (`encoder.*`, ...); with a
    /// `VarMap`-backed builder the weights become trainable variables.
    pub fn from_varbuilder(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let dtype = vb.dtype();
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::load(&vb.pp("encoder"), cfg)?,
            decoder: Decoder::load(&vb.pp("decoder"), cfg)?,
            quant_conv: Conv2d::load(&vb, "quant_conv", 2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, 1, 0)?,
            post_quant_conv: Conv2d::load(&vb, "post_quant_conv", cfg.latent_channels, cfg.latent_channels, 1, 1, 0)?,
            dtype,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The factor applied to latents before the diffusion model (0.18215 for SD 2.1).
    pub fn scaling_factor(&self) -> f64 {
        self.cfg.scaling_factor
    }

    /// Encodes `[B, in_channels, H, W]` images in [-1, 1] (H and W multiples of
    /// [`VaeConfig::downsampling_factor`]) into the latent Gaussian: `(mean, logvar)`, each
    /// `[B, latent_channels, H/f, W/f]`, unscaled, logvar clamped to [-30, 20]. Differentiable with
    /// respect to `images` and the weights. The input is cast to the weights' dtype.
    pub fn encode(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = self.cfg.downsampling_factor();
        let dims = images.dims();
        let ok = dims.len() == 4
            && dims[0] > 0
            && dims[1] == self.cfg.in_channels
            && dims[2] > 0
            && dims[3] > 0
            && dims[2].is_multiple_of(f)
            && dims[3].is_multiple_of(f);
        if !ok {
            return Err(Error::InvalidInput(format!(
                "VAE encode expects images [B, {}, H, W] with B > 0 and H, W positive multiples of {f}; got {dims:?}",
                self.cfg.in_channels
            )));
        }
        check_finite(images, "VAE encode input images")?;
        let moments = self.quant_conv.forward(&self.encoder.forward(&images.to_dtype(self.dtype)?)?)?;
        let l = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f64, 20f64)?;
        Ok((mean, logvar))
    }

    /// Decodes unscaled latents `[B, latent_channels, h, w]` into images `[B, out_channels, h*f, w*f]`
    /// (roughly in [-1, 1]): `post_quant_conv`, then the decoder. Differentiable.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let dims = latents.dims();
        let ok = dims.len() == 4 && dims[0] > 0 && dims[1] == self.cfg.latent_channels && dims[2] > 0 && dims[3] > 0;
        if !ok {
            return Err(Error::InvalidInput(format!(
                "VAE decode expects latents [B, {}, h, w] with B, h, w > 0; got {dims:?}",
                self.cfg.latent_channels
            )));
        }
        check_finite(latents, "VAE decode input latents")?;
        self.decoder.forward(&self.post_quant_conv.forward(&latents.to_dtype(self.dtype)?)?)
    }
}
