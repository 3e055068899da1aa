//! U^2-Net-p salient-object segmenter (the rembg `u2netp` network), our own candle implementation.
//!
//! Architecture (Qin et al., "U^2-Net", 2020; the small "p" variant with 16 middle / 64 output channels
//! in every block), as found in rembg's `u2netp.onnx`:
//! * RSU-L blocks (L = 7, 6, 5, 4): an input conv, an encoder of L convs with 2x2 max-pooling
//!   (`ceil_mode`) between the first L-1 of them, the last conv dilated by 2, a decoder of L-1 convs
//!   on `[upsampled deeper output, skip]` concatenations, and a residual `decoder + input conv`.
//! * RSU-4F: the same without pooling, using dilations 1, 2, 4, 8 instead.
//! * Every conv is 3x3 with padding = dilation, followed by ReLU; BatchNorm is folded into the conv
//!   in the ONNX export and in our weights.
//! * Upsampling is bilinear to the skip's size with half-pixel centres (PyTorch `align_corners=False`,
//!   ONNX `pytorch_half_pixel`).
//! * Encoder stage1..stage6 (RSU7, 6, 5, 4, 4F, 4F), decoder stage5d..stage1d on 128 input channels,
//!   side outputs d1..d6 (3x3 conv to one channel, upsampled to the input size), fused by a 1x1 conv
//!   `outconv` into d0, and a sigmoid.
//!
//! Weights: `weights/u2netp.safetensors`, written by `scripts/weights/convert_u2netp.py`, with the
//! original PyTorch module names (`stage1.rebnconvin.conv.weight`, `side1.bias`, `outconv.weight`...).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Side of the square input the network was trained on (rembg resizes every image to it).
pub const INPUT_SIZE: usize = 320;

/// Middle channels of every RSU block of U^2-Net-p.
const MID: usize = 16;
/// Output channels of every RSU block of U^2-Net-p.
const OUT: usize = 64;

/// A 3x3 (or 1x1) convolution with bias, optionally followed by ReLU.
#[derive(Debug)]
struct Conv {
    weight: Tensor,
    /// Bias reshaped to `[1, C, 1, 1]`.
    bias: Tensor,
    dilation: usize,
    padding: usize,
    relu: bool,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y =
            if x.device().is_cpu() { self.forward_gemm(x)? } else { x.conv2d(&self.weight, self.padding, 1, self.dilation, 1)? };
        let y = y.broadcast_add(&self.bias)?;
        Ok(if self.relu { y.relu()? } else { y })
    }

    /// The convolution as matrix products (candle's CPU conv2d is several times slower here): for every
    /// kernel tap, the shifted input `[B, C, H*W]` times that tap's `[O, C]` weights, gathered into one
    /// im2col product when the column matrix is small, else accumulated tap by tap.
    fn forward_gemm(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (o, _, k, _) = self.weight.dims4()?;
        let (p, d) = (self.padding, self.dilation);
        let xp = if p > 0 { x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)? } else { x.clone() };
        let taps =
            (0..k * k).map(|t| Ok(xp.narrow(2, (t / k) * d, h)?.narrow(3, (t % k) * d, w)?)).collect::<Result<Vec<Tensor>>>()?;
        // [O, k, k, C] so that column (tap * C + channel) matches the tap-major im2col below.
        let wm = self.weight.permute((0, 2, 3, 1))?.contiguous()?.reshape((o, k * k * c))?;
        let cols_bytes = b * k * k * c * h * w * 4;
        let y = if k == 1 || cols_bytes <= IM2COL_MAX_BYTES {
            let cols = Tensor::cat(&taps, 1)?.reshape((b, k * k * c, h * w))?;
            wm.broadcast_matmul(&cols)?
        } else {
            let mut acc: Option<Tensor> = None;
            for (t, tap) in taps.iter().enumerate() {
                let wt = wm.narrow(1, t * c, c)?.contiguous()?;
                let yt = wt.broadcast_matmul(&tap.contiguous()?.reshape((b, c, h * w))?)?;
                acc = Some(match acc {
                    Some(a) => (a + yt)?,
                    None => yt,
                });
            }
            acc.ok_or_else(|| Error::Numerical("empty convolution kernel".into()))?
        };
        Ok(y.reshape((b, o, h, w))?)
    }
}

/// Largest im2col matrix built at once by [`Conv::forward_gemm`], bytes.
const IM2COL_MAX_BYTES: usize = 128 << 20;

/// Reads the tensors of a weight file and hands them out by name, checking shapes.
struct WeightReader<'a> {
    path: &'a Path,
    tensors: HashMap<String, Tensor>,
    device: &'a Device,
}

impl WeightReader<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| Error::Weights {
            path: self.path.to_path_buf(),
            message: format!(
                "tensor `{name}` (shape {shape:?}) is missing: expected U^2-Net-p weights in our naming, as written \
                 by scripts/weights/convert_u2netp.py (run scripts/setup_weights.sh)"
            ),
        })?;
        if t.dims() != shape {
            return Err(Error::Weights {
                path: self.path.to_path_buf(),
                message: format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    /// Conv `prefix.weight` / `prefix.bias` of shape `[out, inp, k, k]`.
    fn conv(&mut self, prefix: &str, out: usize, inp: usize, k: usize, dilation: usize, relu: bool) -> Result<Conv> {
        let weight = self.get(&format!("{prefix}.weight"), &[out, inp, k, k])?;
        let bias = self.get(&format!("{prefix}.bias"), &[out])?.reshape((1, out, 1, 1))?;
        let padding = if k == 3 { dilation } else { 0 };
        Ok(Conv { weight, bias, dilation, padding, relu })
    }
}

/// An RSU block: RSU-L (pooling) or RSU-4F (dilated, no pooling).
#[derive(Debug)]
struct Rsu {
    conv_in: Conv,
    /// `rebnconv1..rebnconvL`.
    encoder: Vec<Conv>,
    /// `rebnconv{L-1}d..rebnconv1d` (deepest first).
    decoder: Vec<Conv>,
    /// RSU-L (true) or RSU-4F (false).
    pooled: bool,
}

impl Rsu {
    /// Reads block `stage` of height `height` (4F: `pooled = false`, height 4) with `in_ch` input channels.
    fn load(w: &mut WeightReader, stage: &str, height: usize, pooled: bool, in_ch: usize) -> Result<Self> {
        let conv_in = w.conv(&format!("{stage}.rebnconvin.conv"), OUT, in_ch, 3, 1, true)?;
        // Dilation of encoder conv k (1-based) and of decoder conv kd.
        let dil = |k: usize| -> usize {
            if pooled {
                if k == height {
                    2
                } else {
                    1
                }
            } else {
                1 << (k - 1)
            }
        };
        let mut encoder = Vec::with_capacity(height);
        for k in 1..=height {
            let inp = if k == 1 { OUT } else { MID };
            encoder.push(w.conv(&format!("{stage}.rebnconv{k}.conv"), MID, inp, 3, dil(k), true)?);
        }
        let mut decoder = Vec::with_capacity(height - 1);
        for k in (1..height).rev() {
            let out = if k == 1 { OUT } else { MID };
            decoder.push(w.conv(&format!("{stage}.rebnconv{k}d.conv"), out, 2 * MID, 3, dil(k), true)?);
        }
        Ok(Self { conv_in, encoder, decoder, pooled })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hxin = self.conv_in.forward(x)?;
        let height = self.encoder.len();
        let mut skips: Vec<Tensor> = Vec::with_capacity(height);
        let mut hx = hxin.clone();
        for (i, conv) in self.encoder.iter().enumerate() {
            // Pooling before rebnconv2..rebnconv{L-1} (0-based i in 1..=L-2).
            if self.pooled && i >= 1 && i + 1 < height {
                hx = max_pool_ceil(&hx)?;
            }
            hx = conv.forward(&hx)?;
            skips.push(hx.clone());
        }
        // Decoder: rebnconv{j}d on [deeper, skip j] for j = L-1 .. 1.
        let mut cur = hx;
        for (conv, j) in self.decoder.iter().zip((1..height).rev()) {
            cur = conv.forward(&Tensor::cat(&[&cur, &skips[j - 1]], 1)?)?;
            if self.pooled && j > 1 {
                cur = upsample_like(&cur, &skips[j - 2])?;
            }
        }
        Ok((cur + hxin)?)
    }
}

/// 2x2 max pooling, stride 2, PyTorch `ceil_mode=True`: odd sizes are padded by repeating the last
/// row/column, which leaves the maxima of the partial windows unchanged.
fn max_pool_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut x = x.clone();
    if h % 2 == 1 {
        x = x.pad_with_same(2, 0, 1)?;
    }
    if w % 2 == 1 {
        x = x.pad_with_same(3, 0, 1)?;
    }
    Ok(x.max_pool2d(2)?)
}

/// Bilinear resize of `src` to the spatial size of `target` (half-pixel centres, like PyTorch
/// `F.interpolate(mode="bilinear", align_corners=False)`).
fn upsample_like(src: &Tensor, target: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = src.dims4()?;
    let (_, _, th, tw) = target.dims4()?;
    if (h, w) == (th, tw) {
        return Ok(src.clone());
    }
    Ok(src.upsample_bilinear2d(th, tw, false)?)
}

/// The U^2-Net-p network (4.4 M parameters) with rembg's `u2netp` weights.
#[derive(Debug)]
pub struct U2NetP {
    /// stage1..stage6 then stage5d..stage1d.
    stages: Vec<Rsu>,
    /// side1..side6.
    sides: Vec<Conv>,
    outconv: Conv,
    device: Device,
}

impl U2NetP {
    /// Loads the weights from a safetensors file in our naming (`scripts/weights/convert_u2netp.py`) onto
    /// `device`. A missing file, an unreadable one, or one without the expected tensors (names and shapes)
    /// gives [`Error::Weights`] naming the file and what was expected.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: "file not found; expected U^2-Net-p weights (u2netp.safetensors): run \
                          scripts/setup_weights.sh to fetch and convert them"
                    .into(),
            });
        }
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file ({e}); expected U^2-Net-p weights (u2netp.safetensors)"),
        })?;
        let mut w = WeightReader { path, tensors, device };
        let spec: [(&str, usize, bool, usize); 11] = [
            ("stage1", 7, true, 3),
            ("stage2", 6, true, OUT),
            ("stage3", 5, true, OUT),
            ("stage4", 4, true, OUT),
            ("stage5", 4, false, OUT),
            ("stage6", 4, false, OUT),
            ("stage5d", 4, false, 2 * OUT),
            ("stage4d", 4, true, 2 * OUT),
            ("stage3d", 5, true, 2 * OUT),
            ("stage2d", 6, true, 2 * OUT),
            ("stage1d", 7, true, 2 * OUT),
        ];
        let stages = spec
            .iter()
            .map(|&(name, height, pooled, in_ch)| Rsu::load(&mut w, name, height, pooled, in_ch))
            .collect::<Result<Vec<_>>>()?;
        let sides = (1..=6).map(|k| w.conv(&format!("side{k}"), 1, OUT, 3, 1, false)).collect::<Result<Vec<_>>>()?;
        let outconv = w.conv("outconv", 1, 6, 1, 1, false)?;
        if !w.tensors.is_empty() {
            let mut extra: Vec<&String> = w.tensors.keys().collect();
            extra.sort();
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!(
                    "{} unexpected tensors (e.g. `{}`): not a U^2-Net-p weight file in our naming",
                    extra.len(),
                    extra[0]
                ),
            });
        }
        Ok(Self { stages, sides, outconv, device: device.clone() })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the network on a normalised batch `[B, 3, H, W]` (rembg feeds 320 x 320, see
    /// [`INPUT_SIZE`]; other sizes work but were not trained) and returns the fused output d0 as
    /// probabilities `[B, 1, H, W]` (after the sigmoid).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(&self.forward_logits(x)?[0])?)
    }

    /// Like [`U2NetP::forward`] but returns all seven outputs d0..d6 as logits (before the sigmoid),
    /// each `[B, 1, H, W]`; useful for debugging and parity checks.
    pub fn forward_logits(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, c, h, w) = x
            .dims4()
            .map_err(|_| Error::InvalidInput(format!("U^2-Net-p expects a [B, 3, H, W] input, got shape {:?}", x.dims())))?;
        if c != 3 || h == 0 || w == 0 {
            return Err(Error::InvalidInput(format!(
                "U^2-Net-p expects a [B, 3, H, W] input with H, W > 0, got shape {:?}",
                x.dims()
            )));
        }
        let x = x.to_dtype(DType::F32)?.to_device(&self.device)?;
        let s = &self.stages;
        // Encoder.
        let hx1 = s[0].forward(&x)?;
        let hx2 = s[1].forward(&max_pool_ceil(&hx1)?)?;
        let hx3 = s[2].forward(&max_pool_ceil(&hx2)?)?;
        let hx4 = s[3].forward(&max_pool_ceil(&hx3)?)?;
        let hx5 = s[4].forward(&max_pool_ceil(&hx4)?)?;
        let hx6 = s[5].forward(&max_pool_ceil(&hx5)?)?;
        // Decoder.
        let hx5d = s[6].forward(&Tensor::cat(&[&upsample_like(&hx6, &hx5)?, &hx5], 1)?)?;
        let hx4d = s[7].forward(&Tensor::cat(&[&upsample_like(&hx5d, &hx4)?, &hx4], 1)?)?;
        let hx3d = s[8].forward(&Tensor::cat(&[&upsample_like(&hx4d, &hx3)?, &hx3], 1)?)?;
        let hx2d = s[9].forward(&Tensor::cat(&[&upsample_like(&hx3d, &hx2)?, &hx2], 1)?)?;
        let hx1d = s[10].forward(&Tensor::cat(&[&upsample_like(&hx2d, &hx1)?, &hx1], 1)?)?;
        // Side outputs, upsampled to d1's size, and their fusion.
        let d1 = self.sides[0].forward(&hx1d)?;
        let mut ds = vec![d1.clone()];
        for (side, hx) in self.sides[1..].iter().zip([&hx2d, &hx3d, &hx4d, &hx5d, &hx6]) {
            ds.push(upsample_like(&side.forward(hx)?, &d1)?);
        }
        let d0 = self.outconv.forward(&Tensor::cat(&ds, 1)?)?;
        let mut out = vec![d0];
        out.extend(ds);
        Ok(out)
    }
}
