//! Neural networks in candle, our own code: DINOv2 (semantic features for pose initialisation,
//! coordinate maps and the 2D matching baseline), U^2-Net-p (built-in foreground masks) and the
//! Stable Diffusion VAE (`vae`, diffusers `AutoencoderKL`, differentiable for score distillation).
//! Weights are read from local safetensors files in our naming (see `scripts/setup_weights.sh`).

pub mod dinov2;
pub mod u2net;
pub mod vae;
pub mod ops;
