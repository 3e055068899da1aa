//! Neural networks in candle, our own code: DINOv2 (semantic features for pose initialisation,
//! coordinate maps and the 2D matching baseline), U^2-Net-p (built-in foreground masks) and the
//! Stable Diffusion 2.1 / MVDream denoising UNet (`unet`, differentiable, for textual inversion and
//! score distillation).
//! Weights are read from local safetensors files in our naming (see `scripts/setup_weights.sh`).

pub mod dinov2;
pub mod u2net;
pub mod unet;
pub mod ops;
