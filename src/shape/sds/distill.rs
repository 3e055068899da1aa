//! Score distillation (Eq. 2-4) and the whole `sds` source (textual inversion, then distillation).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use image::{GrayImage, RgbImage};
use serde::Serialize;
use tracing::info;

use super::*;
use crate::config::SdsConfig;
use crate::error::{Error, Result};
use crate::shape::CanonicalShape;

/// What score distillation did, for the run's record.
#[derive(Clone, Debug, Serialize)]
pub struct SdsReport {
    /// Where the models came from.
    pub models: String,
    /// MVDream or SD 2.1.
    pub guidance: GuidanceKind,
    /// Textual inversion loss per tenth of its run.
    pub ti_loss_curve: Vec<f64>,
    /// SDS loss per tenth of its run.
    pub sds_loss_curve: Vec<f64>,
    /// Seconds in textual inversion.
    pub ti_seconds: f64,
    /// Seconds in score distillation.
    pub sds_seconds: f64,
}

/// Score distillation (Eq. 2-4, lambda = 0): optimises an [`SdsField`] under the frozen prior
/// conditioned on `cond` (y*, `[1, L, C]`) against `uncond` (`[1, L, C]`).
pub fn score_distillation(
    models: &DiffusionModels,
    cond: &Tensor,
    uncond: &Tensor,
    cfg: &SdsConfig,
    device: &Device,
    progress: &dyn Fn(f32),
) -> Result<(SdsField, Vec<f64>)> {
    let dtype = models.dtype();
    let field = SdsField::new(cfg, device)?;
    let mut opt = AdamW::new(
        vec![field.raw_density.clone(), field.raw_colour.clone()],
        ParamsAdamW { lr: cfg.grid_lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let v = cfg.views;
    let multiview = models.kind == GuidanceKind::Mvdream;
    let (l, c) = (cond.dim(1)?, cond.dim(2)?);
    let ehs = Tensor::cat(&[uncond.broadcast_as((v, l, c))?, cond.broadcast_as((v, l, c))?], 0)?.to_dtype(dtype)?.detach();
    let mut rng = Stream::new(cfg.seed ^ 0x5d5);
    let mut losses = Vec::new();
    let mut curve = Vec::new();
    let chunk = (cfg.iterations / 10).max(1);
    for step in 0..cfg.iterations {
        let frac = (step as f64 / cfg.anneal_steps.max(1) as f64).min(1.0);
        let lo = cfg.t_start[0] + (cfg.t_end[0] - cfg.t_start[0]) * frac;
        let hi = cfg.t_start[1] + (cfg.t_end[1] - cfg.t_start[1]) * frac;
        let t = ((rng.range([lo, hi]) * TRAIN_TIMESTEPS as f64) as usize).clamp(1, TRAIN_TIMESTEPS - 1);
        let res = if step >= cfg.high_res_from { cfg.high_res } else { cfg.low_res };
        let views = sample_views(cfg, res, &mut rng, device)?;
        let background =
            if cfg.random_background { [rng.uniform() as f32, rng.uniform() as f32, rng.uniform() as f32] } else { [1.0; 3] };
        let f = field.field()?;
        let (latents, stats) = render_latents(
            models,
            &f,
            &views,
            &background,
            cfg.samples_per_ray,
            cfg.guidance_resolution,
            cfg.orientation_weight > 0.0,
        )?;
        let noise = rng.normal(latents.dims(), device, dtype)?;
        let ts = vec![t; v];
        let noisy = models.schedule.add_noise(&latents.detach(), &noise, &ts)?;
        let t2 = Tensor::full(t as f32, 2 * v, device)?.to_dtype(dtype)?;
        let cams = if multiview { Some(Tensor::cat(&[&views.mv_cameras, &views.mv_cameras], 0)?.to_dtype(dtype)?) } else { None };
        let eps = models
            .unet
            .forward(&Tensor::cat(&[&noisy, &noisy], 0)?, &t2, &ehs, cams.as_ref(), if multiview { v } else { 1 })?
            .detach();
        let eps_u = eps.narrow(0, 0, v)?;
        let eps_c = eps.narrow(0, v, v)?;
        let eps_cfg = (&eps_u + ((&eps_c - &eps_u)? * cfg.guidance_scale)?)?;
        let mut target = models.schedule.predict_x0(&noisy, &eps_cfg, &ts)?;
        if cfg.recon_std_rescale > 0.0 {
            let nocfg = models.schedule.predict_x0(&noisy, &eps_c, &ts)?;
            let std = |x: &Tensor| -> Result<f64> {
                let x = x.to_dtype(DType::F64)?;
                let m = x.mean_all()?.to_scalar::<f64>()?;
                Ok((x - m)?.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt())
            };
            // One object per step, so one factor for its views (MVDream reshapes by object).
            let factor = (std(&nocfg)? + 1e-8) / (std(&target)? + 1e-8);
            let adjusted = (&target * factor)?;
            target = ((adjusted * cfg.recon_std_rescale)? + (target * (1.0 - cfg.recon_std_rescale))?)?;
        }
        let diff = (latents.to_dtype(DType::F32)? - target.detach().to_dtype(DType::F32)?)?;
        let mut loss = (diff.sqr()?.sum_all()? * (0.5 / v as f64))?;
        if cfg.sparsity_weight > 0.0 {
            loss = (loss + (stats.mean_opacity.to_dtype(DType::F32)? * cfg.sparsity_weight)?)?;
        }
        if let Some(o) = &stats.orientation {
            loss = (loss + (o.to_dtype(DType::F32)? * cfg.orientation_weight)?)?;
        }
        let lv = check_finite(&loss, &format!("score distillation loss at step {step}"))?;
        opt.backward_step(&loss)?;
        losses.push(lv);
        if losses.len() == chunk || step + 1 == cfg.iterations {
            curve.push(losses.iter().sum::<f64>() / losses.len() as f64);
            losses.clear();
        }
        progress((step + 1) as f32 / cfg.iterations.max(1) as f32);
    }
    Ok((field, curve))
}

/// Stages 1-2 end to end: textual inversion on the masked inputs, then score distillation; writes
/// `textual_inversion.safetensors` and `sds.json` into `out_dir` when given.
pub fn build_sds_shape(
    images: &[(&RgbImage, &GrayImage)],
    cfg: &SdsConfig,
    weights_dir: Option<&Path>,
    device: &Device,
    out_dir: Option<&Path>,
    progress: &dyn Fn(&str, f32),
) -> Result<(CanonicalShape, SdsReport)> {
    cfg.validate()?;
    let models = DiffusionModels::for_config(cfg, weights_dir, device)?;
    info!("sds: {:?} guidance from {}", models.kind, models.source);
    let t = Instant::now();
    let crops = masked_square_crops(images, cfg.ti_resolution, device)?;
    let ti = textual_inversion(&models, &crops, cfg, &|f| progress("textual_inversion", f))?;
    let ti_seconds = t.elapsed().as_secs_f64();
    info!("textual inversion: {} steps in {ti_seconds:.1}s, loss {:?}", cfg.ti_iterations, ti.loss_curve);
    let t = Instant::now();
    let prompt = PlaceholderPrompt::new(&models, &cfg.prompt, &cfg.placeholder_words)?;
    let cond = models
        .text
        .forward_embeddings(&prompt.embeddings(&ti.rows.to_dtype(models.dtype())?)?, models.text_skip_layers)?
        .detach();
    let uncond = models.encode_prompt(&cfg.negative_prompt)?.detach();
    let (field, sds_curve) = score_distillation(&models, &cond, &uncond, cfg, device, &|f| progress("score_distillation", f))?;
    let sds_seconds = t.elapsed().as_secs_f64();
    info!("score distillation: {} steps in {sds_seconds:.1}s, loss {:?}", cfg.iterations, sds_curve);
    let shape = field.freeze()?;
    let report = SdsReport {
        models: models.source.clone(),
        guidance: models.kind,
        ti_loss_curve: ti.loss_curve.clone(),
        sds_loss_curve: sds_curve,
        ti_seconds,
        sds_seconds,
    };
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        ti.save(&dir.join("textual_inversion.safetensors"))?;
        let json = serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let path = dir.join("sds.json");
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
    }
    Ok((shape, report))
}
