//! Converts MVDream's released checkpoint (`sd-v2.1-base-4view.pt`: a PyTorch zip pickle in the
//! original LDM / OpenCLIP naming, flat or nested under `state_dict`) into the safetensors files our
//! models read, in diffusers / HF naming:
//!
//! - `model.diffusion_model.*` (the multi-view UNet, SD 2.x layout, plus MVDream's `camera_embed.0/2`)
//!   -> `mvdream/unet.safetensors` (diffusers `UNet2DConditionModel` names, camera embedding as
//!   `camera_embedding.linear_1/2`);
//! - `first_stage_model.*` (KL autoencoder) -> `vae/diffusion_pytorch_model.safetensors`
//!   (diffusers `AutoencoderKL` names; the 1x1-convolution attention weights become linear `[C, C]`);
//! - `cond_stage_model.model.*` (OpenCLIP text tower) -> `text_encoder/model.safetensors`
//!   (HF `CLIPTextModel` names; fused in-projections split into q/k/v; all layers kept, including the
//!   24th that SD 2.x skips: our loader drops it itself).
//!
//! Tensors keep the dtype they have in the checkpoint (MVDream's release is f32). Every tensor of the
//! checkpoint is either converted or on an explicit ignore list ([`is_ignored`]: EMA copies, noise
//! schedule buffers, the CLIP projection and logit scale...); any other name is an error, so that a
//! checkpoint of another layout is not silently half-converted. The name maps are our own, written
//! from the layouts; `scripts/weights/make_tiny_mvdream_checkpoint.py` checks a synthetic checkpoint
//! in the real naming against diffusers' reference converters, and `tests/convert_mvdream.rs` checks
//! this module against it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Prefix of the UNet's tensors in an LDM checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the autoencoder's tensors in an LDM checkpoint.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the OpenCLIP text tower's tensors in an SD 2.x checkpoint.
pub const TEXT_PREFIX: &str = "cond_stage_model.model.";

/// Where the converted UNet goes, relative to the output folder.
pub const UNET_FILE: &str = "mvdream/unet.safetensors";
/// Where the converted autoencoder goes, relative to the output folder.
pub const VAE_FILE: &str = "vae/diffusion_pytorch_model.safetensors";
/// Where the converted text encoder goes, relative to the output folder.
pub const TEXT_ENCODER_FILE: &str = "text_encoder/model.safetensors";

/// Marker in the name [`open_clip_text_to_hf`] gives a fused attention in-projection
/// (`...self_attn.in_proj.weight` / `.bias`); the converter splits it into `q_proj`/`k_proj`/`v_proj`.
pub const FUSED_QKV: &str = ".self_attn.in_proj.";

/// Top-level checkpoint entries that are not model weights (noise schedule and loss buffers).
const IGNORED_NAMES: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
    "logvar",
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask",
];

/// Prefixes of checkpoint entries no model here uses: EMA copies of the UNet, the autoencoder's
/// training loss (LPIPS, discriminator), and an OpenCLIP image tower when one was left in.
const IGNORED_PREFIXES: &[&str] = &["model_ema.", "first_stage_model.loss.", "cond_stage_model.model.visual."];

/// Whether a full checkpoint name is on the ignore list (not converted, reported, no error).
pub fn is_ignored(name: &str) -> bool {
    IGNORED_NAMES.contains(&name) || IGNORED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Splits `stem.leaf` where leaf is `weight` or `bias`.
fn param_leaf(name: &str) -> Option<(&str, &str)> {
    let (stem, leaf) = name.rsplit_once('.')?;
    matches!(leaf, "weight" | "bias").then_some((stem, leaf))
}

/// Parses a decimal block index.
fn index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// LDM UNet resnet sub-layer (`in_layers.0.weight`, ...) -> diffusers (`norm1.weight`, ...).
fn unet_resnet(rest: &str) -> Option<String> {
    let (stem, leaf) = param_leaf(rest)?;
    let new = match stem {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{new}.{leaf}"))
}

/// A spatial transformer's parameter, whose names are the same in both namings.
fn unet_transformer(rest: &str) -> Option<String> {
    param_leaf(rest)?;
    let head = rest.split('.').next()?;
    matches!(head, "norm" | "proj_in" | "proj_out" | "transformer_blocks").then(|| rest.to_string())
}

/// Level structure of an LDM (openaimodel) UNet, which fixes how `input_blocks.{i}` /
/// `output_blocks.{i}` map to diffusers' `down_blocks.{level}` / `up_blocks.{level}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down level (LDM `num_res_blocks`); up levels have one more.
    pub layers_per_block: usize,
    /// Whether each level, shallowest first, has spatial transformers (its length is the level count).
    pub attention: Vec<bool>,
}

impl UnetLayout {
    /// SD 2.x / MVDream: 4 levels of 2 resnets, attention on the first three.
    pub fn sd2() -> Self {
        UnetLayout { layers_per_block: 2, attention: vec![true, true, true, false] }
    }

    /// Number of levels (down blocks, and up blocks).
    pub fn levels(&self) -> usize {
        self.attention.len()
    }

    /// Infers the layout from UNet tensor names (prefix already stripped): levels from the
    /// downsamplers (`input_blocks.{i}.0.op`), resnets per level from the input block count, attention
    /// from the `input_blocks.{i}.1.*` present. The message says what is inconsistent.
    pub fn infer<'a>(names: impl IntoIterator<Item = &'a str>) -> std::result::Result<Self, String> {
        let mut inputs = BTreeSet::new();
        let mut ops = BTreeSet::new();
        let mut with_attention = BTreeSet::new();
        for name in names {
            let parts: Vec<&str> = name.splitn(4, '.').collect();
            if parts.len() < 4 || parts[0] != "input_blocks" {
                continue;
            }
            let Some(i) = index(parts[1]) else { continue };
            inputs.insert(i);
            if parts[2] == "0" && parts[3].starts_with("op.") {
                ops.insert(i);
            }
            if parts[2] == "1" {
                with_attention.insert(i);
            }
        }
        let Some(&last) = inputs.iter().next_back() else {
            return Err("no input_blocks.* tensors".into());
        };
        let levels = ops.len() + 1;
        let count = last + 1;
        if count % levels != 0 || count / levels < 2 || inputs.len() != count {
            return Err(format!(
                "{count} input blocks ({} present) and {} downsamplers do not form levels of equal size",
                inputs.len(),
                ops.len()
            ));
        }
        let per = count / levels;
        let expected_ops: BTreeSet<usize> = (1..levels).map(|k| k * per).collect();
        if ops != expected_ops {
            return Err(format!("downsamplers at input blocks {ops:?}, expected {expected_ops:?}"));
        }
        let attention = (0..levels).map(|k| with_attention.iter().any(|&i| i >= 1 && (i - 1) / per == k)).collect();
        Ok(UnetLayout { layers_per_block: per - 1, attention })
    }

    /// Maps one LDM UNet name (`model.diffusion_model.` stripped) to its diffusers name; `None` when
    /// the name is not part of this layout. MVDream's `camera_embed.0/2` become
    /// `camera_embedding.linear_1/2`.
    pub fn map_name(&self, name: &str) -> Option<String> {
        let l = self.layers_per_block;
        let per = l + 1;
        let n = self.levels();
        if let Some((stem, leaf)) = param_leaf(name) {
            let fixed = match stem {
                "time_embed.0" => Some("time_embedding.linear_1"),
                "time_embed.2" => Some("time_embedding.linear_2"),
                "camera_embed.0" => Some("camera_embedding.linear_1"),
                "camera_embed.2" => Some("camera_embedding.linear_2"),
                "input_blocks.0.0" => Some("conv_in"),
                "out.0" => Some("conv_norm_out"),
                "out.2" => Some("conv_out"),
                _ => None,
            };
            if let Some(new) = fixed {
                return Some(format!("{new}.{leaf}"));
            }
        }
        let parts: Vec<&str> = name.splitn(4, '.').collect();
        match parts.as_slice() {
            ["input_blocks", i, slot, rest] => {
                let i = index(i)?;
                if i == 0 {
                    return None;
                }
                let (level, j) = ((i - 1) / per, (i - 1) % per);
                if level >= n {
                    return None;
                }
                match (*slot, j == l) {
                    ("0", true) if level + 1 < n => {
                        let (stem, leaf) = param_leaf(rest)?;
                        (stem == "op").then(|| format!("down_blocks.{level}.downsamplers.0.conv.{leaf}"))
                    }
                    ("0", false) => Some(format!("down_blocks.{level}.resnets.{j}.{}", unet_resnet(rest)?)),
                    ("1", false) if self.attention[level] => {
                        Some(format!("down_blocks.{level}.attentions.{j}.{}", unet_transformer(rest)?))
                    }
                    _ => None,
                }
            }
            ["middle_block", k, rest @ ..] => {
                let rest = rest.join(".");
                match *k {
                    "0" => Some(format!("mid_block.resnets.0.{}", unet_resnet(&rest)?)),
                    "1" => Some(format!("mid_block.attentions.0.{}", unet_transformer(&rest)?)),
                    "2" => Some(format!("mid_block.resnets.1.{}", unet_resnet(&rest)?)),
                    _ => None,
                }
            }
            ["output_blocks", i, slot, rest] => {
                let i = index(i)?;
                let (b, j) = (i / per, i % per);
                if b >= n {
                    return None;
                }
                let attention = self.attention[n - 1 - b];
                let upsampler = || {
                    let (stem, leaf) = param_leaf(rest)?;
                    (j == l && b + 1 < n && stem == "conv").then(|| format!("up_blocks.{b}.upsamplers.0.conv.{leaf}"))
                };
                match *slot {
                    "0" => Some(format!("up_blocks.{b}.resnets.{j}.{}", unet_resnet(rest)?)),
                    "1" if attention => Some(format!("up_blocks.{b}.attentions.{j}.{}", unet_transformer(rest)?)),
                    "1" => upsampler(),
                    "2" if attention => upsampler(),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Maps an LDM UNet name (`model.diffusion_model.` stripped) to diffusers naming for the SD 2.x /
/// MVDream layout ([`UnetLayout::sd2`]); `None` when the tensor is not part of that UNet.
pub fn ldm_unet_to_diffusers(name: &str) -> Option<String> {
    UnetLayout::sd2().map_name(name)
}

/// Level count of an LDM autoencoder (`encoder.down.{i}` / `decoder.up.{i}`); the decoder's levels
/// are numbered deepest-first in diffusers (`decoder.up.{i}` -> `decoder.up_blocks.{levels-1-i}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeLayout {
    /// Number of resolution levels.
    pub levels: usize,
}

impl VaeLayout {
    /// The SD autoencoder: 4 levels.
    pub fn sd() -> Self {
        VaeLayout { levels: 4 }
    }

    /// Infers the level count from autoencoder names (prefix stripped): one more than the highest
    /// `encoder.down.{i}` / `decoder.up.{i}`; `None` when there is neither.
    pub fn infer<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        names
            .into_iter()
            .filter_map(|name| {
                let rest = name.strip_prefix("encoder.down.").or_else(|| name.strip_prefix("decoder.up."))?;
                index(rest.split('.').next()?)
            })
            .max()
            .map(|m| VaeLayout { levels: m + 1 })
    }

    /// Maps one LDM autoencoder name (`first_stage_model.` stripped) to its diffusers name; `None`
    /// when the name is not part of this layout. Attention weights keep their LDM shape here (see
    /// [`convert_ldm_state_dict`] for the reshape).
    pub fn map_name(&self, name: &str) -> Option<String> {
        let n = self.levels;
        let (stem, leaf) = param_leaf(name)?;
        match stem {
            "quant_conv" | "post_quant_conv" | "encoder.conv_in" | "encoder.conv_out" | "decoder.conv_in"
            | "decoder.conv_out" => return Some(name.to_string()),
            "encoder.norm_out" | "decoder.norm_out" => {
                return Some(format!("{}.conv_norm_out.{leaf}", &stem[..7]));
            }
            _ => {}
        }
        let resnet = |sub: &str| -> Option<&'static str> {
            Some(match sub {
                "norm1" => "norm1",
                "conv1" => "conv1",
                "norm2" => "norm2",
                "conv2" => "conv2",
                "nin_shortcut" => "conv_shortcut",
                _ => return None,
            })
        };
        let parts: Vec<&str> = stem.split('.').collect();
        match parts.as_slice() {
            ["encoder", "down", i, "block", j, sub] => {
                let i = index(i)?;
                (i < n).then_some(())?;
                Some(format!("encoder.down_blocks.{i}.resnets.{}.{}.{leaf}", index(j)?, resnet(sub)?))
            }
            ["encoder", "down", i, "downsample", "conv"] => {
                let i = index(i)?;
                (i + 1 < n).then(|| format!("encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}"))
            }
            ["decoder", "up", i, "block", j, sub] => {
                let i = index(i)?;
                (i < n).then_some(())?;
                Some(format!("decoder.up_blocks.{}.resnets.{}.{}.{leaf}", n - 1 - i, index(j)?, resnet(sub)?))
            }
            ["decoder", "up", i, "upsample", "conv"] => {
                let i = index(i)?;
                (i >= 1 && i < n).then(|| format!("decoder.up_blocks.{}.upsamplers.0.conv.{leaf}", n - 1 - i))
            }
            [side @ ("encoder" | "decoder"), "mid", block, sub] => {
                let block = match *block {
                    "block_1" => "resnets.0",
                    "block_2" => "resnets.1",
                    "attn_1" => "attentions.0",
                    _ => return None,
                };
                let sub = if block == "attentions.0" {
                    match *sub {
                        "norm" => "group_norm",
                        "q" => "to_q",
                        "k" => "to_k",
                        "v" => "to_v",
                        "proj_out" => "to_out.0",
                        _ => return None,
                    }
                } else {
                    resnet(sub)?
                };
                Some(format!("{side}.mid_block.{block}.{sub}.{leaf}"))
            }
            _ => None,
        }
    }
}

/// Maps an LDM autoencoder name (`first_stage_model.` stripped) to diffusers naming for the SD
/// autoencoder's 4 levels ([`VaeLayout::sd`]); `None` when the tensor is not part of it.
pub fn ldm_vae_to_diffusers(name: &str) -> Option<String> {
    VaeLayout::sd().map_name(name)
}

/// Maps an OpenCLIP text-tower name (`cond_stage_model.model.` stripped) to HF `CLIPTextModel`
/// naming; `None` for tensors the text encoder does not use (`text_projection`, `logit_scale`...).
/// The fused `attn.in_proj_weight` / `attn.in_proj_bias` map to `...self_attn.in_proj.weight` /
/// `.bias` ([`FUSED_QKV`]), which [`convert_ldm_state_dict`] splits into q/k/v projections.
pub fn open_clip_text_to_hf(name: &str) -> Option<String> {
    match name {
        "token_embedding.weight" => return Some("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => return Some("text_model.embeddings.position_embedding.weight".into()),
        "ln_final.weight" => return Some("text_model.final_layer_norm.weight".into()),
        "ln_final.bias" => return Some("text_model.final_layer_norm.bias".into()),
        _ => {}
    }
    let rest = name.strip_prefix("transformer.resblocks.")?;
    let (i, sub) = rest.split_once('.')?;
    let i = index(i)?;
    let new = match sub {
        "attn.in_proj_weight" => "self_attn.in_proj.weight".to_string(),
        "attn.in_proj_bias" => "self_attn.in_proj.bias".to_string(),
        _ => {
            let (stem, leaf) = param_leaf(sub)?;
            let stem = match stem {
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                "attn.out_proj" => "self_attn.out_proj",
                _ => return None,
            };
            format!("{stem}.{leaf}")
        }
    };
    Some(format!("text_model.encoder.layers.{i}.{new}"))
}

/// One converted model: tensors in our naming and the metadata for its safetensors header.
#[derive(Debug, Clone, Default)]
pub struct ConvertedModel {
    /// Tensors by diffusers / HF name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Header metadata (architecture facts inferred from the tensors, source, dtype).
    pub metadata: BTreeMap<String, String>,
}

/// The three models of an MVDream / SD 2.x checkpoint, converted.
#[derive(Debug, Clone)]
pub struct ConvertedParts {
    /// The UNet's level structure, as inferred from the names.
    pub unet_layout: UnetLayout,
    /// The UNet in diffusers naming (with `camera_embedding.*` for MVDream).
    pub unet: ConvertedModel,
    /// The autoencoder in diffusers naming.
    pub vae: ConvertedModel,
    /// The OpenCLIP text tower in HF `CLIPTextModel` naming (all layers).
    pub text_encoder: ConvertedModel,
    /// Checkpoint names left out on purpose ([`is_ignored`]), sorted.
    pub ignored: Vec<String>,
}

/// What [`convert_mvdream_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Tensors written to the UNet file.
    pub unet_tensors: usize,
    /// Tensors written to the autoencoder file.
    pub vae_tensors: usize,
    /// Tensors written to the text-encoder file.
    pub text_encoder_tensors: usize,
    /// Transformer layers in the text encoder (24 for OpenCLIP ViT-H; all kept).
    pub text_layers: usize,
    /// The UNet's level structure, as inferred from the names.
    pub unet_layout: UnetLayout,
    /// Checkpoint names left out on purpose, sorted.
    pub ignored: Vec<String>,
    /// Distinct dtypes of the written tensors (those of the checkpoint; no conversion).
    pub dtypes: Vec<DType>,
    /// The files written: UNet, autoencoder, text encoder.
    pub files: Vec<PathBuf>,
}

/// The path used in errors about an in-memory state dict.
const IN_MEMORY: &str = "(in-memory state dict)";

/// Converts an LDM / OpenCLIP-named state dict (full names, e.g. `model.diffusion_model.out.2.weight`)
/// into the three models in our naming. The UNet and autoencoder level structures are inferred from
/// the names; tensors keep their dtype. Any name that is neither converted nor ignored
/// ([`is_ignored`]), a part with no tensors, or a tensor of an unexpected shape is an
/// [`Error::Weights`].
pub fn convert_ldm_state_dict(tensors: Vec<(String, Tensor)>) -> Result<ConvertedParts> {
    convert_at(Path::new(IN_MEMORY), tensors, Vec::new())
}

/// What a full checkpoint name is.
enum Route<'a> {
    Unet(&'a str),
    Vae(&'a str),
    Text(&'a str),
    Ignored,
    Unknown,
}

fn route(name: &str) -> Route<'_> {
    if is_ignored(name) {
        Route::Ignored
    } else if let Some(rest) = name.strip_prefix(UNET_PREFIX) {
        Route::Unet(rest)
    } else if let Some(rest) = name.strip_prefix(VAE_PREFIX) {
        Route::Vae(rest)
    } else if let Some(rest) = name.strip_prefix(TEXT_PREFIX) {
        Route::Text(rest)
    } else {
        Route::Unknown
    }
}

fn unknown_error(path: &Path, unknown: &[String]) -> Error {
    let shown: Vec<&str> = unknown.iter().take(8).map(String::as_str).collect();
    Error::weights(
        path,
        format!(
            "{} tensor name(s) are neither converted nor on the ignore list, e.g. {}; expected an MVDream / \
             SD 2.x LDM checkpoint ({UNET_PREFIX}* in the SD 2.x UNet layout, {VAE_PREFIX}*, {TEXT_PREFIX}*)",
            unknown.len(),
            shown.join(", ")
        ),
    )
}

fn insert(path: &Path, model: &mut ConvertedModel, from: &str, name: String, t: Tensor) -> Result<()> {
    if model.tensors.insert(name.clone(), t).is_some() {
        return Err(Error::weights(path, format!("two checkpoint tensors map to {name} (the second is {from})")));
    }
    Ok(())
}

fn convert_at(path: &Path, tensors: Vec<(String, Tensor)>, mut ignored: Vec<String>) -> Result<ConvertedParts> {
    let mut unet_in = Vec::new();
    let mut vae_in = Vec::new();
    let mut text_in = Vec::new();
    let mut unknown = Vec::new();
    for (name, t) in tensors {
        match route(&name) {
            Route::Unet(rest) => unet_in.push((rest.to_string(), name.clone(), t)),
            Route::Vae(rest) => vae_in.push((rest.to_string(), name.clone(), t)),
            Route::Text(rest) => text_in.push((rest.to_string(), name.clone(), t)),
            Route::Ignored => ignored.push(name),
            Route::Unknown => unknown.push(name),
        }
    }
    if unet_in.is_empty() || vae_in.is_empty() || text_in.is_empty() {
        let missing: Vec<&str> = [(UNET_PREFIX, &unet_in), (VAE_PREFIX, &vae_in), (TEXT_PREFIX, &text_in)]
            .iter()
            .filter(|(_, v)| v.is_empty())
            .map(|(p, _)| *p)
            .collect();
        return Err(Error::weights(
            path,
            format!("no {}* tensors; expected an MVDream / SD 2.x LDM checkpoint", missing.join("*, no ")),
        ));
    }

    let layout = UnetLayout::infer(unet_in.iter().map(|(n, _, _)| n.as_str()))
        .map_err(|m| Error::weights(path, format!("cannot infer the UNet levels from {UNET_PREFIX}*: {m}")))?;
    let vae_layout = VaeLayout::infer(vae_in.iter().map(|(n, _, _)| n.as_str()))
        .ok_or_else(|| Error::weights(path, format!("no {VAE_PREFIX}encoder.down.* / decoder.up.* tensors")))?;

    let mut parts = ConvertedParts {
        unet_layout: layout.clone(),
        unet: ConvertedModel::default(),
        vae: ConvertedModel::default(),
        text_encoder: ConvertedModel::default(),
        ignored: Vec::new(),
    };
    for (rest, full, t) in unet_in {
        match layout.map_name(&rest) {
            Some(name) => insert(path, &mut parts.unet, &full, name, t)?,
            None => unknown.push(full),
        }
    }
    for (rest, full, t) in vae_in {
        let Some(name) = vae_layout.map_name(&rest) else {
            unknown.push(full);
            continue;
        };
        let is_attn_weight = name.contains(".mid_block.attentions.0.to_") && name.ends_with(".weight");
        let t = if is_attn_weight && t.rank() > 2 {
            let dims = t.dims().to_vec();
            if dims[2..].iter().any(|&d| d != 1) {
                return Err(Error::weights(path, format!("{full} has shape {dims:?}, expected [C, C, 1, 1]")));
            }
            t.reshape((dims[0], dims[1]))?
        } else {
            t
        };
        insert(path, &mut parts.vae, &full, name, t)?;
    }
    for (rest, full, t) in text_in {
        let Some(name) = open_clip_text_to_hf(&rest) else {
            unknown.push(full);
            continue;
        };
        if let Some((head, leaf)) = name.split_once(FUSED_QKV) {
            let rows = t.dim(0)?;
            if rows % 3 != 0 || rows == 0 {
                return Err(Error::weights(path, format!("{full} has shape {:?}, expected [3C, ...]", t.dims())));
            }
            let c = rows / 3;
            for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let part = t.narrow(0, k * c, c)?.contiguous()?;
                insert(path, &mut parts.text_encoder, &full, format!("{head}.self_attn.{proj}.{leaf}"), part)?;
            }
        } else {
            insert(path, &mut parts.text_encoder, &full, name, t)?;
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(unknown_error(path, &unknown));
    }
    ignored.sort();
    parts.ignored = ignored;
    describe(&mut parts, &layout, vae_layout);
    Ok(parts)
}

/// Comma-separated list.
fn list<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// Fills in the metadata of each part from the names and shapes.
fn describe(parts: &mut ConvertedParts, layout: &UnetLayout, vae: VaeLayout) {
    let dim = |m: &ConvertedModel, name: &str, d: usize| m.tensors.get(name).and_then(|t| t.dims().get(d).copied());
    let dtype_of = |m: &ConvertedModel| list(m.tensors.values().map(|t| format!("{:?}", t.dtype())).collect::<BTreeSet<_>>());
    for m in [&mut parts.unet, &mut parts.vae, &mut parts.text_encoder] {
        m.metadata.insert("format".into(), "pt".into());
        m.metadata.insert("source".into(), "converted from an LDM / OpenCLIP checkpoint by congeal".into());
        let dt = dtype_of(m);
        m.metadata.insert("dtype".into(), dt);
    }

    // UNet.
    let u = &parts.unet;
    let channels: Vec<Option<usize>> =
        (0..layout.levels()).map(|k| dim(u, &format!("down_blocks.{k}.resnets.0.conv1.weight"), 0)).collect();
    let mut md = BTreeMap::new();
    md.insert("layers_per_block".to_string(), layout.layers_per_block.to_string());
    md.insert(
        "down_block_types".into(),
        list(layout.attention.iter().map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" })),
    );
    md.insert(
        "up_block_types".into(),
        list(layout.attention.iter().rev().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })),
    );
    if channels.iter().all(Option::is_some) {
        let channels: Vec<usize> = channels.into_iter().flatten().collect();
        md.insert("block_out_channels".into(), list(&channels));
        // SD 2.x / MVDream use 64-channel heads (`num_head_channels: 64`), so heads = channels / 64.
        if channels.iter().all(|c| c % 64 == 0) {
            md.insert("num_attention_heads".into(), list(channels.iter().map(|c| c / 64)));
        }
    }
    if let Some(cross) = u
        .tensors
        .iter()
        .find(|(k, _)| k.ends_with("transformer_blocks.0.attn2.to_k.weight"))
        .and_then(|(_, t)| t.dims().get(1).copied())
    {
        md.insert("cross_attention_dim".into(), cross.to_string());
    }
    if let Some(cam) = dim(u, "camera_embedding.linear_1.weight", 1) {
        md.insert("camera_dim".into(), cam.to_string());
    }
    parts.unet.metadata.extend(md);

    // Autoencoder.
    let v = &parts.vae;
    let mut md = BTreeMap::new();
    md.insert("layers_per_block".to_string(), {
        let mut n = 0;
        while v.tensors.contains_key(&format!("encoder.down_blocks.0.resnets.{n}.conv1.weight")) {
            n += 1;
        }
        n.to_string()
    });
    let channels: Vec<Option<usize>> =
        (0..vae.levels).map(|k| dim(v, &format!("encoder.down_blocks.{k}.resnets.0.conv1.weight"), 0)).collect();
    if channels.iter().all(Option::is_some) {
        md.insert("block_out_channels".into(), list(channels.into_iter().flatten()));
    }
    if let Some(z) = dim(v, "post_quant_conv.weight", 0) {
        md.insert("latent_channels".into(), z.to_string());
    }
    parts.vae.metadata.extend(md);

    // Text encoder.
    let t = &parts.text_encoder;
    let mut md = BTreeMap::new();
    md.insert("num_hidden_layers".to_string(), text_layers(t).to_string());
    md.insert("hidden_act".into(), "gelu".into());
    if let Some(width) = dim(t, "text_model.embeddings.token_embedding.weight", 1) {
        md.insert("hidden_size".into(), width.to_string());
        // OpenCLIP text towers use 64-channel heads.
        if width % 64 == 0 {
            md.insert("num_attention_heads".into(), (width / 64).to_string());
        }
    }
    if let Some(vocab) = dim(t, "text_model.embeddings.token_embedding.weight", 0) {
        md.insert("vocab_size".into(), vocab.to_string());
    }
    if let Some(ctx) = dim(t, "text_model.embeddings.position_embedding.weight", 0) {
        md.insert("max_position_embeddings".into(), ctx.to_string());
    }
    if let Some(inner) = dim(t, "text_model.encoder.layers.0.mlp.fc1.weight", 0) {
        md.insert("intermediate_size".into(), inner.to_string());
    }
    parts.text_encoder.metadata.extend(md);
}

/// Counts `text_model.encoder.layers.{i}` blocks.
fn text_layers(m: &ConvertedModel) -> usize {
    let mut n = 0;
    while m.tensors.contains_key(&format!("text_model.encoder.layers.{n}.layer_norm1.weight")) {
        n += 1;
    }
    n
}

/// Tensors with their names, in file order.
type NamedTensors = Vec<(String, Tensor)>;

/// Reads the tensors of a PyTorch zip checkpoint, under `state_dict` when there is one, else at the
/// top level. Names on the ignore list are listed but not loaded (EMA copies can be gigabytes).
/// Returns (tensors to convert, ignored names).
fn read_checkpoint(path: &Path) -> Result<(NamedTensors, Vec<String>)> {
    if !path.is_file() {
        return Err(Error::weights(path, "no such file; expected MVDream's sd-v2.1-base-4view.pt (a PyTorch zip checkpoint)"));
    }
    let unreadable = |e: candle_core::Error| {
        Error::weights(
            path,
            format!("cannot read it as a PyTorch zip checkpoint ({e}); expected MVDream's sd-v2.1-base-4view.pt"),
        )
    };
    // A nested checkpoint ({"state_dict": {...}, ...}) fails or gives nothing without the key, and
    // a flat one fails with it ("key not found"): try the nested form first, then the flat one.
    let pth = match candle_core::pickle::PthTensors::new(path, Some("state_dict")) {
        Ok(p) if !p.tensor_infos().is_empty() => p,
        _ => candle_core::pickle::PthTensors::new(path, None).map_err(unreadable)?,
    };
    let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::weights(path, "no tensors found (neither at the top level nor under `state_dict`)"));
    }
    let mut tensors = Vec::with_capacity(names.len());
    let mut ignored = Vec::new();
    for name in names {
        if is_ignored(&name) {
            ignored.push(name);
            continue;
        }
        match pth.get(&name).map_err(unreadable)? {
            Some(t) => tensors.push((name, t)),
            None => return Err(Error::weights(path, format!("tensor {name} is listed but cannot be read"))),
        }
    }
    Ok((tensors, ignored))
}

/// The safetensors dtype tag of a candle dtype.
fn safetensors_dtype(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        _ => return None,
    })
}

/// Writes `model` as a safetensors file (tensors in name order, header metadata included),
/// creating the parent folder.
pub fn write_safetensors(path: &Path, model: &ConvertedModel) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(&model.metadata).map_err(|e| Error::weights(path, e.to_string()))?);
    // Offsets come from the shapes, so tensors are streamed to the file after the header instead of
    // being gathered in memory (the real UNet is 3.4 GB).
    let mut offset = 0usize;
    for (name, t) in &model.tensors {
        let dtype = safetensors_dtype(t.dtype())
            .ok_or_else(|| Error::weights(path, format!("tensor {name} has dtype {:?}, which is not written", t.dtype())))?;
        let end = offset + t.elem_count() * t.dtype().size_in_bytes();
        let entry = serde_json::json!({ "dtype": dtype, "shape": t.dims(), "data_offsets": [offset, end] });
        header.insert(name.clone(), entry);
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::weights(path, e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::io(path, e))?);
    f.write_all(&(header.len() as u64).to_le_bytes()).and_then(|()| f.write_all(&header)).map_err(|e| Error::io(path, e))?;
    for (name, t) in &model.tensors {
        t.write_bytes(&mut f).map_err(|e| Error::weights(path, format!("cannot write tensor {name}: {e}")))?;
    }
    f.flush().map_err(|e| Error::io(path, e))
}

/// Converts MVDream's `sd-v2.1-base-4view.pt` (`ckpt`) into `out_dir/`[`UNET_FILE`] (UNet with the
/// camera embedding), `out_dir/`[`VAE_FILE`] and `out_dir/`[`TEXT_ENCODER_FILE`], keeping the
/// checkpoint's dtype (f32 for the release). A missing or unreadable file, unknown tensor names, or a
/// UNet without MVDream's camera embedding is an [`Error::Weights`] naming `ckpt`.
pub fn convert_mvdream_checkpoint(ckpt: &Path, out_dir: &Path) -> Result<ConvertReport> {
    let (tensors, ignored) = read_checkpoint(ckpt)?;
    let mut parts = convert_at(ckpt, tensors, ignored)?;
    if !parts.unet.tensors.contains_key("camera_embedding.linear_1.weight") {
        return Err(Error::weights(
            ckpt,
            format!("no {UNET_PREFIX}camera_embed.* tensors: not an MVDream checkpoint (a plain SD 2.x one?)"),
        ));
    }
    let file_name = ckpt.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    for m in [&mut parts.unet, &mut parts.vae, &mut parts.text_encoder] {
        m.metadata.insert("source".into(), format!("converted from {file_name} by congeal"));
    }
    let files: Vec<PathBuf> = [UNET_FILE, VAE_FILE, TEXT_ENCODER_FILE].iter().map(|f| out_dir.join(f)).collect();
    write_safetensors(&files[0], &parts.unet)?;
    write_safetensors(&files[1], &parts.vae)?;
    write_safetensors(&files[2], &parts.text_encoder)?;
    let mut dts: Vec<DType> = Vec::new();
    for m in [&parts.unet, &parts.vae, &parts.text_encoder] {
        for t in m.tensors.values() {
            if !dts.contains(&t.dtype()) {
                dts.push(t.dtype());
            }
        }
    }
    Ok(ConvertReport {
        unet_tensors: parts.unet.tensors.len(),
        vae_tensors: parts.vae.tensors.len(),
        text_encoder_tensors: parts.text_encoder.tensors.len(),
        text_layers: text_layers(&parts.text_encoder),
        unet_layout: parts.unet_layout,
        ignored: parts.ignored,
        dtypes: dts,
        files,
    })
}
