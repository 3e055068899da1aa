//! The Stable Diffusion VAE in candle against diffusers `AutoencoderKL` on a tiny random configuration
//! (fixtures committed in tests/fixtures/, written by scripts/weights/make_tiny_vae_fixture.py):
//! encode (mean, logvar) and decode parity (max |diff| <= 1e-4 in f32, <= 1e-5 in f64), legacy
//! attention names, gradients of the encoder against central finite differences (input pixels and a
//! weight, relative error < 1e-3), errors for bad weight files and bad inputs, and the SD 2.1 layout.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::{fixture, load_tensors, max_abs_diff};
use congeal::models::vae::{Vae, VaeConfig};
use congeal::Error;

fn weights_path() -> PathBuf {
    fixture("vae_tiny.safetensors")
}

fn outputs() -> HashMap<String, Tensor> {
    load_tensors(&fixture("vae_tiny_outputs.safetensors"))
}

fn tiny_cfg() -> VaeConfig {
    VaeConfig::from_file(&weights_path()).expect("fixture config")
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn config_is_inferred_from_the_fixture_header() {
    let cfg = tiny_cfg();
    assert_eq!(
        cfg,
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            scaling_factor: 0.18215,
        }
    );
    assert_eq!(cfg.downsampling_factor(), 2);
    assert_eq!(VaeConfig::sd21().downsampling_factor(), 8);
}

fn parity(dtype: DType, tol: f64) {
    let fx = outputs();
    let vae = Vae::load(&weights_path(), &tiny_cfg(), dtype, &Device::Cpu).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    assert_eq!(vae.config().block_out_channels, vec![8, 16]);
    let (mean, logvar) = vae.encode(&fx["images"]).unwrap();
    assert_eq!(mean.dims(), &[2, 4, 8, 8]);
    assert_eq!(mean.dtype(), dtype);
    let decoded = vae.decode(&fx["latents"]).unwrap();
    assert_eq!(decoded.dims(), &[2, 3, 16, 16]);
    let dm = max_abs_diff(&mean, &fx["mean"]);
    let dl = max_abs_diff(&logvar, &fx["logvar"]);
    let dd = max_abs_diff(&decoded, &fx["decoded"]);
    println!(
        "vae tiny {dtype:?} vs diffusers: max |diff| mean {dm:.2e} (max |ref| {:.2}), logvar {dl:.2e} (max |ref| {:.2}), \
         decode {dd:.2e} (max |ref| {:.2}); tolerance {tol:.0e}",
        max_abs(&fx["mean"]),
        max_abs(&fx["logvar"]),
        max_abs(&fx["decoded"])
    );
    assert!(dm <= tol && dl <= tol && dd <= tol, "parity {dtype:?}: mean {dm}, logvar {dl}, decode {dd} > {tol}");
}

#[test]
fn encode_and_decode_match_diffusers_f32() {
    parity(DType::F32, 1e-4);
}

#[test]
fn encode_and_decode_match_diffusers_f64() {
    parity(DType::F64, 1e-5);
}

/// The fixture's tensors, renamed by `rename`, written to a temporary file.
fn rewritten(dir: &Path, rename: impl Fn(&str, Tensor) -> Option<(String, Tensor)>) -> PathBuf {
    let ts = candle_core::safetensors::load(weights_path(), &Device::Cpu).unwrap();
    let out: HashMap<String, Tensor> = ts.into_iter().filter_map(|(k, v)| rename(&k, v)).collect();
    let path = dir.join("vae.safetensors");
    candle_core::safetensors::save(&out, &path).unwrap();
    path
}

#[test]
fn legacy_attention_names_load_and_match() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = rewritten(dir.path(), |k, v| {
        let k = k
            .replace("attentions.0.to_q.", "attentions.0.query.")
            .replace("attentions.0.to_k.", "attentions.0.key.")
            .replace("attentions.0.to_v.", "attentions.0.value.")
            .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
        Some((k, v))
    });
    let fx = outputs();
    let vae = Vae::load(&legacy, &tiny_cfg(), DType::F32, &Device::Cpu).unwrap();
    let (mean, _) = vae.encode(&fx["images"]).unwrap();
    let decoded = vae.decode(&fx["latents"]).unwrap();
    let (dm, dd) = (max_abs_diff(&mean, &fx["mean"]), max_abs_diff(&decoded, &fx["decoded"]));
    println!("vae legacy attention names: max |diff| mean {dm:.2e}, decode {dd:.2e}");
    assert!(dm <= 1e-4 && dd <= 1e-4);
}

/// The fixture's weights in f64, each wrapped in a [`Var`].
fn weight_vars() -> HashMap<String, Var> {
    candle_core::safetensors::load(weights_path(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap()))
        .collect()
}

fn build(weights: &HashMap<String, Tensor>) -> Vae {
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F64, &Device::Cpu);
    Vae::from_varbuilder(&tiny_cfg(), vb).unwrap()
}

/// A fixed probe with the shape of the latent mean `[2, 4, 8, 8]`.
fn probe() -> Tensor {
    let v: Vec<f64> = (0..2 * 4 * 8 * 8).map(|i| (0.37 * i as f64).cos() + 0.2).collect();
    Tensor::from_vec(v, (2, 4, 8, 8), &Device::Cpu).unwrap()
}

fn loss(vae: &Vae, images: &Tensor, probe: &Tensor) -> Tensor {
    let (mean, logvar) = vae.encode(images).unwrap();
    ((mean * probe).unwrap().sum_all().unwrap() + (logvar * 0.3).unwrap().sum_all().unwrap()).unwrap()
}

fn relative_error(fd: f64, g: f64) -> f64 {
    (fd - g).abs() / fd.abs().max(g.abs()).max(1e-6)
}

#[test]
fn encoder_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let vars = weight_vars();
    let weights: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let vae = build(&weights);
    let images0 = outputs()["images"].to_dtype(DType::F64).unwrap();
    let image_var = Var::from_tensor(&images0).unwrap();
    let probe = probe();
    let grads = loss(&vae, image_var.as_tensor(), &probe).backward().unwrap();

    // Input pixels, including corners (the bottom/right ones go through the downsampler's padding).
    let gimg = grads.get(image_var.as_tensor()).expect("gradient reaches the input images");
    assert!(max_abs(gimg) > 0.0);
    let base: Vec<f64> = images0.flatten_all().unwrap().to_vec1().unwrap();
    let gflat: Vec<f64> = gimg.flatten_all().unwrap().to_vec1().unwrap();
    let idx = |b: usize, c: usize, y: usize, x: usize| ((b * 3 + c) * 16 + y) * 16 + x;
    let pixels = [(0, 0, 0, 0), (0, 1, 7, 9), (0, 2, 15, 15), (1, 0, 15, 0), (1, 1, 3, 12), (1, 2, 10, 5), (0, 0, 0, 15)];
    let h = 1e-5;
    let mut worst = 0f64;
    for &(b, c, y, x) in &pixels {
        let i = idx(b, c, y, x);
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let t = Tensor::from_vec(v, (2, 3, 16, 16), &dev).unwrap();
            loss(&vae, &t, &probe).to_scalar::<f64>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let rel = relative_error(fd, gflat[i]);
        println!(
            "vae d loss / d pixel[{b},{c},{y},{x}]: autograd {:.9e}, central difference {fd:.9e}, relative error {rel:.2e}",
            gflat[i]
        );
        worst = worst.max(rel);
    }
    println!("vae pixel gradients: worst relative error {worst:.2e} over {} pixels", pixels.len());
    assert!(worst < 1e-3, "pixel gradient relative error {worst}");

    // Weights: the gradient reaches every part of the encoder, and one weight matches differences.
    for name in [
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.conv_out.bias",
        "quant_conv.weight",
    ] {
        let g = grads.get(vars[name].as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(max_abs(g) > 0.0, "zero gradient for {name}");
    }
    let name = "encoder.mid_block.attentions.0.to_k.weight";
    let gw: Vec<f64> = grads.get(vars[name].as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let w0: Vec<f64> = vars[name].as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let mut worst_w = 0f64;
    for i in [0usize, 17, 100, 255] {
        let at = |delta: f64| {
            let mut w = w0.clone();
            w[i] += delta;
            let mut ws = weights.clone();
            ws.insert(name.to_string(), Tensor::from_vec(w, (16, 16), &dev).unwrap());
            loss(&build(&ws), &images0, &probe).to_scalar::<f64>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let rel = relative_error(fd, gw[i]);
        println!("vae d loss / d {name}[{i}]: autograd {:.9e}, central difference {fd:.9e}, relative error {rel:.2e}", gw[i]);
        worst_w = worst_w.max(rel);
    }
    assert!(worst_w < 1e-3, "weight gradient relative error {worst_w}");
}

#[test]
fn decoder_gradient_reaches_the_latents() {
    let vae = build(&weight_vars().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect());
    let z = Var::from_tensor(&outputs()["latents"].to_dtype(DType::F64).unwrap()).unwrap();
    let grads = vae.decode(z.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(z.as_tensor()).expect("gradient reaches the latents");
    assert!(max_abs(g) > 0.0);
}

fn expect_weights_error(r: congeal::Result<Vae>, path: &Path, needle: &str) {
    match r {
        Err(Error::Weights { path: p, message }) => {
            println!("expected error: {}", Error::Weights { path: p.clone(), message: message.clone() });
            assert_eq!(p, path);
            assert!(message.contains(needle), "message {message:?} does not name {needle:?}");
        }
        Err(e) => panic!("expected Error::Weights, got {e}"),
        Ok(_) => panic!("expected Error::Weights, got a model"),
    }
}

#[test]
fn bad_weight_files_are_weights_errors_naming_path_and_tensor() {
    let cfg = tiny_cfg();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    expect_weights_error(Vae::load(&missing, &cfg, DType::F32, &Device::Cpu), &missing, "AutoencoderKL");
    match VaeConfig::from_file(&missing) {
        Err(Error::Weights { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Error::Weights, got {other:?}"),
    }

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    expect_weights_error(Vae::load(&garbage, &cfg, DType::F32, &Device::Cpu), &garbage, "safetensors");

    let wrong = "decoder.mid_block.attentions.0.to_k.weight";
    let path = rewritten(dir.path(), |k, v| Some((k.to_string(), if k == wrong { v.reshape((8, 32)).unwrap() } else { v })));
    expect_weights_error(Vae::load(&path, &cfg, DType::F32, &Device::Cpu), &path, wrong);

    let gone = "encoder.conv_norm_out.bias";
    let path = rewritten(dir.path(), |k, v| if k == gone { None } else { Some((k.to_string(), v)) });
    expect_weights_error(Vae::load(&path, &cfg, DType::F32, &Device::Cpu), &path, gone);

    // A config that does not fit the file (3 levels for a 2-level file) names the first missing tensor (level 1 now needs a downsampler).
    let mut three = cfg.clone();
    three.block_out_channels = vec![8, 16, 16];
    let fixture = weights_path();
    expect_weights_error(
        Vae::load(&fixture, &three, DType::F32, &Device::Cpu),
        &fixture,
        "encoder.down_blocks.1.downsamplers.0.conv.weight",
    );
}

fn expect_invalid<T: std::fmt::Debug>(r: congeal::Result<T>, what: &str) {
    match r {
        Err(Error::InvalidInput(m)) => println!("{what}: {m}"),
        other => panic!("{what}: expected Error::InvalidInput, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_invalid_input_errors() {
    let dev = Device::Cpu;
    let vae = Vae::load(&weights_path(), &tiny_cfg(), DType::F32, &dev).unwrap();
    expect_invalid(vae.encode(&Tensor::zeros((2, 3, 15, 15), DType::F32, &dev).unwrap()), "odd size");
    expect_invalid(vae.encode(&Tensor::zeros((2, 3, 16, 15), DType::F32, &dev).unwrap()), "odd width");
    expect_invalid(vae.encode(&Tensor::zeros((2, 2, 16, 16), DType::F32, &dev).unwrap()), "2 channels");
    expect_invalid(vae.encode(&Tensor::zeros((3, 16, 16), DType::F32, &dev).unwrap()), "rank 3");
    expect_invalid(vae.encode(&Tensor::zeros((0, 3, 16, 16), DType::F32, &dev).unwrap()), "empty batch");
    let nan = Tensor::zeros((1, 3, 16, 16), DType::F32, &dev).unwrap().affine(1.0, f64::NAN).unwrap();
    expect_invalid(vae.encode(&nan), "NaN image");
    expect_invalid(vae.decode(&Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap()), "3-channel latents");
    let inf = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap().affine(1.0, f64::INFINITY).unwrap();
    expect_invalid(vae.decode(&inf), "infinite latents");
    // Odd latent sizes are fine for the decoder.
    assert_eq!(vae.decode(&Tensor::zeros((1, 4, 3, 5), DType::F32, &dev).unwrap()).unwrap().dims(), &[1, 3, 6, 10]);
}

#[test]
fn bad_configs_are_config_errors() {
    let mut cfg = VaeConfig::tiny();
    cfg.norm_num_groups = 5;
    let r = Vae::from_varbuilder(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu));
    assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    let mut cfg = VaeConfig::tiny();
    cfg.block_out_channels.clear();
    assert!(matches!(cfg.validate(), Err(Error::Config(_))));
}

#[test]
fn tiny_and_sd21_configs_build() {
    let dev = Device::Cpu;
    let tiny = Vae::from_varbuilder(&VaeConfig::tiny(), VarBuilder::zeros(DType::F32, &dev)).unwrap();
    let (mean, logvar) = tiny.encode(&Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap()).unwrap();
    assert_eq!(mean.dims(), &[1, 4, 4, 4]);
    assert_eq!(logvar.dims(), &[1, 4, 4, 4]);
    assert_eq!(tiny.decode(&mean).unwrap().dims(), &[1, 3, 8, 8]);

    let t = std::time::Instant::now();
    let sd = Vae::from_varbuilder(&VaeConfig::sd21(), VarBuilder::zeros(DType::F32, &dev)).unwrap();
    println!("VaeConfig::sd21() built from zeros in {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(sd.config().block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(sd.scaling_factor(), 0.18215);
    expect_invalid(sd.encode(&Tensor::zeros((1, 3, 20, 20), DType::F32, &dev).unwrap()), "sd21 20x20 (not a multiple of 8)");
}
