//! The DDPM noise schedule of Stable Diffusion.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

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
