//! Neural networks in candle, our own code: DINOv2 (semantic features for pose initialisation,
//! coordinate maps and the 2D matching baseline), U^2-Net-p (built-in foreground masks), and the
//! diffusion prior of the `sds` shape source: the CLIP text encoder (`clip_text`, SD 2.1's
//! OpenCLIP-H) with its BPE tokenizer (`tokenizer`), the Stable Diffusion 2.1 / MVDream denoising
//! UNet (`unet`) and the latent autoencoder (`vae`), all differentiable for textual inversion and
//! score distillation. `convert` turns MVDream's original LDM/OpenCLIP checkpoint into our files.
//! `ops` holds the differentiable building blocks they share; `random` makes seeded random weights
//! for the tiny configuration and benchmarks.
//! Weights are read from local safetensors files in our naming (see `scripts/setup_weights.sh`).

pub mod clip_text;
pub mod convert;
pub mod dinov2;
pub mod ops;
pub mod random;
pub mod tokenizer;
pub mod u2net;
pub mod unet;
pub mod vae;
