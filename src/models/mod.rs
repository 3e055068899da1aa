//! Neural networks in candle, our own code: DINOv2 (semantic features for pose initialisation,
//! coordinate maps and the 2D matching baseline) and U^2-Net-p (built-in foreground masks).
//! The CLIP text encoder (`clip_text`, SD 2.1's OpenCLIP-H) and its BPE tokenizer (`tokenizer`)
//! condition the diffusion model for textual inversion.
//! Weights are read from local safetensors files in our naming (see `scripts/setup_weights.sh`).

pub mod clip_text;
pub mod dinov2;
pub mod u2net;
pub mod ops;
pub mod tokenizer;
