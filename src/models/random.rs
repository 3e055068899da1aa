//! Seeded random weights for any of our models, so the `tiny` configuration (and benchmarks of the
//! real configurations) run without weight files. Mechanics only: the networks are untrained.
//!
//! Every tensor is drawn from its name and the seed alone (a 64-bit hash of both seeds a small
//! generator), so a model is reproducible whatever order its layers are built in. 1-D tensors named
//! `*.weight` (norm scales) are ones plus a little noise, other 1-D tensors (biases, norm shifts) small
//! noise around zero, and matrices/kernels normal with standard deviation `1/sqrt(fan_in)`.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// The [`SimpleBackend`] behind [`random_varbuilder`].
#[derive(Clone, Debug)]
pub struct RandomInit {
    /// Seed mixed into every tensor's stream.
    pub seed: u64,
}

/// SplitMix64 step: advances `state` and returns the next 64 random bits (fast, well mixed; fine for
/// test weights and for the sampling streams of score distillation).
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a hash of a name, mixed with the seed.
fn name_hash(name: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x1000_0000_01b3);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x1000_0000_01b3);
    }
    h
}

/// `n` standard normal samples (Box-Muller) from the stream seeded by `state`.
pub fn normal_samples(mut state: u64, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = ((splitmix(&mut state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = ((splitmix(&mut state) >> 11) as f64) / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

impl RandomInit {
    fn draw(&self, shape: &Shape, name: &str) -> Vec<f32> {
        let dims = shape.dims();
        let n = shape.elem_count();
        let z = normal_samples(name_hash(name, self.seed), n);
        if dims.len() <= 1 {
            let is_scale = name.ends_with(".weight") || name.ends_with("gamma");
            return z.iter().map(|v| if is_scale { 1.0 + 0.05 * v } else { 0.02 * v }).collect();
        }
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        let std = 1.0 / (fan_in as f32).sqrt();
        z.iter().map(|v| v * std).collect()
    }
}

impl SimpleBackend for RandomInit {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let values = self.draw(&s, name);
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("random weights need a shape for {name}")))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A [`VarBuilder`] that makes up seeded random weights for whatever a model asks for.
pub fn random_varbuilder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomInit { seed }), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_reproducible_and_scaled() {
        let vb = random_varbuilder(7, DType::F32, &Device::Cpu);
        let a = vb.get((64, 256), "layer.weight").unwrap();
        let b = random_varbuilder(7, DType::F32, &Device::Cpu).get((64, 256), "layer.weight").unwrap();
        let c = random_varbuilder(8, DType::F32, &Device::Cpu).get((64, 256), "layer.weight").unwrap();
        let diff = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 0.1);
        let v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!((var * 256.0 - 1.0).abs() < 0.1, "variance x fan_in = {}", var * 256.0);
        let scale = vb.get(32, "norm.weight").unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((scale - 1.0).abs() < 0.05);
    }
}
