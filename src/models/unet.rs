//! The Stable Diffusion 2.1 denoising UNet (diffusers' `UNet2DConditionModel`) and its MVDream
//! multi-view variant, differentiable end to end.
//!
//! Our own implementation of diffusers 0.31's `UNet2DConditionModel` for the SD configuration family:
//! - sinusoidal timestep embedding (`flip_sin_to_cos = true`, `freq_shift = 0`, width
//!   `block_out_channels[0]`, computed in f32 as diffusers does), then `time_embedding.linear_1`,
//!   SiLU, `linear_2` (width `4 * block_out_channels[0]`); one timestep per sample;
//! - `conv_in`, down blocks (`ResnetBlock2D` x `layers_per_block`, each followed by a
//!   `Transformer2DModel` in the cross-attention blocks, then a stride-2 `Downsample2D` except in the
//!   last block), the mid block (resnet, transformer, resnet), up blocks (`layers_per_block + 1`
//!   resnets on the channel concatenation of the running sample and the skip, newest skip first,
//!   transformers in the blocks mirroring the cross-attention down blocks, nearest upsampling to the
//!   next skip's size then a 3x3 conv except in the last block), `conv_norm_out`, SiLU, `conv_out`;
//! - `ResnetBlock2D`: GroupNorm (eps 1e-5), SiLU, conv 3x3, `+ time_emb_proj(silu(emb))`, GroupNorm,
//!   SiLU, conv 3x3, plus the input (through a 1x1 `conv_shortcut` when the widths differ);
//! - `Transformer2DModel` with one `BasicTransformerBlock`: GroupNorm (eps 1e-6), `proj_in` (linear on
//!   `[B, HW, C]` for SD2 checkpoints, 1x1 conv for SD1-style ones), pre-LayerNorm (eps 1e-5)
//!   self-attention `attn1`, cross-attention `attn2` to the text tokens (no bias on q/k/v, bias on
//!   `to_out.0`, head width `C / heads`), GEGLU feed-forward (`ff.net.0.proj` to `2 * 4C`, first half
//!   times exact-erf GELU of the second half, `ff.net.2`), `proj_out`, residual.
//!
//! MVDream adds a camera embedding (`camera_embedding.linear_1/2`, i.e. diffusers'
//! `class_embed_type = "projection"`, whose `class_embedding.*` names are accepted too): an MLP of
//! the flattened 4x4 camera matrix `[B, 16]` added to the time embedding. With `num_views = V > 1` the
//! batch holds `B / V` objects of `V` consecutive views, and every self-attention attends across all
//! the views of its object (tokens `[n*V, HW, C]` regrouped as `[n, V*HW, C]`); cross-attention stays
//! per view.
//!
//! All normalisations and softmaxes are the differentiable ones of [`crate::models::ops`], so
//! gradients reach `encoder_hidden_states` (textual inversion), `sample` (score distillation) and the
//! camera. Weights: a diffusers `unet/diffusion_pytorch_model.safetensors` (only
//! `transformer_layers_per_block = 1`, as in SD 1.x/2.x).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::models::ops::{self, Conv2d, GroupNorm, LayerNorm, Linear};

const WHAT: &str = "a diffusers UNet2DConditionModel safetensors file (conv_in, time_embedding, down_blocks.*, \
                    mid_block.*, up_blocks.*, conv_norm_out, conv_out)";

/// Architecture of a [`UNet`] (diffusers' `UNet2DConditionModel` fields, SD naming).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Predicted channels out (4).
    pub out_channels: usize,
    /// Width of each resolution level (SD 2.1: 320, 640, 1280, 1280).
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Attention heads per level (diffusers' SD 2.1 config calls these `attention_head_dim`:
    /// 5, 10, 20, 20); the mid block uses the last.
    pub attention_heads: Vec<usize>,
    /// Width of the text tokens cross-attended to (SD 2.1: 1024).
    pub cross_attention_dim: usize,
    /// GroupNorm groups (32).
    pub norm_num_groups: usize,
    /// Linear `proj_in`/`proj_out` (SD 2.x) instead of 1x1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
    /// Which down blocks are `CrossAttnDownBlock2D` (the up blocks mirror them).
    pub cross_attn_blocks: Vec<bool>,
    /// Width of MVDream's camera input (16), `None` for plain Stable Diffusion.
    pub camera_dim: Option<usize>,
}

impl UNetConfig {
    /// Stable Diffusion 2.1 (base), `stabilityai/stable-diffusion-2-1-base`.
    pub fn sd21_base() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention_heads: vec![5, 10, 20, 20],
            cross_attention_dim: 1024,
            norm_num_groups: 32,
            use_linear_projection: true,
            cross_attn_blocks: vec![true, true, true, false],
            camera_dim: None,
        }
    }

    /// MVDream's SD 2.1-based multi-view UNet: SD 2.1 plus a 16-wide camera embedding.
    pub fn mvdream_sd21() -> Self {
        Self { camera_dim: Some(16), ..Self::sd21_base() }
    }

    /// A small model for CPU end-to-end runs: widths 32 and 64, one resnet per block, heads 2 and 4,
    /// 8 groups, cross-attention to 1024-wide tokens (the SD 2.1 text encoder's), no camera (set
    /// `camera_dim` for an MVDream-like one).
    pub fn tiny() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            attention_heads: vec![2, 4],
            cross_attention_dim: 1024,
            norm_num_groups: 8,
            use_linear_projection: true,
            cross_attn_blocks: vec![true, false],
            camera_dim: None,
        }
    }

    /// Width of the time embedding: `4 * block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels.first().copied().unwrap_or(0)
    }

    /// Checks that the fields are consistent (levels, groups and heads dividing the widths).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("UNet configuration: {m}")));
        let n = self.block_out_channels.len();
        if n == 0 || self.layers_per_block == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return bad(format!("empty model ({self:?})"));
        }
        if self.attention_heads.len() != n || self.cross_attn_blocks.len() != n {
            return bad(format!(
                "{n} levels but {} attention_heads and {} cross_attn_blocks",
                self.attention_heads.len(),
                self.cross_attn_blocks.len()
            ));
        }
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&self.attention_heads).enumerate() {
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                return bad(format!("level {i}: {c} channels not divisible into {} groups", self.norm_num_groups));
            }
            if h == 0 || c % h != 0 {
                return bad(format!("level {i}: {c} channels not divisible into {h} heads"));
            }
        }
        if self.cross_attention_dim == 0 || self.camera_dim == Some(0) {
            return bad("zero cross_attention_dim or camera_dim".into());
        }
        Ok(())
    }

    /// Reads only the header of a diffusers UNet safetensors file and infers the architecture from
    /// the tensor shapes. Heads come from the metadata `attention_heads` (e.g. `"5,10,20,20"`) when
    /// present, else are `channels / 64` (SD 2.x, MVDream); groups from `norm_num_groups`, else 32.
    pub fn from_file(path: &Path) -> Result<Self> {
        let ops::SafetensorsHeader { shapes: tensors, metadata } = ops::read_safetensors_header(path, WHAT)?;
        let err = |m: String| Error::weights(path, format!("{m}; expected {WHAT}"));
        let shape = |name: &str, rank: usize| -> Result<Vec<usize>> {
            match tensors.get(name) {
                Some(s) if s.len() == rank => Ok(s.clone()),
                Some(s) => Err(err(format!("tensor {name} has shape {s:?}, expected rank {rank}"))),
                None => Err(err(format!("missing tensor {name}"))),
            }
        };
        let conv_in = shape("conv_in.weight", 4)?;
        let conv_out = shape("conv_out.weight", 4)?;
        let mut block_out_channels = Vec::new();
        while tensors.contains_key(&format!("down_blocks.{}.resnets.0.conv1.weight", block_out_channels.len())) {
            let i = block_out_channels.len();
            block_out_channels.push(shape(&format!("down_blocks.{i}.resnets.0.conv1.weight"), 4)?[0]);
        }
        if block_out_channels.is_empty() {
            return Err(err("missing tensor down_blocks.0.resnets.0.conv1.weight".into()));
        }
        let mut layers_per_block = 0;
        while tensors.contains_key(&format!("down_blocks.0.resnets.{layers_per_block}.conv1.weight")) {
            layers_per_block += 1;
        }
        let cross_attn_blocks: Vec<bool> = (0..block_out_channels.len())
            .map(|i| tensors.contains_key(&format!("down_blocks.{i}.attentions.0.proj_in.weight")))
            .collect();
        let mid = "mid_block.attentions.0";
        let use_linear_projection = shape(&format!("{mid}.proj_in.weight"), 2).is_ok();
        let cross_attention_dim = shape(&format!("{mid}.transformer_blocks.0.attn2.to_k.weight"), 2)?[1];
        let camera_dim = ["camera_embedding", "class_embedding"]
            .iter()
            .find_map(|p| tensors.get(&format!("{p}.linear_1.weight")))
            .map(|s| s.get(1).copied().ok_or_else(|| err(format!("camera embedding weight of shape {s:?}"))))
            .transpose()?;
        let norm_num_groups = match metadata.get("norm_num_groups") {
            Some(s) => s.trim().parse().map_err(|_| err(format!("metadata norm_num_groups = {s:?}")))?,
            None => 32,
        };
        let attention_heads = match metadata.get("attention_heads") {
            Some(s) => s
                .split(|c: char| !c.is_ascii_digit())
                .filter(|p| !p.is_empty())
                .map(|p| p.parse::<usize>().map_err(|_| err(format!("metadata attention_heads = {s:?}"))))
                .collect::<Result<Vec<_>>>()?,
            None => block_out_channels.iter().map(|c| (c / 64).max(1)).collect(),
        };
        let cfg = Self {
            in_channels: conv_in[1],
            out_channels: conv_out[0],
            block_out_channels,
            layers_per_block,
            attention_heads,
            cross_attention_dim,
            norm_num_groups,
            use_linear_projection,
            cross_attn_blocks,
            camera_dim,
        };
        cfg.validate().map_err(|e| err(format!("inferred {e}")))?;
        Ok(cfg)
    }
}

/// The message of a candle error without the backtrace candle appends when `RUST_BACKTRACE` is set.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        other => other,
    }
}

fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// diffusers' `ResnetBlock2D` (default time-embedding norm, output scale 1).
#[derive(Clone, Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(vb: &VarBuilder, p: &str, groups: usize, cin: usize, cout: usize, temb: usize) -> Result<Self> {
        let shortcut =
            if cin != cout { Some(Conv2d::load(vb, &format!("{p}.conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: GroupNorm::load(vb, &format!("{p}.norm1"), groups, cin, 1e-5)?,
            conv1: Conv2d::load(vb, &format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: Linear::load(vb, &format!("{p}.time_emb_proj"), temb, cout, true)?,
            norm2: GroupNorm::load(vb, &format!("{p}.norm2"), groups, cout, 1e-5)?,
            conv2: Conv2d::load(vb, &format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            shortcut,
        })
    }

    /// `x` `[B, Cin, H, W]`, `emb` `[B, T]` (the raw time embedding; SiLU applied here).
    fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
        let t = self.time_emb_proj.forward(&silu(emb)?)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// diffusers' `Attention` with the plain processor: `to_q`, `to_k`, `to_v` (no bias), `to_out.0`.
#[derive(Clone, Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: &VarBuilder, p: &str, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(vb, &format!("{p}.to_q"), dim, dim, false)?,
            to_k: Linear::load(vb, &format!("{p}.to_k"), context_dim, dim, false)?,
            to_v: Linear::load(vb, &format!("{p}.to_v"), context_dim, dim, false)?,
            to_out: Linear::load(vb, &format!("{p}.to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    /// Self-attention of `x` `[B, L, C]` when `context` is `None` (jointly over groups of
    /// `num_views` consecutive batch items), else cross-attention to `context` `[B, M, Cc]`.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>, num_views: usize) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let q = self.to_q.forward(x)?;
        let out = match context {
            Some(ctx) => {
                let (k, v) = (self.to_k.forward(ctx)?, self.to_v.forward(ctx)?);
                ops::attention(&q, &k, &v, self.heads, None)?
            }
            None => {
                let (k, v) = (self.to_k.forward(x)?, self.to_v.forward(x)?);
                if num_views > 1 {
                    let joint = (b / num_views, num_views * l, c);
                    let o = ops::attention(&q.reshape(joint)?, &k.reshape(joint)?, &v.reshape(joint)?, self.heads, None)?;
                    o.reshape((b, l, c))?
                } else {
                    ops::attention(&q, &k, &v, self.heads, None)?
                }
            }
        };
        self.to_out.forward(&out)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self- then cross-attention, GEGLU feed-forward).
#[derive(Clone, Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(vb: &VarBuilder, p: &str, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::load(vb, &format!("{p}.norm1"), dim, 1e-5)?,
            attn1: Attention::load(vb, &format!("{p}.attn1"), dim, dim, heads)?,
            norm2: LayerNorm::load(vb, &format!("{p}.norm2"), dim, 1e-5)?,
            attn2: Attention::load(vb, &format!("{p}.attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::load(vb, &format!("{p}.norm3"), dim, 1e-5)?,
            ff_in: Linear::load(vb, &format!("{p}.ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: Linear::load(vb, &format!("{p}.ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, num_views: usize) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, num_views)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context), 1)? + &x)?;
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let half = h.dim(D::Minus1)? / 2;
        let (value, gate) = (h.narrow(D::Minus1, 0, half)?, h.narrow(D::Minus1, half, half)?);
        let h = (value * gate.gelu_erf()?)?;
        Ok((self.ff_out.forward(&h)? + x)?)
    }
}

/// A transformer input/output projection: linear on tokens (SD 2.x) or 1x1 conv on the map (SD 1.x).
#[derive(Clone, Debug)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` with one transformer block, on continuous inputs.
#[derive(Clone, Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    block: TransformerBlock,
    proj_out: Proj,
}

impl Transformer2D {
    fn load(vb: &VarBuilder, p: &str, cfg: &UNetConfig, dim: usize, heads: usize) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            let name = format!("{p}.{name}");
            Ok(if cfg.use_linear_projection {
                Proj::Linear(Linear::load(vb, &name, dim, dim, true)?)
            } else {
                Proj::Conv(Conv2d::load(vb, &name, dim, dim, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::load(vb, &format!("{p}.norm"), cfg.norm_num_groups, dim, 1e-6)?,
            proj_in: proj("proj_in")?,
            block: TransformerBlock::load(vb, &format!("{p}.transformer_blocks.0"), dim, cfg.cross_attention_dim, heads)?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, num_views: usize) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> { Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let to_map = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?) };
        let normed = self.norm.forward(x)?;
        let tokens = match &self.proj_in {
            Proj::Linear(l) => l.forward(&to_tokens(&normed)?)?,
            Proj::Conv(cv) => to_tokens(&cv.forward(&normed)?)?,
        };
        let tokens = self.block.forward(&tokens, context, num_views)?;
        let out = match &self.proj_out {
            Proj::Linear(l) => to_map(&l.forward(&tokens)?)?,
            Proj::Conv(cv) => cv.forward(&to_map(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}

/// A down block: resnets (each followed by a transformer in cross-attention blocks), then an
/// optional stride-2 downsampling conv.
#[derive(Clone, Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv2d>,
}

/// An up block: resnets on `[sample, skip]` (each followed by a transformer in cross-attention
/// blocks), then optional nearest upsampling and a conv.
#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

/// The Stable Diffusion (2.1) denoising UNet, optionally with MVDream's camera embedding and
/// multi-view self-attention. Differentiable with respect to all its inputs.
#[derive(Clone, Debug)]
pub struct UNet {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    camera: Option<(Linear, Linear)>,
    down: Vec<DownBlock>,
    mid: (ResnetBlock, Transformer2D, ResnetBlock),
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Loads a diffusers-named UNet safetensors file (`dtype` on `device`). A missing or unreadable
    /// file, or a missing tensor or wrong shape, is an [`Error::Weights`] naming the path (and the
    /// tensor).
    pub fn load(path: &Path, cfg: &UNetConfig, dtype: DType, device: &Device) -> Result<Self> {
        let vb = ops::open_safetensors(path, dtype, device, WHAT)?;
        Self::from_varbuilder(cfg, vb).map_err(|e| match e {
            Error::Tensor(e) => Error::weights(path, format!("{}; expected {WHAT}", without_backtrace(e))),
            other => other,
        })
    }

    /// A model with fixed-seed pseudo-random weights ([`crate::models::random`]), e.g. to time the
    /// full SD 2.1 configuration without its checkpoint. Every call gives the same weights.
    pub fn random(cfg: &UNetConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_varbuilder(cfg, crate::models::random::random_varbuilder(RANDOM_SEED, dtype, device))
    }

    /// Builds the model from a [`VarBuilder`] holding diffusers-named tensors.
    pub fn from_varbuilder(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let vb = &vb;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let c0 = ch[0];
        let temb = cfg.time_embed_dim();
        let g = cfg.norm_num_groups;
        let camera = match cfg.camera_dim {
            Some(cd) => {
                let p = if !vb.contains_tensor("camera_embedding.linear_1.weight")
                    && vb.contains_tensor("class_embedding.linear_1.weight")
                {
                    "class_embedding"
                } else {
                    "camera_embedding"
                };
                Some((
                    Linear::load(vb, &format!("{p}.linear_1"), cd, temb, true)?,
                    Linear::load(vb, &format!("{p}.linear_2"), temb, temb, true)?,
                ))
            }
            None => None,
        };
        let mut down = Vec::with_capacity(n);
        let mut prev = c0;
        for (i, &c) in ch.iter().enumerate() {
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let cin = if j == 0 { prev } else { c };
                resnets.push(ResnetBlock::load(vb, &format!("down_blocks.{i}.resnets.{j}"), g, cin, c, temb)?);
                if cfg.cross_attn_blocks[i] {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    attentions.push(Transformer2D::load(vb, &p, cfg, c, cfg.attention_heads[i])?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Conv2d::load(vb, &format!("down_blocks.{i}.downsamplers.0.conv"), c, c, 3, 2, 1)?)
            } else {
                None
            };
            down.push(DownBlock { resnets, attentions, downsample });
            prev = c;
        }
        let cl = ch[n - 1];
        let heads_mid = cfg.attention_heads[n - 1];
        let mid = (
            ResnetBlock::load(vb, "mid_block.resnets.0", g, cl, cl, temb)?,
            Transformer2D::load(vb, "mid_block.attentions.0", cfg, cl, heads_mid)?,
            ResnetBlock::load(vb, "mid_block.resnets.1", g, cl, cl, temb)?,
        );
        let mut up = Vec::with_capacity(n);
        let mut prev = cl;
        for i in 0..n {
            let level = n - 1 - i;
            let out = ch[level];
            let skip_in = ch[level.saturating_sub(1)];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=cfg.layers_per_block {
                let skip = if j == cfg.layers_per_block { skip_in } else { out };
                let cin = if j == 0 { prev } else { out };
                resnets.push(ResnetBlock::load(vb, &format!("up_blocks.{i}.resnets.{j}"), g, cin + skip, out, temb)?);
                if cfg.cross_attn_blocks[level] {
                    let p = format!("up_blocks.{i}.attentions.{j}");
                    attentions.push(Transformer2D::load(vb, &p, cfg, out, cfg.attention_heads[level])?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Conv2d::load(vb, &format!("up_blocks.{i}.upsamplers.0.conv"), out, out, 3, 1, 1)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, attentions, upsample });
            prev = out;
        }
        Ok(Self {
            cfg: cfg.clone(),
            conv_in: Conv2d::load(vb, "conv_in", cfg.in_channels, c0, 3, 1, 1)?,
            time_1: Linear::load(vb, "time_embedding.linear_1", c0, temb, true)?,
            time_2: Linear::load(vb, "time_embedding.linear_2", temb, temb, true)?,
            camera,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::load(vb, "conv_norm_out", g, c0, 1e-5)?,
            conv_out: Conv2d::load(vb, "conv_out", c0, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// The model's architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Predicts the noise (epsilon or v, whatever the checkpoint was trained for) of `sample`
    /// `[B, in_channels, h, w]` at `timesteps` `[B]` (one per sample; a single value is broadcast),
    /// conditioned on `encoder_hidden_states` `[B, L, cross_attention_dim]` and, for MVDream models,
    /// `camera` `[B, camera_dim]` (refused by models without a camera embedding; `None` leaves the
    /// camera term out, as MVDream's own forward does). With `num_views = V > 1` the
    /// batch is `B / V` objects of `V` consecutive views whose self-attention is joint; `1` is plain
    /// Stable Diffusion. Returns `[B, out_channels, h, w]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        camera: Option<&Tensor>,
        num_views: usize,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let bad = |m: String| Err(Error::InvalidInput(format!("UNet forward: {m}")));
        let dims = sample.dims();
        if dims.len() != 4 || dims[1] != cfg.in_channels || dims[2] == 0 || dims[3] == 0 {
            return bad(format!("sample of shape {dims:?}, expected [B, {}, h, w]", cfg.in_channels));
        }
        let b = dims[0];
        if num_views == 0 || !b.is_multiple_of(num_views) {
            return bad(format!("batch of {b} is not a whole number of objects of {num_views} views"));
        }
        let ehs = encoder_hidden_states.dims();
        if ehs.len() != 3 || ehs[0] != b || ehs[2] != cfg.cross_attention_dim {
            return bad(format!("encoder_hidden_states of shape {ehs:?}, expected [{b}, L, {}]", cfg.cross_attention_dim));
        }
        let t = match timesteps.dims() {
            [] | [1] => timesteps.reshape(1)?.broadcast_as(b)?,
            [n] if *n == b => timesteps.clone(),
            other => return bad(format!("timesteps of shape {other:?}, expected [{b}]")),
        };
        let dtype = sample.dtype();
        let t_emb = timestep_embedding(&t, cfg.block_out_channels[0])?.to_dtype(dtype)?;
        let mut emb = self.time_2.forward(&silu(&self.time_1.forward(&t_emb)?)?)?;
        match (&self.camera, camera) {
            (Some((l1, l2)), Some(cam)) => {
                let cd = cfg.camera_dim.unwrap_or(0);
                if cam.dims() != [b, cd] {
                    return bad(format!("camera of shape {:?}, expected [{b}, {cd}]", cam.dims()));
                }
                let c = l2.forward(&silu(&l1.forward(&cam.to_dtype(dtype)?)?)?)?;
                emb = (emb + c)?;
            }
            // As MVDream's own forward: no camera, no camera term (textual inversion on images of
            // unknown pose uses it so).
            (Some(_), None) => {}
            (None, Some(_)) => return bad("camera given but the model has no camera embedding".into()),
            (None, None) => {}
        }
        let ctx = encoder_hidden_states.to_dtype(dtype)?;

        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, &emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, &ctx, num_views)?;
                }
                skips.push(h.clone());
            }
            if let Some(conv) = &block.downsample {
                h = conv.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid.0.forward(&h, &emb)?;
        h = self.mid.1.forward(&h, &ctx, num_views)?;
        h = self.mid.2.forward(&h, &emb)?;
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| Error::InvalidInput("UNet forward: ran out of skip connections".into()))?;
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, &emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, &ctx, num_views)?;
                }
            }
            if let Some(conv) = &block.upsample {
                let (th, tw) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (2 * h.dim(2)?, 2 * h.dim(3)?),
                };
                h = conv.forward(&upsample_nearest(&h, th, tw)?)?;
            }
        }
        let h = silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}

/// Sinusoidal timestep features `[B, dim]` in f32 as diffusers' `Timesteps(dim, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`: `[cos(t f_i), sin(t f_i)]` with `f_i = exp(-ln(10000) i / (dim/2))`.
pub fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    if half == 0 {
        return Err(Error::InvalidInput(format!("timestep embedding of width {dim}")));
    }
    let b = timesteps.dim(0)?;
    let ln = -(10000f32).ln();
    let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / half as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps.to_dtype(DType::F32)?.reshape((b, 1))?.broadcast_mul(&freqs)?;
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((b, 1), DType::F32, timesteps.device())?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Nearest-neighbour resize of `[B, C, H, W]` to `[B, C, th, tw]` as torch's `interpolate(mode=
/// "nearest")` (source index `floor(dst * in / out)`), differentiable.
fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if th == 2 * h && tw == 2 * w {
        let y = x.unsqueeze(3)?.unsqueeze(5)?.broadcast_as((b, c, h, 2, w, 2))?;
        return Ok(y.reshape((b, c, th, tw))?);
    }
    let index = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let scale = n_in as f32 / n_out as f32;
        let idx: Vec<u32> =
            (0..n_out).map(|i| ((i as f32 * scale).floor() as usize).min(n_in.saturating_sub(1)) as u32).collect();
        Ok(Tensor::from_vec(idx, n_out, x.device())?)
    };
    let y = x.index_select(&index(h, th)?, 2)?;
    Ok(y.index_select(&index(w, tw)?, 3)?)
}

/// Seed of [`UNet::random`].
const RANDOM_SEED: u64 = 0x5d21;
