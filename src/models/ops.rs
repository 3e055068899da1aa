//! Differentiable building blocks shared by the diffusion models (CLIP text encoder, UNet, VAE).
//!
//! candle 0.11's fused `LayerNorm::forward` and `ops::softmax_last_dim` silently cut the autograd
//! graph (they have no backward; the tests below check ours against them), and textual inversion and
//! score distillation need gradients through these networks, so every normalisation and softmax here
//! is written as plain tensor algebra, which candle differentiates. Norms are computed in f32 whatever the weights' dtype (f16 on
//! GPUs) and cast back, as the reference implementations do.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The dtype norms and softmax are computed in: f32 for half-precision inputs, else the input's.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let cd = compute_dtype(dtype);
    let x = x.to_dtype(cd)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    let out = normed.broadcast_mul(&weight.to_dtype(cd)?)?.broadcast_add(&bias.to_dtype(cd)?)?;
    Ok(out.to_dtype(dtype)?)
}

/// Group normalisation of `[B, C, ...]` over `groups` channel groups (and all spatial positions),
/// then a per-channel affine transform.
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        return Err(Error::InvalidInput(format!("group norm of {dims:?} with {groups} groups")));
    }
    let (b, c) = (dims[0], dims[1]);
    let dtype = x.dtype();
    let cd = compute_dtype(dtype);
    let grouped = x.to_dtype(cd)?.reshape((b, groups, ()))?;
    let mean = grouped.mean_keepdim(2)?;
    let centred = grouped.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = c;
    let w = weight.to_dtype(cd)?.reshape(affine_shape.as_slice())?;
    let bb = bias.to_dtype(cd)?.reshape(affine_shape.as_slice())?;
    Ok(normed.broadcast_mul(&w)?.broadcast_add(&bb)?.to_dtype(dtype)?)
}

/// Softmax over the last dimension (max-subtracted, computed in f32), differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?.to_dtype(dtype)?)
}

/// Multi-head scaled dot-product attention. `q` is `[B, Nq, H*Dh]`, `k` and `v` are `[B, Nk, H*Dh]`;
/// returns `[B, Nq, H*Dh]`. `mask`, when given, is added to the logits (`[Nq, Nk]` or broadcastable
/// to `[B, H, Nq, Nk]`), e.g. a causal mask of `-inf` above the diagonal.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, nq, c) = q.dims3()?;
    let nk = k.dim(1)?;
    if heads == 0 || c % heads != 0 {
        return Err(Error::InvalidInput(format!("attention width {c} with {heads} heads")));
    }
    let dh = c / heads;
    let split = |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, n, heads, dh))?.transpose(1, 2)?.contiguous()?) };
    let (qh, kh, vh) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
    let mut logits = (qh.matmul(&kh.transpose(2, 3)?.contiguous()?)? * (1.0 / (dh as f64).sqrt()))?;
    if let Some(m) = mask {
        logits = logits.broadcast_add(&m.to_dtype(logits.dtype())?)?;
    }
    let p = softmax_last_dim(&logits)?;
    let out = p.matmul(&vh)?; // [B, H, Nq, Dh]
    Ok(out.transpose(1, 2)?.contiguous()?.reshape((b, nq, c))?)
}

/// A linear layer `y = x W^T + b` over the last dimension of any-rank input.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias` when `bias`).
    pub fn load(vb: &VarBuilder, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), &format!("{name}.weight"))?;
        let bias = if bias { Some(vb.get(out_dim, &format!("{name}.bias"))?) } else { None };
        Ok(Self { weight, bias })
    }

    /// Applies the layer to `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().ok_or_else(|| Error::InvalidInput("linear of a scalar".into()))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        Ok(y.reshape(out_dims.as_slice())?)
    }
}

/// Layer normalisation with learned affine parameters (differentiable, see [`layer_norm`]).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Scale `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    /// Variance epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn load(vb: &VarBuilder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, &format!("{name}.weight"))?, bias: vb.get(dim, &format!("{name}.bias"))?, eps })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Group normalisation with learned affine parameters (differentiable, see [`group_norm`]).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    /// Number of channel groups.
    pub groups: usize,
    /// Scale `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    /// Variance epsilon.
    pub eps: f64,
}

impl GroupNorm {
    /// Loads `{name}.weight` and `{name}.bias` for `channels` channels.
    pub fn load(vb: &VarBuilder, name: &str, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            groups,
            weight: vb.get(channels, &format!("{name}.weight"))?,
            bias: vb.get(channels, &format!("{name}.bias"))?,
            eps,
        })
    }

    /// Normalises `[B, C, ...]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
    }
}

/// A 2D convolution (`{name}.weight` `[out, in, k, k]`, `{name}.bias` `[out]`), differentiable.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Conv2d {
    /// Loads a `k x k` convolution with bias.
    pub fn load(vb: &VarBuilder, name: &str, in_c: usize, out_c: usize, k: usize, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_c, in_c, k, k), &format!("{name}.weight"))?,
            bias: Some(vb.get(out_c, &format!("{name}.bias"))?),
            stride,
            padding,
        })
    }

    /// Applies the convolution to `[B, in, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// Opens a safetensors weight file as a [`VarBuilder`] (`dtype` on `device`). A missing, unreadable
/// or malformed file is an [`Error::Weights`] naming the path and `what` was expected there.
pub fn open_safetensors(path: &Path, dtype: DType, device: &Device, what: &str) -> Result<VarBuilder<'static>> {
    let bytes = std::fs::read(path).map_err(|e| Error::weights(path, format!("cannot read it ({e}); expected {what}")))?;
    VarBuilder::from_buffered_safetensors(bytes, dtype, device)
        .map_err(|e| Error::weights(path, format!("not a safetensors file ({e}); expected {what}")))
}

/// Tensor shapes and string `__metadata__` of a safetensors file.
#[derive(Clone, Debug, Default)]
pub struct SafetensorsHeader {
    /// Shape of every tensor, by name.
    pub shapes: HashMap<String, Vec<usize>>,
    /// The `__metadata__` entries whose values are strings.
    pub metadata: HashMap<String, String>,
}

/// Reads only the JSON header of a safetensors file (not its data), to infer a model's configuration
/// before loading it. Any problem is an [`Error::Weights`] naming the path and `what` was expected.
pub fn read_safetensors_header(path: &Path, what: &str) -> Result<SafetensorsHeader> {
    let bad = |m: String| Error::weights(path, format!("{m}; expected {what}"));
    let mut f = std::fs::File::open(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let n = u64::from_le_bytes(len8);
    if n > 100 << 20 {
        return Err(bad(format!("not a safetensors file (header length {n})")));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json).map_err(|e| bad(format!("not a safetensors file (truncated header: {e})")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&json).map_err(|e| bad(format!("not a safetensors file (header is not JSON: {e})")))?;
    let obj = value.as_object().ok_or_else(|| bad("not a safetensors file (header is not a JSON object)".into()))?;
    let mut header = SafetensorsHeader::default();
    for (name, v) in obj {
        if name == "__metadata__" {
            for (k, v) in v.as_object().into_iter().flatten() {
                if let Some(s) = v.as_str() {
                    header.metadata.insert(k.clone(), s.to_string());
                }
            }
            continue;
        }
        let shape = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(format!("not a safetensors file (tensor {name} has no valid shape)")))?;
        header.shapes.insert(name.clone(), shape);
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < tol, "max abs diff {d}");
    }

    #[test]
    fn norms_and_softmax_match_candle_fused_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 4, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 8, &dev).unwrap();
        close(&layer_norm(&x, &w, &b, 1e-5).unwrap(), &candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap(), 1e-5);
        close(&softmax_last_dim(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap(), 1e-6);
        let img = Tensor::randn(0f32, 1.0, (2, 8, 3, 5), &dev).unwrap();
        let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-6).unwrap();
        close(&group_norm(&img, 4, &w, &b, 1e-6).unwrap(), &candle_nn::Module::forward(&gn, &img).unwrap(), 1e-5);
    }

    #[test]
    fn norm_and_softmax_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (2, 6), &dev).unwrap().to_dtype(DType::F64).unwrap();
        let w = Tensor::randn(1f64, 0.3, 6, &dev).unwrap();
        let b = Tensor::randn(0f64, 0.3, 6, &dev).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (2, 6), &dev).unwrap();
        let loss = |x: &Tensor| -> Tensor {
            let y = softmax_last_dim(&layer_norm(x, &w, &b, 1e-5).unwrap()).unwrap();
            (y.to_dtype(DType::F64).unwrap() * &probe).unwrap().sum_all().unwrap()
        };
        let var = Var::from_tensor(&x0).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let g = grads.get(var.as_tensor()).expect("gradient reaches x").to_vec2::<f64>().unwrap();
        let base = x0.to_vec2::<f64>().unwrap();
        for i in 0..2 {
            for j in 0..6 {
                let h = 1e-5;
                let mut plus = base.clone();
                plus[i][j] += h;
                let mut minus = base.clone();
                minus[i][j] -= h;
                let lp = loss(&Tensor::new(plus, &dev).unwrap()).to_scalar::<f64>().unwrap();
                let lm = loss(&Tensor::new(minus, &dev).unwrap()).to_scalar::<f64>().unwrap();
                let fd = (lp - lm) / (2.0 * h);
                assert!((fd - g[i][j]).abs() < 1e-4 * (1.0 + fd.abs()), "d/dx[{i}][{j}]: fd {fd} vs {}", g[i][j]);
            }
        }
    }
}
