//! Built-in foreground masks: the U^2-Net-p salient-object segmenter ([`crate::models::u2net`]) with
//! rembg's pre- and post-processing.
//!
//! Preprocessing (rembg's `u2netp` session): RGB resized to 320 x 320 with a Lanczos-3 filter (PIL
//! `LANCZOS` in rembg, `image`'s `Lanczos3` here), divided by the image's largest channel value, then
//! normalised by the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
//! Post-processing: the fused output d0 is min-max normalised over the image, scaled to 0-255
//! (truncated, like rembg), and resized back to the input size (Lanczos-3).
//! Binary masks threshold that map at 0.5 (`>= 128`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::models::u2net::{U2NetP, INPUT_SIZE};

/// ImageNet channel means used by rembg's u2netp session.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations used by rembg's u2netp session.
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Images per forward pass in [`Segmenter::predict_batch`] unless changed with [`Segmenter::set_batch`].
pub const DEFAULT_BATCH: usize = 8;

/// Threshold on the 0-255 probability map: pixels `>= MASK_THRESHOLD` are object (probability >= 0.5).
/// Measured on the five shipped collections: 0.5 and 0.6 were best (median IoU within 0.01 of each
/// other); keeping only the largest connected component did not help (chairs' legs can be separate).
pub const MASK_THRESHOLD: u8 = 128;

/// A U^2-Net-p foreground segmenter with rembg's pre- and post-processing.
#[derive(Debug)]
pub struct Segmenter {
    net: U2NetP,
    batch: usize,
}

impl Segmenter {
    /// Loads the U^2-Net-p weights (`weights/u2netp.safetensors`, see `scripts/setup_weights.sh`) onto
    /// `device`; [`Error::Weights`] if the file is missing or not U^2-Net-p weights.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Ok(Self { net: U2NetP::load(path, device)?, batch: DEFAULT_BATCH })
    }

    /// Sets the number of images per forward pass of [`Segmenter::predict_batch`] (at least 1).
    pub fn set_batch(&mut self, batch: usize) {
        self.batch = batch.max(1);
    }

    /// The underlying network.
    pub fn network(&self) -> &U2NetP {
        &self.net
    }

    /// Probability map of the salient object (0-255, min-max normalised over the image) at the input's size.
    pub fn predict(&self, rgb: &RgbImage) -> Result<GrayImage> {
        let mut out = self.predict_batch(std::slice::from_ref(rgb))?;
        out.pop().ok_or_else(|| Error::Numerical("U^2-Net-p returned no output".into()))
    }

    /// [`Segmenter::predict`] for several images, in forward passes of up to [`DEFAULT_BATCH`] images
    /// (pre- and post-processing in parallel).
    pub fn predict_batch(&self, images: &[RgbImage]) -> Result<Vec<GrayImage>> {
        Ok(self.run(images)?.into_iter().map(|(map, _)| map).collect())
    }

    /// Probability maps and each image's largest raw probability (before the min-max normalisation).
    fn run(&self, images: &[RgbImage]) -> Result<Vec<(GrayImage, f32)>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.batch) {
            for img in chunk {
                if img.width() == 0 || img.height() == 0 {
                    return Err(Error::InvalidInput("cannot segment an empty (0-pixel) image".into()));
                }
            }
            let inputs: Vec<Vec<f32>> = chunk.par_iter().map(preprocess).collect();
            let n = inputs.len();
            let data: Vec<f32> = inputs.concat();
            let x = Tensor::from_vec(data, (n, 3, INPUT_SIZE, INPUT_SIZE), self.net.device())?;
            let probs = self.net.forward(&x)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let plane = INPUT_SIZE * INPUT_SIZE;
            let maps: Vec<(GrayImage, f32)> = chunk
                .par_iter()
                .enumerate()
                .map(|(i, img)| postprocess(&probs[i * plane..(i + 1) * plane], img.width(), img.height()))
                .collect();
            out.extend(maps);
        }
        Ok(out)
    }

    /// Binary mask (0/255) of the salient object at the input's size: [`Segmenter::predict`] thresholded at
    /// [`MASK_THRESHOLD`]. [`Error::Mask`] if nothing or everything is foreground, or if the network is not
    /// confident anywhere (largest raw probability below [`MIN_CONFIDENCE`]: rembg's min-max
    /// normalisation would turn that into a spurious blob).
    pub fn mask(&self, rgb: &RgbImage) -> Result<GrayImage> {
        let mut out = self.mask_batch(std::slice::from_ref(rgb))?;
        out.pop().ok_or_else(|| Error::Numerical("U^2-Net-p returned no output".into()))?
    }

    /// [`Segmenter::mask`] for several images; one result per image (an empty or full mask fails only
    /// that image), or an error for the whole batch if the network itself fails.
    pub fn mask_batch(&self, images: &[RgbImage]) -> Result<Vec<Result<GrayImage>>> {
        Ok(self.run(images)?.iter().map(|(map, max)| confident_mask(map, *max)).collect())
    }
}

/// Smallest raw probability (before min-max normalisation) the most confident pixel must reach for
/// [`Segmenter::mask`] to return a mask. Measured on the 200 shipped images: every image but one peaks at
/// 0.97 or more; the exception (chair-plaid 015, on a checkerboard) peaks at 0.285 and its normalised
/// mask is a 0.02-IoU blob.
pub const MIN_CONFIDENCE: f32 = 0.5;

/// [`threshold_mask`] after the [`MIN_CONFIDENCE`] check.
fn confident_mask(map: &GrayImage, max_probability: f32) -> Result<GrayImage> {
    if max_probability < MIN_CONFIDENCE {
        return Err(Error::Mask {
            path: PathBuf::from("<U^2-Net-p prediction>"),
            message: format!(
                "the segmenter found no confident foreground (largest probability {max_probability:.3} < \
                 {MIN_CONFIDENCE}); provide a mask for this image"
            ),
        });
    }
    threshold_mask(map)
}

/// Thresholds a probability map from [`Segmenter::predict`] at [`MASK_THRESHOLD`] into a 0/255 mask;
/// [`Error::Mask`] if the mask is empty or covers the whole image.
pub fn threshold_mask(prob: &GrayImage) -> Result<GrayImage> {
    let mut mask = prob.clone();
    let mut set = 0usize;
    for p in mask.pixels_mut() {
        let on = p[0] >= MASK_THRESHOLD;
        set += on as usize;
        p[0] = if on { 255 } else { 0 };
    }
    let source = || PathBuf::from("<U^2-Net-p prediction>");
    if set == 0 {
        return Err(Error::Mask {
            path: source(),
            message: "the segmenter found no foreground object (empty mask); provide a mask for this image".into(),
        });
    }
    if set == mask.pixels().len() {
        return Err(Error::Mask {
            path: source(),
            message: "the segmenter marked the whole image as foreground; provide a mask for this image".into(),
        });
    }
    Ok(mask)
}

/// rembg's preprocessing: Lanczos-3 resize to 320 x 320, divide by the largest value, ImageNet
/// normalisation; returns CHW `f32`.
pub fn preprocess(rgb: &RgbImage) -> Vec<f32> {
    let side = INPUT_SIZE as u32;
    let resized = if rgb.dimensions() == (side, side) {
        rgb.clone()
    } else {
        image::imageops::resize(rgb, side, side, FilterType::Lanczos3)
    };
    let max = resized.as_raw().iter().copied().max().unwrap_or(0);
    // rembg divides by the max (NaN for an all-black image); treat black as black.
    let scale = if max == 0 { 1.0 } else { 1.0 / f32::from(max) };
    let plane = INPUT_SIZE * INPUT_SIZE;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in resized.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(p[c]) * scale - MEAN[c]) / STD[c];
        }
    }
    out
}

/// rembg's post-processing of one 320 x 320 probability plane: min-max normalisation, `x 255` truncated to
/// `u8`, Lanczos-3 resize to `width x height`. Also returns the largest raw probability.
fn postprocess(plane: &[f32], width: u32, height: u32) -> (GrayImage, f32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in plane {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let range = hi - lo;
    let side = INPUT_SIZE as u32;
    let data: Vec<u8> =
        plane.iter().map(|&v| if range > 0.0 && range.is_finite() { ((v - lo) / range * 255.0) as u8 } else { 0 }).collect();
    let map = GrayImage::from_raw(side, side, data).unwrap_or_else(|| GrayImage::new(side, side));
    let map =
        if (width, height) == (side, side) { map } else { image::imageops::resize(&map, width, height, FilterType::Lanczos3) };
    (map, hi)
}
