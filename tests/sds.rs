//! Shape source `sds` (paper stages 1-2) with seeded random tiny models: gradients of textual
//! inversion and of score distillation against finite differences, what textual inversion may change,
//! and `congeal run --shape sds` end to end (config/tiny.yaml), plus its errors.

mod common;

use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use congeal::collection::Collection;
use congeal::config::SdsConfig;
use congeal::shape::sds::{
    masked_square_crops, render_latents, textual_inversion, DiffusionModels, GuidanceKind, PlaceholderPrompt, SdsField, SdsViews,
};

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Textual inversion's loss as a function of the placeholder rows: the diffusion training loss through
/// the UNet's cross-attention and the text encoder (Eq. 5), in f64.
#[test]
fn textual_inversion_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let models = DiffusionModels::random_tiny(3, GuidanceKind::StableDiffusion, DType::F64, &dev).unwrap();
    let words = vec!["sks".to_string(), "object".to_string()];
    let prompt = PlaceholderPrompt::new(&models, "a photo of sks object", &words).unwrap();
    assert_eq!(prompt.positions.len(), 2, "{:?}", prompt.positions);
    let rows0 = prompt.initial_rows().unwrap();
    let latents = Tensor::randn(0f64, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let noise = Tensor::randn(0f64, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let ts = [120usize, 700];
    let noisy = models.schedule.add_noise(&latents, &noise, &ts).unwrap();
    let t = Tensor::new(&[120f64, 700.0], &dev).unwrap();
    let loss = |rows: &Tensor| -> Tensor {
        let cond = models.text.forward_embeddings(&prompt.embeddings(rows).unwrap(), 0).unwrap();
        let cond = cond.broadcast_as((2, cond.dim(1).unwrap(), cond.dim(2).unwrap())).unwrap();
        let pred = models.unet.forward(&noisy, &t, &cond, None, 1).unwrap();
        (pred - &noise).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let var = Var::from_tensor(&rows0).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient reaches the placeholder rows").to_vec2::<f64>().unwrap();
    let base = rows0.to_vec2::<f64>().unwrap();
    let mut worst = 0f64;
    let mut checked = 0;
    for r in 0..base.len() {
        for c in [0usize, 5, 11, 17, 30] {
            let h = 1e-5;
            let mut plus = base.clone();
            plus[r][c] += h;
            let mut minus = base.clone();
            minus[r][c] -= h;
            let fd = (scalar(&loss(&Tensor::new(plus, &dev).unwrap())) - scalar(&loss(&Tensor::new(minus, &dev).unwrap())))
                / (2.0 * h);
            let rel = (fd - g[r][c]).abs() / (fd.abs().max(g[r][c].abs()).max(1e-8));
            worst = worst.max(rel);
            checked += 1;
            assert!(rel < 1e-3, "row {r} col {c}: fd {fd:e} vs autograd {:e}", g[r][c]);
        }
    }
    let norm: f64 = g.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    assert!(norm > 1e-8, "gradient vanished: {norm}");
    println!("textual inversion: {checked} coordinates, worst relative error {worst:.2e}, |grad| {norm:.3e}");
}

/// The score-distillation loss against a fixed target, through the VAE encoder and the volume renderer
/// to the field's density and colour grids, with the sparsity regulariser.
#[test]
fn score_distillation_gradient_reaches_the_field() {
    let dev = Device::Cpu;
    let models = DiffusionModels::random_tiny(5, GuidanceKind::Mvdream, DType::F32, &dev).unwrap();
    let cfg = SdsConfig { grid: 10, ..SdsConfig::default() };
    let field = SdsField::new(&cfg, &dev).unwrap();
    // Some structure in the raw grids so that colour and density both matter.
    let n = 10 * 10 * 10;
    field.raw_density.set(&Tensor::randn(0f32, 1.0, (n, 1), &dev).unwrap()).unwrap();
    field.raw_colour.set(&Tensor::randn(0f32, 1.0, (n, 3), &dev).unwrap()).unwrap();
    let views = SdsViews::new(4, 12, 30.0, 15.0, 40.0, 0.9, &dev).unwrap();
    let bg = [0.3f32, 0.6, 0.9];
    let (lat0, _) = render_latents(&models, &field.field().unwrap(), &views, &bg, 16, 16, false).unwrap();
    let target = Tensor::randn(0f32, 1.0, lat0.dims(), &dev).unwrap().to_dtype(DType::F64).unwrap();
    // The latent loss plus the sparsity regulariser. (The orientation penalty detaches the rendering
    // weights by design, so it has no finite-difference counterpart; its normals are checked below.)
    let loss = |field: &SdsField| -> Tensor {
        let (lat, stats) = render_latents(&models, &field.field().unwrap(), &views, &bg, 16, 16, false).unwrap();
        let latent = (lat.to_dtype(DType::F64).unwrap() - &target).unwrap().sqr().unwrap().sum_all().unwrap() * 0.5;
        let sparse = stats.mean_opacity.to_dtype(DType::F64).unwrap() * 20.0;
        (latent.unwrap() + sparse.unwrap()).unwrap()
    };
    let grads = loss(&field).backward().unwrap();
    for (name, var) in [("density", &field.raw_density), ("colour", &field.raw_colour)] {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The coordinates with the largest gradients (the others are mostly hidden or outside the views).
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let mut worst = 0f64;
        for &i in order.iter().take(4) {
            let h = 2e-2f32;
            let eval = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &dev).unwrap()).unwrap();
                scalar(&loss(&field))
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            var.set(&Tensor::from_vec(base.clone(), var.as_tensor().dims(), &dev).unwrap()).unwrap();
            let rel = (fd - g[i] as f64).abs() / fd.abs().max(g[i].abs() as f64);
            worst = worst.max(rel);
            assert!(rel < 3e-2, "{name}[{i}]: fd {fd:e} vs autograd {:e}", g[i]);
        }
        println!("score distillation, {name}: worst relative error {worst:.2e} (largest |grad| {:.3e})", g[order[0]].abs());
    }
}

/// The density normals behind the orientation regulariser are differentiable in the density.
#[test]
fn density_normal_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let cfg = SdsConfig { grid: 6, blob_density: 0.0, ..SdsConfig::default() };
    let field = SdsField::new(&cfg, &dev).unwrap();
    // Fixed pseudo-random values (candle cannot seed its CPU rng): the check sees the same field every run.
    field.raw_density.set(&Tensor::from_vec(pseudo_normal(216, 1, 2.0), (216, 1), &dev).unwrap()).unwrap();
    let probe = Tensor::from_vec(pseudo_normal(216 * 3, 2, 1.0), (216, 3), &dev).unwrap().to_dtype(DType::F64).unwrap();
    let loss = |f: &SdsField| -> Tensor {
        let n = congeal::field::render::density_normals(&f.field().unwrap()).unwrap();
        (n.to_dtype(DType::F64).unwrap() * &probe).unwrap().sum_all().unwrap()
    };
    let g = loss(&field)
        .backward()
        .unwrap()
        .get(field.raw_density.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let base = field.raw_density.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    for &i in order.iter().take(6) {
        let h = 1e-2f32;
        let eval = |delta: f32| {
            let mut v = base.clone();
            v[i] += delta;
            field.raw_density.set(&Tensor::from_vec(v, (216, 1), &dev).unwrap()).unwrap();
            scalar(&loss(&field))
        };
        // Central differences at h and h/2, Richardson-extrapolated: the normals curve strongly where
        // the density gradient is small, and the plain O(h^2) error reached several percent there.
        let central = |h: f32| (eval(h) - eval(-h)) / (2.0 * h as f64);
        let fd = (4.0 * central(h / 2.0) - central(h)) / 3.0;
        let rel = (fd - g[i] as f64).abs() / fd.abs().max(g[i].abs() as f64);
        assert!(rel < 2e-2, "normals d/d raw[{i}]: fd {fd:e} vs autograd {:e}", g[i]);
    }
}

/// `n` values of a fixed pseudo-random normal sequence (LCG + Box-Muller) times `scale`.
fn pseudo_normal(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32 * scale).collect()
}

fn demo_crops(dev: &Device, size: u32) -> Tensor {
    let demo = Collection::load(&common::demo_collection()).unwrap();
    let images: Vec<_> = (0..3).map(|i| demo.load_image(i).unwrap()).collect();
    let pairs: Vec<_> = images.iter().map(|im| (&im.rgb, &im.mask)).collect();
    masked_square_crops(&pairs, size, dev).unwrap()
}

#[test]
fn textual_inversion_changes_only_the_placeholder_rows_and_saves_them() {
    let dev = Device::Cpu;
    let models = DiffusionModels::random_tiny(1, GuidanceKind::Mvdream, DType::F32, &dev).unwrap();
    let crops = demo_crops(&dev, 32);
    assert_eq!(crops.dims(), &[3, 3, 32, 32]);
    let (lo, hi) = (scalar(&crops.min_all().unwrap()), scalar(&crops.max_all().unwrap()));
    assert!(lo >= -1.0 && hi <= 1.0 && hi > lo, "crops in [-1, 1]: {lo}..{hi}");
    let cfg = SdsConfig { ti_iterations: 6, ti_batch: 2, ..SdsConfig::default() };
    let ti = textual_inversion(&models, &crops, &cfg, &|_| {}).unwrap();
    let prompt = PlaceholderPrompt::new(&models, &cfg.prompt, &cfg.placeholder_words).unwrap();
    let before = prompt.initial_rows().unwrap();
    let moved = scalar(&(ti.rows.clone() - &before).unwrap().abs().unwrap().max_all().unwrap());
    assert!(moved > 1e-3, "placeholder rows did not move ({moved})");
    assert!(ti.loss_curve.iter().all(|l| l.is_finite()) && !ti.loss_curve.is_empty());
    // The substituted embeddings equal the prompt's own everywhere but at the placeholder positions.
    let sub = prompt.embeddings(&ti.rows).unwrap().squeeze(0).unwrap();
    let orig = prompt.embeddings(&before).unwrap().squeeze(0).unwrap();
    let diff = (sub - orig).unwrap().abs().unwrap().max_keepdim(1).unwrap().squeeze(1).unwrap().to_vec1::<f32>().unwrap();
    for (p, d) in diff.iter().enumerate() {
        assert_eq!(*d > 0.0, prompt.positions.contains(&p), "position {p}: change {d}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ti.safetensors");
    ti.save(&path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &dev).unwrap();
    let rows = loaded.get("embeddings").unwrap();
    assert_eq!(scalar(&(rows - &ti.rows).unwrap().abs().unwrap().max_all().unwrap()), 0.0);
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes[..200.min(bytes.len())]).to_string();
    assert!(text.contains("a photo of sks object"), "{text}");
}

fn congeal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_congeal"))
}

/// `congeal run --shape sds` with config/tiny.yaml: stages 1-2 with random tiny models, then every later
/// stage, without NaN (mechanics, not quality).
#[test]
fn tiny_sds_run_end_to_end() {
    let out = tempfile::tempdir().unwrap();
    let demo = common::demo_collection();
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tiny.yaml");
    let run = congeal()
        .args(["run", demo.to_str().unwrap(), "--out", out.path().to_str().unwrap(), "--config", tiny, "--shape", "sds"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("result.json")).unwrap()).unwrap();
    assert_eq!(result["shape_source"], "sds");
    let images = result["images"].as_array().unwrap();
    assert_eq!(images.len(), 8);
    for im in images {
        let m: Vec<f64> = im["camera_from_object"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        assert!(m.iter().all(|v| v.is_finite()), "{m:?}");
        assert!(im["fov_deg"].as_f64().unwrap().is_finite());
    }
    for key in ["textual_inversion", "score_distillation"] {
        assert!(result["timings_s"][key].as_f64().is_some(), "timings lack {key}");
    }
    let ply = std::fs::read(out.path().join("canonical.ply")).unwrap();
    assert!(ply.len() > 200, "canonical mesh is empty");
    assert!(out.path().join("sds/textual_inversion.safetensors").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("sds/sds.json")).unwrap()).unwrap();
    for curve in ["ti_loss_curve", "sds_loss_curve"] {
        let c = report[curve].as_array().unwrap();
        assert!(!c.is_empty() && c.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)), "{curve}: {c:?}");
    }
    assert_eq!(report["guidance"], "Mvdream");
}

#[test]
fn sds_without_weights_names_what_is_missing() {
    let out = tempfile::tempdir().unwrap();
    let demo = common::demo_collection();
    let fast = concat!(env!("CARGO_MANIFEST_DIR"), "/config/fast.yaml");
    let no_weights = congeal()
        .args(["run", demo.to_str().unwrap(), "--out", out.path().to_str().unwrap(), "--config", fast, "--shape", "sds"])
        .output()
        .unwrap();
    assert!(!no_weights.status.success());
    let err = String::from_utf8_lossy(&no_weights.stderr);
    assert!(err.contains("--weights-dir"), "{err}");
    let missing = congeal()
        .args([
            "run",
            demo.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--config",
            fast,
            "--shape",
            "sds",
            "--weights-dir",
            "/nonexistent/sd21",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("/nonexistent/sd21") && err.contains("diffusers layout"), "{err}");
}
