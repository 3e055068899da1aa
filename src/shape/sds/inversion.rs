//! Textual inversion (Eq. 5): the placeholder prompt, the masked input crops and the optimisation of y*.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use image::{imageops, GrayImage, Rgb, RgbImage};

use super::*;
use crate::config::SdsConfig;
use crate::error::{Error, Result};

/// The prompt with the rows of its placeholder tokens replaced by trainable (or learned) embeddings.
pub struct PlaceholderPrompt {
    /// Token embeddings of the prompt, `[1, L, C]`, without the substitution.
    base: Tensor,
    /// Positions in the token sequence, one per placeholder row.
    pub positions: Vec<usize>,
}

impl PlaceholderPrompt {
    /// Tokenises `prompt` and finds the tokens of `words` (every token of every occurrence).
    pub fn new(models: &DiffusionModels, prompt: &str, words: &[String]) -> Result<Self> {
        let ids = models.prompt_ids(prompt)?;
        let base = models.text.embed_tokens(&ids)?.detach();
        let mut positions = Vec::new();
        for w in words {
            let found = models.tokenizer.token_positions(prompt, w)?;
            if found.is_empty() {
                return Err(Error::Config(format!("placeholder word `{w}` is not in the prompt `{prompt}`")));
            }
            positions.extend(found);
        }
        positions.sort_unstable();
        positions.dedup();
        Ok(Self { base, positions })
    }

    /// The initial values of the placeholder rows, `[P, C]`.
    pub fn initial_rows(&self) -> Result<Tensor> {
        let rows: Vec<Tensor> = self.positions.iter().map(|&p| self.base.get(0)?.get(p)).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// Token embeddings `[1, L, C]` with the placeholder rows taken from `rows` (`[P, C]`); the
    /// gradient reaches `rows`.
    pub fn embeddings(&self, rows: &Tensor) -> Result<Tensor> {
        let len = self.base.dim(1)?;
        let mut parts = Vec::with_capacity(2 * self.positions.len() + 1);
        let mut start = 0;
        for (k, &p) in self.positions.iter().enumerate() {
            if p > start {
                parts.push(self.base.narrow(1, start, p - start)?);
            }
            parts.push(rows.narrow(0, k, 1)?.unsqueeze(0)?.to_dtype(self.base.dtype())?);
            start = p + 1;
        }
        if start < len {
            parts.push(self.base.narrow(1, start, len - start)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// The result of textual inversion (y*).
#[derive(Clone, Debug)]
pub struct TextualInversion {
    /// The prompt.
    pub prompt: String,
    /// Placeholder words.
    pub words: Vec<String>,
    /// Token positions of the learned rows.
    pub positions: Vec<usize>,
    /// Learned rows `[P, C]` (f32, CPU).
    pub rows: Tensor,
    /// Mean diffusion loss per tenth of the run.
    pub loss_curve: Vec<f64>,
}

impl TextualInversion {
    /// Writes y* as safetensors (`embeddings` `[P, C]`; metadata: prompt, words, positions).
    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = [
            ("prompt".to_string(), self.prompt.clone()),
            ("placeholder_words".to_string(), self.words.join(",")),
            ("positions".to_string(), self.positions.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")),
        ]
        .into_iter()
        .collect();
        let data = self.rows.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let tensors = [("embeddings".to_string(), data)].into_iter().collect();
        crate::models::convert::write_safetensors(path, &crate::models::convert::ConvertedModel { tensors, metadata })
    }
}

/// Crops each (image, mask) to the mask's tight bbox, composites the object over white, pads to a
/// square and resizes to `size`: a `[N, 3, size, size]` tensor in [-1, 1] (the VAE's input range).
pub fn masked_square_crops(images: &[(&RgbImage, &GrayImage)], size: u32, device: &Device) -> Result<Tensor> {
    if images.is_empty() || size == 0 {
        return Err(Error::InvalidInput("textual inversion needs at least one image".into()));
    }
    let mut data = Vec::with_capacity(images.len() * 3 * (size * size) as usize);
    for (rgb, mask) in images {
        if rgb.dimensions() != mask.dimensions() {
            return Err(Error::InvalidInput(format!(
                "image {:?} and mask {:?} differ in size",
                rgb.dimensions(),
                mask.dimensions()
            )));
        }
        let (w, h) = rgb.dimensions();
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        for (x, y, m) in mask.enumerate_pixels() {
            if m[0] >= 128 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
        if x1 <= x0 || y1 <= y0 {
            return Err(Error::InvalidInput("empty mask: nothing to learn the object from".into()));
        }
        let side = (x1 - x0).max(y1 - y0);
        let mut square = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
        let (ox, oy) = ((side - (x1 - x0)) / 2, (side - (y1 - y0)) / 2);
        for y in y0..y1 {
            for x in x0..x1 {
                let a = mask.get_pixel(x, y)[0] as f32 / 255.0;
                let p = rgb.get_pixel(x, y);
                let c = Rgb([0, 1, 2].map(|k| (p[k] as f32 * a + 255.0 * (1.0 - a)).round() as u8));
                square.put_pixel(ox + x - x0, oy + y - y0, c);
            }
        }
        let resized = imageops::resize(&square, size, size, imageops::FilterType::Triangle);
        for c in 0..3 {
            for p in resized.pixels() {
                data.push(p[c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size as usize, size as usize), device)?)
}

/// Textual inversion (Eq. 5): optimises the placeholder rows of the prompt's token embeddings with the
/// diffusion training loss on `crops` (`[N, 3, S, S]` in [-1, 1]); only those rows change.
pub fn textual_inversion(
    models: &DiffusionModels,
    crops: &Tensor,
    cfg: &SdsConfig,
    progress: &dyn Fn(f32),
) -> Result<TextualInversion> {
    let device = crops.device().clone();
    let dtype = models.dtype();
    let n = crops.dim(0)?;
    let prompt = PlaceholderPrompt::new(models, &cfg.prompt, &cfg.placeholder_words)?;
    // Latents of every crop once (the VAE is frozen): mean and std of the latent Gaussian.
    let sf = models.vae.scaling_factor();
    let mut means = Vec::with_capacity(n);
    let mut stds = Vec::with_capacity(n);
    for i in 0..n {
        let (mean, logvar) = models.vae.encode(&crops.narrow(0, i, 1)?.to_dtype(dtype)?)?;
        means.push(mean.detach());
        stds.push((logvar * 0.5)?.exp()?.detach());
    }
    let rows = Var::from_tensor(&prompt.initial_rows()?.to_dtype(DType::F32)?)?;
    let mut opt =
        AdamW::new(vec![rows.clone()], ParamsAdamW { lr: cfg.ti_lr, weight_decay: cfg.ti_weight_decay, ..Default::default() })?;
    let mut rng = Stream::new(cfg.seed ^ 0x7153);
    let mut losses = Vec::new();
    let mut curve = Vec::new();
    let chunk = (cfg.ti_iterations / 10).max(1);
    for step in 0..cfg.ti_iterations {
        let picks: Vec<usize> = (0..cfg.ti_batch).map(|_| (rng.next_u64() % n as u64) as usize).collect();
        let mut latents = Vec::with_capacity(picks.len());
        for &i in &picks {
            let shape = means[i].dims().to_vec();
            let z = (&means[i] + stds[i].mul(&rng.normal(&shape, &device, dtype)?)?)?;
            latents.push((z * sf)?);
        }
        let latents = Tensor::cat(&latents, 0)?;
        let b = picks.len();
        let timesteps: Vec<usize> = (0..b).map(|_| (rng.next_u64() % TRAIN_TIMESTEPS as u64) as usize).collect();
        let noise = rng.normal(latents.dims(), &device, dtype)?;
        let noisy = models.schedule.add_noise(&latents, &noise, &timesteps)?;
        let cond = models.text.forward_embeddings(&prompt.embeddings(rows.as_tensor())?, models.text_skip_layers)?;
        let cond = cond.broadcast_as((b, cond.dim(1)?, cond.dim(2)?))?;
        let t = Tensor::from_vec(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, &device)?.to_dtype(dtype)?;
        let pred = models.unet.forward(&noisy, &t, &cond, None, 1)?;
        let loss = (pred.to_dtype(DType::F32)? - noise.to_dtype(DType::F32)?)?.sqr()?.mean_all()?;
        let l = check_finite(&loss, &format!("textual inversion loss at step {step}"))?;
        opt.backward_step(&loss)?;
        losses.push(l);
        if losses.len() == chunk || step + 1 == cfg.ti_iterations {
            curve.push(losses.iter().sum::<f64>() / losses.len() as f64);
            losses.clear();
        }
        progress((step + 1) as f32 / cfg.ti_iterations.max(1) as f32);
    }
    Ok(TextualInversion {
        prompt: cfg.prompt.clone(),
        words: cfg.placeholder_words.clone(),
        positions: prompt.positions.clone(),
        rows: rows.as_tensor().detach(),
        loss_curve: curve,
    })
}
