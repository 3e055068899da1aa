//! Neural networks in candle, our own code: DINOv2 (semantic features for pose initialisation,
//! coordinate maps and the 2D matching baseline) and U^2-Net-p (built-in foreground masks).
//! Weights are read from local safetensors files in our naming (see `scripts/setup_weights.sh`).

pub mod dinov2;
pub mod u2net;
pub mod ops;
/// Converter from MVDream's LDM/OpenCLIP checkpoint to our diffusers/HF-named safetensors files.
pub mod convert;
