//! Shape source `sds`: the paper's stages 1-2. Textual inversion (Eq. 5) finds the embeddings y* of the
//! placeholder words ("sks object") that best explain the masked input crops under a frozen diffusion
//! model; score distillation (Eq. 2-4 with lambda = 0) then optimises the canonical field so that its
//! renderings look like y* to the same model.
//!
//! What follows MVDream-threestudio (what makes it converge): 4 views per step at azimuths 90 degrees
//! apart with camera conditioning, classifier-free guidance 50, the timestep range annealed from
//! [0.98, 0.98] to [0.02, 0.50] over 8000 steps, the x0-reconstruction loss with std rescale 0.5,
//! renders at 64 px then 256 px, a Magic3D density blob at initialisation, random background colours.
//! Without an MVDream UNet, SD 2.1 guides each view alone (no camera), the same loss otherwise.
//!
//! The field is a dense density/colour grid (density = softplus(raw + blob) x scale, colour =
//! sigmoid(raw)), rendered by the same differentiable renderer as every later stage; the gradient runs
//! from the loss through the VAE encoder and the renderer to the grid. The UNet is evaluated without a
//! graph (its Jacobian is not part of SDS). Decisions the paper leaves open: textual inversion uses the
//! UNet without camera conditioning (input poses are unknown then) on crops composited over white;
//! score distillation encodes the latent mean (no latent sampling).
//!
//! - `schedule`: the DDPM noise schedule;
//! - `models`: the frozen diffusion prior (tokenizer, text encoder, UNet, VAE) and where it comes from;
//! - `inversion`: textual inversion (Eq. 5);
//! - `field`: the density/colour grid that score distillation optimises;
//! - `views`: cameras, views, renders and latents of a distillation step;
//! - `distill`: score distillation (Eq. 2-4) and [`build_sds_shape`].

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::models::random::{normal_samples, splitmix};

mod distill;
mod field;
mod inversion;
mod models;
mod schedule;
mod views;

pub use distill::*;
pub use field::*;
pub use inversion::*;
pub use models::*;
pub use schedule::*;
pub use views::*;

/// A small deterministic random stream (views, timesteps, image picks, noise).
struct Stream {
    state: u64,
}

impl Stream {
    fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x5DEE_CE66_D1CE_4E5B }
    }

    fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.state)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, r: [f64; 2]) -> f64 {
        r[0] + (r[1] - r[0]) * self.uniform()
    }

    fn normal(&mut self, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        let v = normal_samples(self.next_u64(), n);
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    }
}

fn check_finite(t: &Tensor, what: &str) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !v.is_finite() {
        return Err(Error::InvalidInput(format!("{what} is not finite ({v}); lower the learning rate or check the weights")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
