//! Benchmarks behind `congeal bench-features` and `congeal bench-sds`: DINOv2 feature times, and the
//! diffusion prior's UNet forward, textual-inversion and score-distillation step times with seeded
//! random weights; plus the process's CPU time and peak memory.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::SdsConfig;
use crate::error::{Error, Result};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::dinov2::Dinov2;
use crate::models::random::random_varbuilder;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::shape::sds::{score_distillation, DiffusionModels, GuidanceKind, NoiseSchedule};

/// `congeal bench-store`: stores `frames` frames of `size` x `size` pixels (with mask and K) into a
/// temporary [`CollectionStore`](crate::ingest::store::CollectionStore), and reports the mean and the
/// slowest milliseconds per frame in each tenth of the run, then the time to reopen the store.
pub fn bench_store(frames: usize, size: u32, report: &mut dyn FnMut(&str)) -> Result<()> {
    if frames < 10 || size == 0 {
        return Err(Error::InvalidInput("--frames must be at least 10 and --size at least 1".into()));
    }
    let dir = std::env::temp_dir().join(format!("congeal-bench-store-{}", std::process::id()));
    let result = store_frames(&dir, frames, size, report);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn store_frames(dir: &Path, frames: usize, size: u32, report: &mut dyn FnMut(&str)) -> Result<()> {
    let mut store = crate::ingest::store::CollectionStore::open(dir, "bench")?;
    let rgb = image::RgbImage::from_fn(size, size, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
    let mask = image::GrayImage::from_fn(size, size, |x, y| image::Luma([if x > size / 4 && y > size / 4 { 255 } else { 0 }]));
    let k = crate::geometry::Intrinsics::from_fov_y(50.0, size, size)?;
    let tenth = frames / 10;
    let mut times = Vec::with_capacity(tenth);
    for i in 0..frames {
        let t = std::time::Instant::now();
        store.append(&rgb, Some(&mask), Some(&k), (i as i32, 0), "camera")?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if times.len() == tenth {
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            let max = times.iter().cloned().fold(0.0, f64::max);
            report(&format!("frames {:5}-{:5}: {mean:.2} ms per frame (slowest {max:.1} ms)", i + 1 - tenth, i));
            times.clear();
        }
    }
    drop(store);
    let t = std::time::Instant::now();
    let store = crate::ingest::store::CollectionStore::open(dir, "bench")?;
    report(&format!("reopened {} frames in {:.1} ms", store.len(), t.elapsed().as_secs_f64() * 1e3));
    Ok(())
}

/// `congeal bench-features`: times DINOv2 `patch_features` (block `layer`, default the last) on
/// `batch` random images at each of `sizes`, `reps` times after one warm-up; each finding goes to
/// `report` as a line.
pub fn bench_features(
    weights: &Path,
    sizes: &[usize],
    batch: usize,
    reps: usize,
    layer: Option<usize>,
    device: &Device,
    report: &mut dyn FnMut(&str),
) -> Result<()> {
    if batch == 0 || reps == 0 {
        return Err(Error::InvalidInput("--batch and --reps must be at least 1".into()));
    }
    let t = std::time::Instant::now();
    let model = Dinov2::load(weights, device)?;
    let c = model.config();
    report(&format!(
        "dinov2 {}: hidden {}, {} blocks, {} heads, {} MLP; loaded in {:.2} s; {} threads",
        weights.display(),
        c.hidden_size,
        c.num_layers,
        c.num_heads,
        if c.swiglu { "SwiGLU" } else { "GELU" },
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    ));
    for &size in sizes {
        let images = Tensor::rand(0f32, 1f32, (batch, 3, size, size), device)?;
        let mut times = Vec::with_capacity(reps);
        let mut dims = Vec::new();
        let mut cpu0 = None;
        for rep in 0..=reps {
            let t = std::time::Instant::now();
            let feats = model.patch_features(&images, layer)?;
            device.synchronize()?;
            if rep > 0 {
                times.push(t.elapsed().as_secs_f64() / batch as f64);
            } else {
                cpu0 = process_cpu_s();
            }
            dims = feats.dims().to_vec();
        }
        let cpu = match (cpu0, process_cpu_s()) {
            (Some(a), Some(b)) => format!(", {:.3} CPU s/image", (b - a) / (reps * batch) as f64),
            _ => String::new(),
        };
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        report(&format!(
            "dinov2 {size}x{size} batch {batch}: {mean:.3} s/image (min {min:.3}, {reps} reps after 1 warm-up{cpu}), features {dims:?}"
        ));
    }
    match peak_rss_mib() {
        Some(m) => report(&format!("peak RSS {m:.0} MiB")),
        None => report("peak RSS unknown"),
    }
    Ok(())
}

/// CPU time (user + system, all threads) of this process so far, seconds (Linux, 100 Hz ticks).
pub fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `congeal bench-sds`: timings of the diffusion prior with seeded random weights for each of
/// `models` (`tiny`, `sd21`, `mvdream`): UNet forward, one textual-inversion step and (for `tiny`, or
/// all with `sds_full`) one score-distillation step; each finding goes to `report` as a line.
pub fn bench_sds(
    models: &[String],
    latent: usize,
    reps: usize,
    sds_full: bool,
    render: u32,
    device: &Device,
    report: &mut dyn FnMut(&str),
) -> Result<()> {
    if reps == 0 || latent < 8 {
        return Err(Error::InvalidInput("--reps >= 1 and --latent >= 8".into()));
    }
    let dtype = if device.is_cpu() { DType::F32 } else { DType::F16 };
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        device.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            f()?;
        }
        device.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    };
    report(&format!("device {device:?}, dtype {dtype:?}, {} threads, latent {latent}x{latent}", rayon::current_num_threads()));
    for name in models {
        let (text_cfg, unet_cfg, views) = match name.as_str() {
            "tiny" => {
                let t = ClipTextConfig::tiny();
                let mut u = UNetConfig::tiny();
                u.cross_attention_dim = t.hidden_size;
                u.camera_dim = Some(16);
                (t, u, 4)
            }
            "sd21" => (ClipTextConfig::sd21(), UNetConfig::sd21_base(), 1),
            "mvdream" => (ClipTextConfig::sd21(), UNetConfig::mvdream_sd21(), 4),
            other => return Err(Error::InvalidInput(format!("unknown model size {other:?} (tiny, sd21, mvdream)"))),
        };
        let t0 = std::time::Instant::now();
        let text = ClipTextModel::from_varbuilder(&text_cfg, random_varbuilder(1, dtype, device))?;
        let unet = UNet::from_varbuilder(&unet_cfg, random_varbuilder(2, dtype, device))?;
        report(&format!("{name}: random weights built in {:.1} s", t0.elapsed().as_secs_f64()));
        let ids =
            Tensor::from_vec((0..77u32).map(|i| (i * 7) % text_cfg.vocab_size as u32).collect::<Vec<_>>(), (1, 77), device)?;
        let cond = text.forward(&ids, 0)?.detach();
        let b = views;
        let sample = Tensor::randn(0f32, 1.0, (b, 4, latent, latent), device)?.to_dtype(dtype)?;
        let t = Tensor::full(500f32, b, device)?.to_dtype(dtype)?;
        let ehs = cond.broadcast_as((b, 77, text_cfg.hidden_size))?.contiguous()?;
        let cams = if unet_cfg.camera_dim.is_some() { Some(Tensor::zeros((b, 16), dtype, device)?) } else { None };
        let fwd = time(&mut || {
            unet.forward(&sample, &t, &ehs, cams.as_ref(), b)?;
            Ok(())
        })?;
        report(&format!("{name}: UNet forward, batch {b}: {fwd:.3} s ({:.3} s per image)", fwd / b as f64));
        // One textual-inversion step: two placeholder rows, text encoder + UNet forward and backward.
        let base = text.embed_tokens(&ids)?.detach();
        let rows = Var::from_tensor(&base.narrow(1, 4, 2)?.squeeze(0)?)?;
        let one = sample.narrow(0, 0, 1)?;
        let t1 = t.narrow(0, 0, 1)?;
        let step = time(&mut || {
            let emb = Tensor::cat(&[&base.narrow(1, 0, 4)?, &rows.as_tensor().unsqueeze(0)?, &base.narrow(1, 6, 71)?], 1)?;
            let c = text.forward_embeddings(&emb, 0)?;
            let pred = unet.forward(&one, &t1, &c, None, 1)?;
            let loss = pred.to_dtype(DType::F32)?.sqr()?.mean_all()?;
            let g = loss.backward()?;
            if g.get(rows.as_tensor()).is_none() {
                return Err(Error::Numerical("no gradient reached the placeholder rows".into()));
            }
            Ok(())
        })?;
        report(&format!("{name}: textual-inversion step (batch 1): {step:.3} s"));
        if name == "tiny" || sds_full {
            let kind = if unet_cfg.camera_dim.is_some() { GuidanceKind::Mvdream } else { GuidanceKind::StableDiffusion };
            let step = SdsStep { latent, reps, render, views, dtype, device };
            step.run(name, kind, text, unet, text_cfg.vocab_size, report)?;
        }
    }
    Ok(())
}

/// The settings of one timed score-distillation step of [`bench_sds`].
struct SdsStep<'a> {
    latent: usize,
    reps: usize,
    render: u32,
    views: usize,
    dtype: DType,
    device: &'a Device,
}

impl SdsStep<'_> {
    /// Times `reps` score-distillation steps of model `name` (`tiny`: config/tiny.yaml's random
    /// models; otherwise `text` and `unet` with a random SD 2.1 VAE) and reports the mean.
    fn run(
        &self,
        name: &str,
        kind: GuidanceKind,
        text: ClipTextModel,
        unet: UNet,
        vocab_size: usize,
        report: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let SdsStep { latent, reps, render, views, dtype, device } = *self;
        let models = if name == "tiny" {
            DiffusionModels::random_tiny(0, kind, dtype, device)?
        } else {
            DiffusionModels {
                tokenizer: ClipTokenizer::hashed(vocab_size, 77)?,
                text,
                text_skip_layers: 0,
                unet,
                vae: Vae::from_varbuilder(&VaeConfig::sd21(), random_varbuilder(3, dtype, device))?,
                kind,
                schedule: NoiseSchedule::stable_diffusion(),
                source: "random".into(),
            }
        };
        let mut cfg = SdsConfig {
            iterations: reps,
            low_res: render,
            high_res: render,
            views,
            guidance_resolution: (latent * 8) as u32,
            ..Default::default()
        };
        if name == "tiny" {
            cfg.guidance_resolution = (latent * 2) as u32;
            cfg.grid = 24;
        }
        let cond = models.encode_prompt("a photo of sks object")?.detach();
        let uncond = models.encode_prompt("")?.detach();
        let t0 = std::time::Instant::now();
        score_distillation(&models, &cond, &uncond, &cfg, device, &|_| {})?;
        device.synchronize()?;
        report(&format!(
            "{name}: score-distillation step ({views} views, {render} px renders, {} px to the VAE, grid {}^3): {:.3} s",
            cfg.guidance_resolution,
            cfg.grid,
            t0.elapsed().as_secs_f64() / reps as f64
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_sds_reports_every_step_of_the_tiny_models() {
        let mut lines = Vec::new();
        bench_sds(&["tiny".to_string()], 8, 1, false, 16, &Device::Cpu, &mut |l| lines.push(l.to_string())).unwrap();
        for what in ["UNet forward", "textual-inversion step", "score-distillation step"] {
            assert!(lines.iter().any(|l| l.starts_with("tiny: ") && l.contains(what)), "{what} missing from {lines:?}");
        }
        let err = bench_sds(&["huge".to_string()], 8, 1, false, 16, &Device::Cpu, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("unknown model size"), "{err}");
    }
}
