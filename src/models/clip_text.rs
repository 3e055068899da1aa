//! CLIP text encoder (HF `CLIPTextModel` naming): OpenCLIP-H as Stable Diffusion 2.1 ships it, or
//! CLIP ViT-L as in SD 1.x.
//!
//! Our own implementation of the text transformer of HF transformers' `CLIPTextModel`:
//! token + learned position embeddings, pre-LN blocks with causal multi-head self-attention
//! (`x += out_proj(attn(layer_norm1(x)))`, `x += fc2(act(fc1(layer_norm2(x))))`), exact-erf GELU
//! (OpenCLIP-H) or quick GELU `x * sigmoid(1.702 x)` (OpenAI CLIP), then `final_layer_norm`. No
//! pooled output / projection (Stable Diffusion conditions on the whole sequence).
//!
//! SD 2.x conditions on the *penultimate* OpenCLIP-H layer; diffusers' SD 2.1 `text_encoder` already
//! stores only 23 of the 24 layers, so with that checkpoint `skip_last_layers` is 0. With a 24-layer
//! checkpoint, skip 1 runs the first 23 layers and then `final_layer_norm`, which is the same thing.
//!
//! Everything (norms, softmax, activations) is plain tensor algebra from [`crate::models::ops`], so
//! gradients flow from the output back to the token embeddings given to
//! [`ClipTextModel::forward_embeddings`] (textual inversion optimises rows of them).
//!
//! Weights: safetensors with `text_model.embeddings.token_embedding.weight`,
//! `text_model.embeddings.position_embedding.weight`,
//! `text_model.encoder.layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}`,
//! `...layer_norm1`, `...mlp.fc1`, `...mlp.fc2`, `...layer_norm2`, `text_model.final_layer_norm`;
//! the `text_model.` prefix is optional.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::models::ops::{self, LayerNorm, Linear};

/// The MLP activation of the text transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU `0.5 x (1 + erf(x / sqrt 2))` (HF `"gelu"`; OpenCLIP-H in SD 2.x).
    Gelu,
    /// Quick GELU `x * sigmoid(1.702 x)` (HF `"quick_gelu"`; OpenAI CLIP ViT-L in SD 1.x).
    QuickGelu,
}

impl Activation {
    /// The activation named by HF's `hidden_act` (`"gelu"` or `"quick_gelu"`), if supported.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name.trim() {
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }

    /// Applies the activation elementwise (differentiable; no fused kernels).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => {
                let e = (x / std::f64::consts::SQRT_2)?.erf()?;
                Ok(((e + 1.0)? * x)?.affine(0.5, 0.0)?)
            }
            Activation::QuickGelu => {
                let sig = ((x.affine(-1.702, 0.0)?.exp()? + 1.0)?).recip()?;
                Ok((x * sig)?)
            }
        }
    }
}

/// Architecture of a CLIP text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Rows of the token-embedding table (49408 for CLIP's BPE vocabulary).
    pub vocab_size: usize,
    /// Token width (1024 for OpenCLIP-H, 768 for CLIP ViT-L).
    pub hidden_size: usize,
    /// MLP hidden width (4 x hidden).
    pub intermediate_size: usize,
    /// Number of transformer layers stored (and run, less `skip_last_layers`).
    pub num_hidden_layers: usize,
    /// Attention heads (head dim = hidden / heads).
    pub num_attention_heads: usize,
    /// Rows of the position-embedding table: the longest sequence (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub activation: Activation,
    /// LayerNorm epsilon (1e-5).
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// SD 2.1's text encoder as diffusers ships it: OpenCLIP-H with 23 of its 24 layers.
    pub fn sd21() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// A small configuration for randomly initialised CPU tests (vocab 1000, hidden 32, 2 layers,
    /// 4 heads, 77 positions); pair it with [`crate::models::tokenizer::ClipTokenizer::hashed`].
    pub fn tiny() -> Self {
        Self {
            vocab_size: 1000,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// Reads only the header of a safetensors file and infers the sizes from the tensor shapes; the
    /// heads and activation come from the `__metadata__` keys `num_attention_heads` and `hidden_act`
    /// when present, else `hidden / 64` heads and GELU. Eps is 1e-5 unless metadata `layer_norm_eps`.
    /// diffusers' files carry no such metadata: right for SD 2.x (16 heads, GELU); for SD 1.x's CLIP
    /// ViT-L set `activation = Activation::QuickGelu` afterwards (its `config.json` says `quick_gelu`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let header = ops::read_safetensors_header(path, WHAT)?;
        let prefix = if header.shapes.contains_key("text_model.embeddings.token_embedding.weight") { "text_model." } else { "" };
        let need = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let full = format!("{prefix}{name}");
            match header.shapes.get(&full) {
                Some(s) if s.len() == rank => Ok(s.clone()),
                Some(s) => Err(Error::weights(path, format!("tensor {full} has shape {s:?}, expected rank {rank}"))),
                None => Err(Error::weights(
                    path,
                    format!("missing tensor {full}: not a CLIP text encoder in the HF CLIPTextModel naming"),
                )),
            }
        };
        let tok = need("embeddings.token_embedding.weight", 2)?;
        let pos = need("embeddings.position_embedding.weight", 2)?;
        let fc1 = need("encoder.layers.0.mlp.fc1.weight", 2)?;
        let (vocab_size, hidden_size) = (tok[0], tok[1]);
        let mut num_hidden_layers = 0;
        while header.shapes.contains_key(&format!("{prefix}encoder.layers.{num_hidden_layers}.layer_norm1.weight")) {
            num_hidden_layers += 1;
        }
        let num_attention_heads = match header.metadata.get("num_attention_heads") {
            Some(s) => s
                .trim()
                .parse::<usize>()
                .map_err(|_| Error::weights(path, format!("metadata num_attention_heads = {s:?} is not a positive integer")))?,
            None => hidden_size / 64,
        };
        let activation = match header.metadata.get("hidden_act") {
            Some(s) => Activation::from_hf_name(s).ok_or_else(|| {
                Error::weights(path, format!("metadata hidden_act = {s:?}: expected \"gelu\" or \"quick_gelu\""))
            })?,
            None => Activation::Gelu,
        };
        let layer_norm_eps = match header.metadata.get("layer_norm_eps") {
            Some(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| Error::weights(path, format!("metadata layer_norm_eps = {s:?} is not a number")))?,
            None => 1e-5,
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: fc1[0],
            num_hidden_layers,
            num_attention_heads,
            max_position_embeddings: pos[0],
            activation,
            layer_norm_eps,
        };
        cfg.validate()
            .map_err(|e| Error::weights(path, format!("{e}; set __metadata__ num_attention_heads (else heads = hidden / 64)")))?;
        Ok(cfg)
    }

    /// Checks that the sizes are usable (non-zero, heads divide the width).
    fn validate(&self) -> Result<()> {
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.max_position_embeddings == 0
            || self.num_hidden_layers == 0
        {
            return Err(Error::InvalidInput(format!("CLIP text config with a zero size: {self:?}")));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::InvalidInput(format!(
                "CLIP text config: hidden size {} is not divisible into {} heads",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

const WHAT: &str = "a CLIP text encoder in the HF CLIPTextModel naming (text_model.embeddings..., \
                    text_model.encoder.layers.N..., text_model.final_layer_norm)";

/// One pre-LN transformer layer.
#[derive(Debug, Clone)]
struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn load(vb: &VarBuilder, cfg: &ClipTextConfig, i: usize) -> Result<Self> {
        let (c, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let p = format!("encoder.layers.{i}");
        Ok(Self {
            q_proj: Linear::load(vb, &format!("{p}.self_attn.q_proj"), c, c, true)?,
            k_proj: Linear::load(vb, &format!("{p}.self_attn.k_proj"), c, c, true)?,
            v_proj: Linear::load(vb, &format!("{p}.self_attn.v_proj"), c, c, true)?,
            out_proj: Linear::load(vb, &format!("{p}.self_attn.out_proj"), c, c, true)?,
            layer_norm1: LayerNorm::load(vb, &format!("{p}.layer_norm1"), c, eps)?,
            fc1: Linear::load(vb, &format!("{p}.mlp.fc1"), c, m, true)?,
            fc2: Linear::load(vb, &format!("{p}.mlp.fc2"), m, c, true)?,
            layer_norm2: LayerNorm::load(vb, &format!("{p}.layer_norm2"), c, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, mask: &Tensor, act: Activation) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let a =
            ops::attention(&self.q_proj.forward(&h)?, &self.k_proj.forward(&h)?, &self.v_proj.forward(&h)?, heads, Some(mask))?;
        let x = (x + self.out_proj.forward(&a)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc2.forward(&act.apply(&self.fc1.forward(&h)?)?)?;
        Ok((x + h)?)
    }
}

/// The CLIP text transformer (no pooling / projection head).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Loads the weights of `cfg` from a safetensors file (names with or without the `text_model.`
    /// prefix), as `dtype` on `device`. A missing or unreadable file, a missing tensor or a wrong
    /// shape is an [`Error::Weights`] naming the file and the tensor; layers beyond
    /// `cfg.num_hidden_layers` are ignored.
    pub fn load(path: &Path, cfg: &ClipTextConfig, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let vb = ops::open_safetensors(path, dtype, device, WHAT)?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        Self::from_varbuilder(cfg, vb).map_err(|e| match e {
            Error::Tensor(e) => Error::weights(path, format!("{e}; expected {WHAT}")),
            other => other,
        })
    }

    /// Builds the model from a [`VarBuilder`] rooted at the text model (names without the
    /// `text_model.` prefix), e.g. a `VarMap`-backed one for randomly initialised tests.
    pub fn from_varbuilder(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let c = cfg.hidden_size;
        let token_embedding = vb.get((cfg.vocab_size, c), "embeddings.token_embedding.weight")?;
        let position_embedding = vb.get((cfg.max_position_embeddings, c), "embeddings.position_embedding.weight")?;
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::load(&vb, cfg, i)).collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(&vb, "final_layer_norm", c, cfg.layer_norm_eps)?;
        Ok(Self { cfg: cfg.clone(), token_embedding, position_embedding, layers, final_layer_norm })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// The token-embedding table `[vocab, hidden]`.
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Looks up token ids (`u32 [B, L]`) in the embedding table: `[B, L, hidden]`. Ids must be below
    /// the vocabulary size.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) =
            ids.dims2().map_err(|_| Error::InvalidInput(format!("token ids of shape {:?}, expected [B, L]", ids.dims())))?;
        if ids.dtype() != DType::U32 {
            return Err(Error::InvalidInput(format!("token ids of dtype {:?}, expected u32", ids.dtype())));
        }
        if b * l == 0 {
            return Err(Error::InvalidInput(format!("empty token ids {:?}", ids.dims())));
        }
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(Error::InvalidInput(format!("token id {max} out of the vocabulary ({} tokens)", self.cfg.vocab_size)));
        }
        let rows = self.token_embedding.index_select(&ids.flatten_all()?, 0)?;
        Ok(rows.reshape((b, l, self.cfg.hidden_size))?)
    }

    /// Runs the transformer on token embeddings `[B, L, hidden]` (L <= max positions): adds the
    /// position embeddings, runs the first `num_hidden_layers - skip_last_layers` layers with a causal
    /// mask, then `final_layer_norm`. Returns `[B, L, hidden]` in the model's dtype (the input is cast
    /// to it); differentiable with respect to `token_embeds`.
    pub fn forward_embeddings(&self, token_embeds: &Tensor, skip_last_layers: usize) -> Result<Tensor> {
        let (_, l, c) = token_embeds.dims3().map_err(|_| {
            Error::InvalidInput(format!("token embeddings of shape {:?}, expected [B, L, hidden]", token_embeds.dims()))
        })?;
        if c != self.cfg.hidden_size || l == 0 || l > self.cfg.max_position_embeddings {
            return Err(Error::InvalidInput(format!(
                "token embeddings of shape {:?}: expected [B, 1..={}, {}]",
                token_embeds.dims(),
                self.cfg.max_position_embeddings,
                self.cfg.hidden_size
            )));
        }
        if skip_last_layers > self.layers.len() {
            return Err(Error::InvalidInput(format!("cannot skip {skip_last_layers} of {} layers", self.layers.len())));
        }
        let dtype = self.dtype();
        let x = token_embeds.to_dtype(dtype)?;
        let mut x = x.broadcast_add(&self.position_embedding.narrow(0, 0, l)?)?;
        let mask = causal_mask(l, dtype, self.device())?;
        for layer in &self.layers[..self.layers.len() - skip_last_layers] {
            x = layer.forward(&x, self.cfg.num_attention_heads, &mask, self.cfg.activation)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// [`Self::embed_tokens`] then [`Self::forward_embeddings`].
    pub fn forward(&self, ids: &Tensor, skip_last_layers: usize) -> Result<Tensor> {
        self.forward_embeddings(&self.embed_tokens(ids)?, skip_last_layers)
    }
}

/// `[L, L]`: 0 on and below the diagonal, -inf above (a token attends to itself and earlier ones).
fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l * l).map(|k| if k % l > k / l { f32::NEG_INFINITY } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, (l, l), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    #[test]
    fn tiny_random_model_runs_and_validates_inputs() {
        let cfg = ClipTextConfig::tiny();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let model0 = ClipTextModel::from_varbuilder(&cfg, vb.clone()).unwrap();
        // The variables start at zero: redraw them all, then rebuild (the tensors share storage).
        for v in vm.all_vars() {
            v.set(&Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        drop(model0);
        let model = ClipTextModel::from_varbuilder(&cfg, vb).unwrap();
        let ids = Tensor::new(&[[998u32, 5, 17, 999, 999]], &Device::Cpu).unwrap();
        let y = model.forward(&ids, 0).unwrap();
        assert_eq!(y.dims(), &[1, 5, 32]);
        let y1 = model.forward(&ids, 1).unwrap();
        assert_eq!(y1.dims(), &[1, 5, 32]);
        assert!(matches!(model.forward(&ids, 3), Err(Error::InvalidInput(_))));
        let bad = Tensor::new(&[[1000u32]], &Device::Cpu).unwrap();
        assert!(matches!(model.embed_tokens(&bad), Err(Error::InvalidInput(_))));
        let long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(model.forward(&long, 0), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn activations_match_their_formulas() {
        let x = Tensor::new(&[-3.0f64, -0.5, 0.0, 0.7, 2.5], &Device::Cpu).unwrap();
        let g: Vec<f64> = Activation::Gelu.apply(&x).unwrap().to_vec1().unwrap();
        let q: Vec<f64> = Activation::QuickGelu.apply(&x).unwrap().to_vec1().unwrap();
        // Reference values of torch.nn.functional.gelu (exact) and x * sigmoid(1.702 x).
        let g_ref = [-0.0040496941, -0.1542687694, 0.0, 0.5306254434, 2.4844758367];
        for (i, xv) in [-3.0f64, -0.5, 0.0, 0.7, 2.5].iter().enumerate() {
            assert!((g[i] - g_ref[i]).abs() < 1e-8, "gelu({xv}) = {} vs {}", g[i], g_ref[i]);
            let qr = xv / (1.0 + (-1.702 * xv).exp());
            assert!((q[i] - qr).abs() < 1e-12, "quick_gelu({xv})");
        }
    }
}
