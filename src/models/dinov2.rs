//! DINOv2 ViT backbone (S/B/L with GELU MLP, G with SwiGLU) in the HuggingFace naming.
//!
//! Our own implementation of HF transformers' `Dinov2Model` (inference only):
//! - patch embedding (conv 14x14, stride 14, done as one matrix product), CLS token, position
//!   embeddings interpolated bicubically from the stored grid to the input's grid exactly as
//!   `Dinov2Embeddings.interpolate_pos_encoding` does (torch `interpolate(size=(H/14, W/14),
//!   mode="bicubic", align_corners=False)`, cubic coefficient -0.75, edge-clamped taps);
//! - pre-norm blocks (LayerNorm eps 1e-6), multi-head attention batched over heads, LayerScale,
//!   exact (erf) GELU MLP or SwiGLU (`Dinov2SwiGLUFFN`), final LayerNorm; no classifier head.
//!
//! Weights: safetensors in the HF `facebook/dinov2-*` naming (`embeddings.cls_token`,
//! `embeddings.position_embeddings`, `embeddings.patch_embeddings.projection.{weight,bias}`,
//! `encoder.layer.{i}.{norm1,norm2}`, `...attention.attention.{query,key,value}`,
//! `...attention.output.dense`, `...layer_scale{1,2}.lambda1`, `...mlp.fc{1,2}` or
//! `...mlp.weights_{in,out}`, `layernorm`); a common prefix such as `dinov2.` or `backbone.` is
//! accepted, `embeddings.mask_token` and any head are ignored. The configuration is inferred from the
//! tensor shapes; the number of heads is `hidden / 64` (S=6, B=12, L=16, G=24) unless the file's
//! metadata has `num_attention_heads`. `scripts/setup_weights.sh` writes the ViT-S/14 file
//! `weights/dinov2_vits14.safetensors`.
//!
//! The fast LayerNorm and softmax kernels used here cut candle's autograd graph: no gradient flows
//! through this model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::models::ops::{self, read_safetensors_header, SafetensorsHeader};

/// ImageNet mean (RGB) used by DINOv2's preprocessing.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation (RGB) used by DINOv2's preprocessing.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Architecture of a DINOv2 backbone (inferred from a weight file by [`Dinov2Config::from_file`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Dinov2Config {
    /// Token width C (S 384, B 768, L 1024, G 1536).
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Attention heads (head dim = hidden_size / num_heads).
    pub num_heads: usize,
    /// MLP hidden width (fc1 outputs for GELU; the width after the SwiGLU gate for SwiGLU).
    pub intermediate_size: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Side of the stored position-embedding grid (37 for the 518-pixel checkpoints).
    pub pos_grid: usize,
    /// LayerNorm epsilon (1e-6).
    pub layer_norm_eps: f64,
    /// SwiGLU MLP (`mlp.weights_in/weights_out`, ViT-G) instead of GELU (`mlp.fc1/fc2`).
    pub swiglu: bool,
}

/// What a DINOv2 weight file is expected to be (for errors).
const WHAT: &str = "a HF-named Dinov2Model file such as weights/dinov2_vits14.safetensors, which scripts/setup_weights.sh writes";

/// The prefix (e.g. `""`, `"dinov2."`, `"backbone."`) in front of `embeddings.cls_token`.
fn find_prefix(path: &Path, header: &SafetensorsHeader) -> Result<String> {
    let mut found: Vec<&String> =
        header.shapes.keys().filter(|k| *k == "embeddings.cls_token" || k.ends_with(".embeddings.cls_token")).collect();
    found.sort();
    match found.first() {
        Some(k) => Ok(k[..k.len() - "embeddings.cls_token".len()].to_string()),
        None => Err(Error::weights(
            path,
            format!(
                "no tensor `embeddings.cls_token`: not a DINOv2 file in the HF Dinov2Model naming \
                 ({} tensors, e.g. {:?})",
                header.shapes.len(),
                header.shapes.keys().take(3).collect::<Vec<_>>()
            ),
        )),
    }
}

impl Dinov2Config {
    /// Reads only the header of a safetensors file and infers the architecture from the tensor
    /// shapes (and `num_attention_heads` / `layer_norm_eps` metadata when present).
    pub fn from_file(path: &Path) -> Result<Self> {
        let header = read_safetensors_header(path, WHAT)?;
        let prefix = find_prefix(path, &header)?;
        Self::infer(path, &header, &prefix)
    }

    fn infer(path: &Path, header: &SafetensorsHeader, prefix: &str) -> Result<Self> {
        let get = |name: &str| header.shapes.get(&format!("{prefix}{name}"));
        let need = |name: &str, rank: usize| -> Result<Vec<usize>> {
            match get(name) {
                Some(s) if s.len() == rank => Ok(s.clone()),
                Some(s) => Err(Error::weights(path, format!("tensor {prefix}{name} has shape {s:?}, expected rank {rank}"))),
                None => Err(Error::weights(path, format!("missing tensor {prefix}{name}"))),
            }
        };
        let hidden_size = need("embeddings.cls_token", 3)?[2];
        let proj = need("embeddings.patch_embeddings.projection.weight", 4)?;
        let patch_size = proj[2];
        let pos = need("embeddings.position_embeddings", 3)?;
        let n_pos = pos[1].saturating_sub(1);
        let pos_grid = (n_pos as f64).sqrt().round() as usize;
        if pos_grid == 0 || pos_grid * pos_grid != n_pos {
            return Err(Error::weights(
                path,
                format!("{prefix}embeddings.position_embeddings has shape {pos:?}: expected [1, 1 + G*G, C]"),
            ));
        }
        let mut num_layers = 0;
        while get(&format!("encoder.layer.{num_layers}.norm1.weight")).is_some() {
            num_layers += 1;
        }
        if num_layers == 0 {
            return Err(Error::weights(path, format!("missing tensor {prefix}encoder.layer.0.norm1.weight (no blocks)")));
        }
        let swiglu = get("encoder.layer.0.mlp.weights_in.weight").is_some();
        let intermediate_size = if swiglu {
            need("encoder.layer.0.mlp.weights_out.weight", 2)?[1]
        } else {
            need("encoder.layer.0.mlp.fc1.weight", 2)?[0]
        };
        let num_heads = match header.metadata.get("num_attention_heads") {
            Some(s) => s
                .trim()
                .parse::<usize>()
                .map_err(|_| Error::weights(path, format!("metadata num_attention_heads = {s:?} is not a positive integer")))?,
            None => hidden_size / 64,
        };
        if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
            return Err(Error::weights(
                path,
                format!(
                    "cannot split hidden size {hidden_size} into heads ({num_heads}); set metadata \
                     num_attention_heads or use a head dim of 64"
                ),
            ));
        }
        let layer_norm_eps = match header.metadata.get("layer_norm_eps") {
            Some(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| Error::weights(path, format!("metadata layer_norm_eps = {s:?} is not a number")))?,
            None => 1e-6,
        };
        Ok(Self { hidden_size, num_layers, num_heads, intermediate_size, patch_size, pos_grid, layer_norm_eps, swiglu })
    }

    /// Every tensor the model reads, with its shape, in the HF naming (no prefix).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.hidden_size;
        let p = self.patch_size;
        let i = self.intermediate_size;
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.cls_token".into(), vec![1, 1, c]),
            ("embeddings.position_embeddings".into(), vec![1, 1 + self.pos_grid * self.pos_grid, c]),
            ("embeddings.patch_embeddings.projection.weight".into(), vec![c, 3, p, p]),
            ("embeddings.patch_embeddings.projection.bias".into(), vec![c]),
            ("layernorm.weight".into(), vec![c]),
            ("layernorm.bias".into(), vec![c]),
        ];
        for l in 0..self.num_layers {
            let pre = format!("encoder.layer.{l}.");
            for n in ["norm1", "norm2"] {
                v.push((format!("{pre}{n}.weight"), vec![c]));
                v.push((format!("{pre}{n}.bias"), vec![c]));
            }
            for n in
                ["attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense"]
            {
                v.push((format!("{pre}{n}.weight"), vec![c, c]));
                v.push((format!("{pre}{n}.bias"), vec![c]));
            }
            v.push((format!("{pre}layer_scale1.lambda1"), vec![c]));
            v.push((format!("{pre}layer_scale2.lambda1"), vec![c]));
            if self.swiglu {
                v.push((format!("{pre}mlp.weights_in.weight"), vec![2 * i, c]));
                v.push((format!("{pre}mlp.weights_in.bias"), vec![2 * i]));
                v.push((format!("{pre}mlp.weights_out.weight"), vec![c, i]));
                v.push((format!("{pre}mlp.weights_out.bias"), vec![c]));
            } else {
                v.push((format!("{pre}mlp.fc1.weight"), vec![i, c]));
                v.push((format!("{pre}mlp.fc1.bias"), vec![i]));
                v.push((format!("{pre}mlp.fc2.weight"), vec![c, i]));
                v.push((format!("{pre}mlp.fc2.bias"), vec![c]));
            }
        }
        v
    }

    /// Checks a header against [`Self::expected_tensors`], naming every missing or misshapen tensor.
    fn check(&self, path: &Path, header: &SafetensorsHeader, prefix: &str) -> Result<()> {
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        for (name, shape) in self.expected_tensors() {
            let full = format!("{prefix}{name}");
            match header.shapes.get(&full) {
                None => missing.push(full),
                Some(s) if *s != shape => wrong.push(format!("{full}: found {s:?}, expected {shape:?}")),
                Some(_) => {}
            }
        }
        if missing.is_empty() && wrong.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "does not match a DINOv2 with hidden {}, {} layers, {} MLP {}:",
            self.hidden_size,
            self.num_layers,
            if self.swiglu { "SwiGLU" } else { "GELU" },
            self.intermediate_size
        );
        if !missing.is_empty() {
            let shown: Vec<_> = missing.iter().take(8).cloned().collect();
            msg += &format!(" missing {} tensor(s): {}", missing.len(), shown.join(", "));
            if missing.len() > shown.len() {
                msg += ", ...";
            }
            msg += ";";
        }
        if !wrong.is_empty() {
            msg += &format!(" wrong shapes: {}", wrong.join("; "));
        }
        Err(Error::weights(path, msg))
    }
}

/// A linear layer stored as the transposed weight `[in, out]` (contiguous) and the bias `[out]`.
struct Linear {
    w_t: Tensor,
    b: Tensor,
}

impl Linear {
    /// Loads `{name}.weight` `[out, in]` and `{name}.bias` `[out]` (sizes in [`ops::Linear::load`]'s order).
    fn load(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize) -> Result<Self> {
        let ops::Linear { weight, bias } = ops::Linear::load(vb, name, in_dim, out_dim, true)?;
        let b = bias.ok_or_else(|| Error::InvalidInput(format!("linear layer {name} has no bias")))?;
        Ok(Self { w_t: weight.t()?.contiguous()?, b })
    }

    /// Folds a per-output scale (LayerScale) into the weight and bias.
    fn scaled(self, scale: &Tensor) -> Result<Self> {
        Ok(Self { w_t: self.w_t.broadcast_mul(scale)?, b: self.b.mul(scale)? })
    }

    /// `x` is `[M, in]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.w_t)?.broadcast_add(&self.b)?)
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: &VarBuilder, name: &str, c: usize, eps: f64) -> Result<Self> {
        let ops::LayerNorm { weight, bias, .. } = ops::LayerNorm::load(vb, name, c, eps)?;
        Ok(Self { w: weight, b: bias, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, self.eps)?)
    }
}

enum Mlp {
    Gelu { fc1: Linear, fc2: Linear },
    SwiGlu { w_in: Linear, w_out: Linear, hidden: usize },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { fc1, fc2 } => fc2.forward(&gelu_erf(&fc1.forward(x)?)?),
            Mlp::SwiGlu { w_in, w_out, hidden } => {
                let h = w_in.forward(x)?;
                let x1 = h.narrow(1, 0, *hidden)?;
                let x2 = h.narrow(1, *hidden, *hidden)?;
                w_out.forward(&candle_nn::ops::silu(&x1)?.mul(&x2)?)
            }
        }
    }
}

/// Exact-erf GELU, `x/2 (1 + erf(x/sqrt 2))`. On the CPU (contiguous f32) a vectorisable rational
/// approximation of erf (Eigen's `generic_fast_erf_float`, |error| < 1e-6) replaces candle's scalar libm
/// erf, which took ~15% of a ViT-S forward; elsewhere candle's `gelu_erf`.
fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        Ok(x.apply_op1_no_bwd(&FastGeluErf)?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

/// erf for f32 as a ratio of odd/even polynomials on [-4, 4] (Eigen `generic_fast_erf_float`).
/// Plain multiply-adds (not `mul_add`, a slow libm call without the `fma` target feature) so the
/// loop vectorises.
#[inline(always)]
pub(crate) fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

struct FastGeluErf;

impl candle_core::CustomOp1 for FastGeluErf {
    fn name(&self) -> &'static str {
        "dinov2-fast-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fast gelu: non-contiguous input".into()))?;
        let out: Vec<f32> =
            data[start..end].iter().map(|&v| 0.5 * v * (1.0 + fast_erf(v * std::f32::consts::FRAC_1_SQRT_2))).collect();
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Softmax over the last dimension. On the CPU (contiguous f32) a vectorisable exp (Cephes `expf`
/// polynomial, relative error < 2e-7) replaces the scalar libm `expf` of candle's kernel, which took
/// ~20% of a ViT-S forward at 448 pixels; elsewhere candle's `softmax_last_dim`.
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        Ok(x.apply_op1_no_bwd(&FastSoftmax)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(x)?)
    }
}

/// `exp(x)` for `x <= 0` (arguments below -87 give ~1e-38 instead of 0; NaN stays NaN). Written
/// without `round`, `max` or float-to-int casts (libm calls or scalar code on baseline x86-64).
#[inline(always)]
pub(crate) fn fast_exp_nonpositive(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    // n = round(x / ln 2): adding and removing 1.5 * 2^23 rounds to an integer.
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n: the low mantissa bits of (n + 127) + 1.5 * 2^23 hold the biased exponent n + 127.
    let biased = (n + (127.0 + 12_582_912.0)).to_bits().wrapping_sub(0x4B40_0000);
    y * f32::from_bits(biased << 23)
}

/// Softmax of one row, in 8 independent lanes so that the reductions vectorise.
fn softmax_row(x: &[f32], o: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            lanes[k] = if c[k] > lanes[k] { c[k] } else { lanes[k] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(rest) {
        max = if v > max { v } else { max };
    }
    for (o, &v) in o.iter_mut().zip(x) {
        *o = fast_exp_nonpositive(v - max);
    }
    let mut sums = [0f32; 8];
    let chunks = o.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            sums[k] += c[k];
        }
    }
    let sum: f32 = sums.iter().chain(rest).sum();
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|v| *v *= inv);
}

struct FastSoftmax;

impl candle_core::CustomOp1 for FastSoftmax {
    fn name(&self) -> &'static str {
        "dinov2-fast-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let data = storage.as_slice::<f32>()?;
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fast softmax: non-contiguous input".into()))?;
        let src = &data[start..end];
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; src.len()];
        let rows_per_task = (16384 / n).max(1);
        out.par_chunks_mut(n * rows_per_task).zip(src.par_chunks(n * rows_per_task)).for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(n).zip(x.chunks(n)) {
                softmax_row(x, o);
            }
        });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

struct Block {
    norm1: Norm,
    /// query, key and value fused: `[C, 3C]`.
    qkv: Linear,
    /// attention output projection with `layer_scale1` folded in.
    proj: Linear,
    norm2: Norm,
    /// MLP with `layer_scale2` folded into its output layer.
    mlp: Mlp,
}

impl Block {
    fn load(vb: &VarBuilder, cfg: &Dinov2Config) -> Result<Self> {
        let c = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let att = vb.pp("attention.attention");
        let q = Linear::load(&att, "query", c, c)?;
        let k = Linear::load(&att, "key", c, c)?;
        let v = Linear::load(&att, "value", c, c)?;
        // The attention scale 1/sqrt(head dim) is folded into the query columns.
        let d = c / cfg.num_heads;
        let mut scale = vec![1f32; 3 * c];
        scale[..c].fill(1.0 / (d as f32).sqrt());
        let qkv =
            Linear { w_t: Tensor::cat(&[&q.w_t, &k.w_t, &v.w_t], 1)?.contiguous()?, b: Tensor::cat(&[&q.b, &k.b, &v.b], 0)? }
                .scaled(&Tensor::from_vec(scale, 3 * c, vb.device())?)?;
        let i = cfg.intermediate_size;
        let ls1 = vb.get(c, "layer_scale1.lambda1")?;
        let ls2 = vb.get(c, "layer_scale2.lambda1")?;
        let mlp = if cfg.swiglu {
            Mlp::SwiGlu {
                w_in: Linear::load(vb, "mlp.weights_in", c, 2 * i)?,
                w_out: Linear::load(vb, "mlp.weights_out", i, c)?.scaled(&ls2)?,
                hidden: i,
            }
        } else {
            Mlp::Gelu { fc1: Linear::load(vb, "mlp.fc1", c, i)?, fc2: Linear::load(vb, "mlp.fc2", i, c)?.scaled(&ls2)? }
        };
        Ok(Self {
            norm1: Norm::load(vb, "norm1", c, eps)?,
            qkv,
            proj: Linear::load(vb, "attention.output.dense", c, c)?.scaled(&ls1)?,
            norm2: Norm::load(vb, "norm2", c, eps)?,
            mlp,
        })
    }

    /// `x` is `[B, N, C]` (contiguous).
    fn forward(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let d = c / heads;
        let h = self.norm1.forward(x)?.reshape((b * n, c))?;
        let qkv = self.qkv.forward(&h)?.reshape((b, n, 3, heads, d))?.permute((2, 0, 3, 1, 4))?;
        let q = qkv.i(0)?.contiguous()?; // already scaled by 1/sqrt(d)
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let att = softmax_last_dim(&q.matmul(&k.t()?)?)?; // [B, H, N, N]
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b * n, c))?; // [B*N, C]
        let o = self.proj.forward(&o)?.reshape((b, n, c))?;
        let x = (x + o)?;
        let h = self.norm2.forward(&x)?.reshape((b * n, c))?;
        let m = self.mlp.forward(&h)?.reshape((b, n, c))?;
        Ok((x + m)?)
    }
}

/// Row-interpolation matrix `[out, inp]` of torch's bicubic upsampling (align_corners=False,
/// coefficient -0.75, taps clamped to the border), scale = inp / out.
fn bicubic_matrix(inp: usize, out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f64 / out as f64;
    let mut m = vec![0f32; out * inp];
    for o in 0..out {
        let src = scale * (o as f64 + 0.5) - 0.5;
        let i0 = src.floor();
        let t = src - i0;
        let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let idx = (i0 as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
            m[o * inp + idx] += *wk as f32;
        }
    }
    m
}

/// A DINOv2 backbone (no head), f32.
pub struct Dinov2 {
    cfg: Dinov2Config,
    cls_token: Tensor,
    /// `[1, C]`.
    pos_cls: Tensor,
    /// `[G, G*C]`: the stored patch grid, rows of the grid flattened with the channels.
    pos_grid: Tensor,
    /// `[3*P*P, C]`.
    patch_w_t: Tensor,
    patch_b: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    device: Device,
}

impl Dinov2 {
    /// Loads a HF-named DINOv2 safetensors file as f32 on `device`, inferring the architecture
    /// (see the module docs). A missing/unreadable file, or missing/misshapen tensors, give
    /// [`Error::Weights`] naming the path and what was expected.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let header = read_safetensors_header(path, WHAT)?;
        let prefix = find_prefix(path, &header)?;
        let cfg = Dinov2Config::infer(path, &header, &prefix)?;
        cfg.check(path, &header, &prefix)?;
        let bytes = std::fs::read(path).map_err(|e| Error::weights(path, format!("cannot read it ({e}); expected {WHAT}")))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .map_err(|e| Error::weights(path, format!("cannot parse safetensors: {e}")))?;
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix.trim_end_matches('.')) };
        Self::from_varbuilder(cfg, vb).map_err(|e| match e {
            Error::Tensor(e) => Error::weights(path, e.to_string()),
            e => e,
        })
    }

    /// Builds the model from a [`VarBuilder`] holding the HF names (no prefix) and an explicit config.
    pub fn from_varbuilder(cfg: Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let p = cfg.patch_size;
        let g = cfg.pos_grid;
        if c == 0 || p == 0 || g == 0 || cfg.num_heads == 0 || !c.is_multiple_of(cfg.num_heads) {
            return Err(Error::Config(format!("invalid DINOv2 config {cfg:?}")));
        }
        let device = vb.device().clone();
        let emb = vb.pp("embeddings");
        let cls_token = emb.get((1, 1, c), "cls_token")?;
        let pos = emb.get((1, 1 + g * g, c), "position_embeddings")?;
        let pos_cls = pos.i((0, 0..1))?.contiguous()?;
        let pos_grid = pos.i((0, 1..))?.reshape((g, g * c))?.contiguous()?;
        let proj = emb.pp("patch_embeddings.projection");
        let patch_w_t = proj.get((c, 3, p, p), "weight")?.reshape((c, 3 * p * p))?.t()?.contiguous()?;
        let patch_b = proj.get(c, "bias")?;
        let enc = vb.pp("encoder.layer");
        let blocks = (0..cfg.num_layers).map(|l| Block::load(&enc.pp(l), &cfg)).collect::<Result<Vec<_>>>()?;
        let norm = Norm::load(&vb, "layernorm", c, cfg.layer_norm_eps)?;
        Ok(Self { cfg, cls_token, pos_cls, pos_grid, patch_w_t, patch_b, blocks, norm, device })
    }

    /// The architecture.
    pub fn config(&self) -> &Dinov2Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Position embeddings `[1, 1 + gh*gw, C]` for a `gh x gw` patch grid (bicubic from the stored grid).
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.cfg.pos_grid;
        let c = self.cfg.hidden_size;
        let grid = if gh == g && gw == g {
            self.pos_grid.reshape((g * g, c))?
        } else {
            let mh = Tensor::from_vec(bicubic_matrix(g, gh), (gh, g), &self.device)?;
            let mw = Tensor::from_vec(bicubic_matrix(g, gw), (gw, g), &self.device)?;
            let rows = mh.matmul(&self.pos_grid)?.reshape((gh, g, c))?; // interpolated along y
            mw.unsqueeze(0)?.broadcast_as((gh, gw, g))?.contiguous()?.matmul(&rows)?.reshape((gh * gw, c))?
        };
        Ok(Tensor::cat(&[&self.pos_cls, &grid], 0)?.unsqueeze(0)?)
    }

    fn check_input(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let p = self.cfg.patch_size;
        let dims = x.dims();
        match dims {
            &[b, 3, h, w] if b > 0 && h > 0 && w > 0 && h % p == 0 && w % p == 0 => Ok((b, h / p, w / p)),
            _ => Err(Error::InvalidInput(format!(
                "DINOv2 expects images [B, 3, H, W] with B >= 1 and H, W positive multiples of {p}, got {dims:?}"
            ))),
        }
    }

    /// Tokens `[B, 1+N, C]` (CLS first, then the patches row by row) after block `layer` (0-based,
    /// no final norm; = HF `hidden_states[layer + 1]`), or with `None` after the last block followed by
    /// the final layernorm (= HF `last_hidden_state`). Input: ImageNet-normalised pixels `[B, 3, H, W]`,
    /// H and W multiples of the patch size.
    pub fn forward_tokens(&self, pixels: &Tensor, layer: Option<usize>) -> Result<Tensor> {
        let (b, gh, gw) = self.check_input(pixels)?;
        if let Some(l) = layer {
            if l >= self.cfg.num_layers {
                return Err(Error::InvalidInput(format!(
                    "DINOv2 layer {l} requested, the model has {} blocks",
                    self.cfg.num_layers
                )));
            }
        }
        let p = self.cfg.patch_size;
        let c = self.cfg.hidden_size;
        let x = pixels.to_dtype(DType::F32)?;
        let patches =
            x.reshape((b, 3, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.contiguous()?.reshape((b * gh * gw, 3 * p * p))?;
        let patches = patches.matmul(&self.patch_w_t)?.broadcast_add(&self.patch_b)?.reshape((b, gh * gw, c))?;
        let cls = self.cls_token.broadcast_as((b, 1, c))?.contiguous()?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embeddings(gh, gw)?)?;
        let last = layer.unwrap_or(self.cfg.num_layers - 1);
        for block in &self.blocks[..=last] {
            x = block.forward(&x, self.cfg.num_heads)?;
        }
        match layer {
            Some(_) => Ok(x),
            None => self.norm.forward(&x),
        }
    }

    /// Patch features `[B, C, H/14, W/14]` (CLS dropped) of images `[B, 3, H, W]` with RGB in [0, 1],
    /// normalised here with the ImageNet mean/std; `layer` as in [`Self::forward_tokens`].
    pub fn patch_features(&self, images_01: &Tensor, layer: Option<usize>) -> Result<Tensor> {
        let (b, gh, gw) = self.check_input(images_01)?;
        let mean = Tensor::from_slice(&IMAGENET_MEAN, (1, 3, 1, 1), images_01.device())?;
        let std = Tensor::from_slice(&IMAGENET_STD, (1, 3, 1, 1), images_01.device())?;
        let x = images_01.to_dtype(DType::F32)?.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let tokens = self.forward_tokens(&x, layer)?;
        let c = self.cfg.hidden_size;
        Ok(tokens.i((.., 1..))?.reshape((b, gh, gw, c))?.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

/// The default location of the shipped ViT-S/14 weights, relative to the repository root.
pub fn default_weights_path() -> PathBuf {
    PathBuf::from("weights/dinov2_vits14.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_matches_candle_erf() {
        let xs: Vec<f32> = (-6000..=6000).map(|i| i as f32 * 1e-3).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let reference: Vec<f32> = t.to_dtype(DType::F64).unwrap().erf().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let worst = xs.iter().zip(&reference).map(|(x, r)| (fast_erf(*x) - r).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "fast erf max error {worst}");
        let g: Vec<f32> = gelu_erf(&t).unwrap().to_vec1().unwrap();
        let gr: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
        let worst = g.iter().zip(&gr).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "fast gelu max error {worst}");
    }

    #[test]
    fn fast_softmax_matches_candle() {
        let xs: Vec<f32> = (0..7 * 300).map(|i| ((i as f32 * 0.37).sin() * 40.0) - 3.0).collect();
        let t = Tensor::from_vec(xs, (7, 300), &Device::Cpu).unwrap();
        let a: Vec<f32> = softmax_last_dim(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = candle_nn::ops::softmax_last_dim(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.max(1e-30)).fold(0f32, f32::max);
        assert!(worst < 1e-5, "fast softmax relative error {worst}");
        for x in [-100.0f32, -87.0, -20.0, -1.0, -0.3, -1e-4, 0.0] {
            let rel = (fast_exp_nonpositive(x) as f64 - (x as f64).exp().max(1e-38)).abs() / (x as f64).exp().max(1e-38);
            assert!(rel < 1e-6 || x < -87.0, "exp({x}) relative error {rel}");
        }
        let nan = Tensor::new(&[[0f32, f32::NAN], [1.0, 2.0]], &Device::Cpu).unwrap();
        let r: Vec<Vec<f32>> = softmax_last_dim(&nan).unwrap().to_vec2().unwrap();
        assert!(r[0][0].is_nan() && r[1][0] > 0.0);
    }

    #[test]
    fn bicubic_rows_sum_to_one() {
        for (i, o) in [(37, 16), (4, 7), (4, 2), (37, 37)] {
            let m = bicubic_matrix(i, o);
            for r in m.chunks(i) {
                assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
        let id = bicubic_matrix(5, 5);
        for r in 0..5 {
            for c in 0..5 {
                assert_eq!(id[r * 5 + c], if r == c { 1.0 } else { 0.0 });
            }
        }
    }
}
