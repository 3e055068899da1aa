//! Semantic features for congealing (paper Sec. 3.2): DINOv2 patch tokens of square crops, and the
//! semantic image distance of Eq. 6-7.
//!
//! Inputs and renderings are both cropped to a square around their silhouette and composited on
//! black with their (rendered) opacity, so DINOv2 sees the object alone in both.

use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};
use tracing::info;

use crate::collection::SquareCrop;
use crate::config::{resolve_weights, FeaturesConfig};
use crate::congeal::coord_maps::FeatureGrid;
use crate::error::{Error, Result};
use crate::models::dinov2::Dinov2;

/// DINOv2 with the settings of a run: crop size, token layer, batch size.
pub struct FeatureExtractor {
    model: Dinov2,
    layer: Option<usize>,
    input_size: u32,
    batch: usize,
    device: Device,
}

impl FeatureExtractor {
    /// Loads the weights named in `cfg` (see [`resolve_weights`]) on `device`.
    pub fn load(cfg: &FeaturesConfig, device: &Device) -> Result<Self> {
        let path = resolve_weights(&cfg.weights)?;
        let model = Dinov2::load(&path, device)?;
        info!("DINOv2 weights {}", path.display());
        Ok(Self { model, layer: cfg.layer, input_size: cfg.input_size, batch: cfg.batch.max(1), device: device.clone() })
    }

    /// Square side of the crops this extractor takes.
    pub fn input_size(&self) -> u32 {
        self.input_size
    }

    /// Tokens per side of the feature grid.
    pub fn tokens_per_side(&self) -> usize {
        (self.input_size / 14) as usize
    }

    /// Features of square crops (`input_size²` row-major RGB in [0, 1] each), L2-normalised per token.
    pub fn extract(&self, crops: &[Vec<[f32; 3]>]) -> Result<Vec<FeatureGrid>> {
        let s = self.input_size as usize;
        let mut out = Vec::with_capacity(crops.len());
        for chunk in crops.chunks(self.batch) {
            let mut data = Vec::with_capacity(chunk.len() * 3 * s * s);
            for crop in chunk {
                if crop.len() != s * s {
                    return Err(Error::InvalidInput(format!("feature crop has {} pixels, expected {}", crop.len(), s * s)));
                }
                for c in 0..3 {
                    data.extend(crop.iter().map(|p| p[c]));
                }
            }
            if data.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidInput("feature crop holds NaN/inf".into()));
            }
            let images = Tensor::from_vec(data, (chunk.len(), 3, s, s), &self.device)?;
            let feats = self.model.patch_features(&images, self.layer)?; // [B, C, h, w]
            let (b, c, h, w) = feats.dims4()?;
            // Channel-last host copy.
            let host: Vec<f32> = feats.permute((0, 2, 3, 1))?.contiguous()?.flatten_all()?.to_vec1()?;
            for k in 0..b {
                out.push(FeatureGrid::new(w, h, c, host[k * h * w * c..(k + 1) * h * w * c].to_vec())?);
            }
        }
        Ok(out)
    }
}

/// An image's square crop resampled to `crop.size²`, composited on black with the mask's coverage.
pub fn masked_crop(rgb: &RgbImage, mask: &GrayImage, crop: &SquareCrop) -> Vec<[f32; 3]> {
    let colour = crop.resample_rgb(rgb);
    let alpha = crop.resample_mask(mask);
    colour.iter().zip(&alpha).map(|(c, a)| c.map(|v| v * a)).collect()
}

/// Which tokens of a `tokens x tokens` grid are foreground: mean coverage of a square
/// `size x size` silhouette over each token's cell is at least one half.
pub fn token_mask(silhouette: &[f32], size: u32, tokens: usize) -> Vec<bool> {
    let n = size as usize;
    let mut sum = vec![0f32; tokens * tokens];
    let mut count = vec![0u32; tokens * tokens];
    for y in 0..n {
        let ty = (y * tokens / n.max(1)).min(tokens - 1);
        for x in 0..n {
            let tx = (x * tokens / n.max(1)).min(tokens - 1);
            sum[ty * tokens + tx] += silhouette.get(y * n + x).copied().unwrap_or(0.0);
            count[ty * tokens + tx] += 1;
        }
    }
    sum.iter().zip(&count).map(|(s, &c)| c > 0 && *s >= 0.5 * c as f32).collect()
}

/// Eq. 7 restricted to the union of two foregrounds: the mean over tokens `u` in `fg_a ∪ fg_b` of
/// `1 - cos(a_u, b_u)` (Eq. 6). 1 when the union is empty.
pub fn semantic_distance(a: &FeatureGrid, fg_a: &[bool], b: &FeatureGrid, fg_b: &[bool]) -> f32 {
    let c = a.channels.min(b.channels);
    let n = (a.width * a.height).min(b.width * b.height).min(fg_a.len()).min(fg_b.len());
    let (mut sum, mut count) = (0f32, 0u32);
    for t in 0..n {
        if fg_a[t] || fg_b[t] {
            let (x, y) = (&a.data[t * a.channels..t * a.channels + c], &b.data[t * b.channels..t * b.channels + c]);
            sum += 1.0 - x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
            count += 1;
        }
    }
    if count == 0 {
        1.0
    } else {
        sum / count as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_is_zero_for_equal_and_two_for_opposite_features() {
        let a = FeatureGrid::new(2, 2, 3, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]).unwrap();
        let neg = FeatureGrid::new(2, 2, 3, a.data.iter().map(|v| -v).collect()).unwrap();
        let fg = [true, false, false, false];
        let none = [false; 4];
        assert!(semantic_distance(&a, &fg, &a, &none).abs() < 1e-6);
        assert!((semantic_distance(&a, &fg, &neg, &none) - 2.0).abs() < 1e-6);
        // Only the union counts: token 3 differs but lies outside both foregrounds.
        let mut b = a.clone();
        b.data[9..12].copy_from_slice(&[0.0, 0.0, 1.0]);
        assert!(semantic_distance(&a, &fg, &b, &none).abs() < 1e-6);
        assert!(semantic_distance(&a, &[false, false, false, true], &b, &none) > 0.2);
        assert_eq!(semantic_distance(&a, &none, &b, &none), 1.0);
    }

    #[test]
    fn token_mask_averages_cells() {
        // 4x4 silhouette, left half on -> 2x2 tokens: left column on.
        let sil: Vec<f32> = (0..16).map(|k| if k % 4 < 2 { 1.0 } else { 0.0 }).collect();
        assert_eq!(token_mask(&sil, 4, 2), vec![true, false, true, false]);
    }
}
