//! The SD 2.1 / MVDream UNet in candle against diffusers 0.31 `UNet2DConditionModel` on tiny random
//! configurations (fixtures committed in tests/fixtures/, written by
//! scripts/weights/make_tiny_unet_fixture.py; float64 references stored as float32), plus
//! finite-difference gradient checks, the errors for bad weight files and bad inputs, and the
//! seeded random model.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use common::{fixture, load_tensors, max_abs_diff};
use congeal::models::unet::{UNet, UNetConfig};
use congeal::Error;

const TOL: f64 = 1e-4;

fn model(name: &str, dtype: DType) -> UNet {
    let path = fixture(&format!("{name}.safetensors"));
    let cfg = UNetConfig::from_file(&path).unwrap();
    UNet::load(&path, &cfg, dtype, &Device::Cpu).unwrap()
}

fn cast(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap()
}

/// Runs the model of fixture `name` on the stored inputs in `dtype`.
fn run(unet: &UNet, fx: &HashMap<String, Tensor>, dtype: DType, num_views: usize) -> Tensor {
    let camera = fx.get("camera").map(|c| cast(c, dtype));
    unet.forward(
        &cast(&fx["sample"], dtype),
        &fx["timesteps"],
        &cast(&fx["encoder_hidden_states"], dtype),
        camera.as_ref(),
        num_views,
    )
    .unwrap()
}

#[test]
fn config_inferred_from_the_fixture_headers() {
    let sd = UNetConfig::from_file(&fixture("unet_tiny_sd.safetensors")).unwrap();
    assert_eq!(
        sd,
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![8, 8, 16],
            layers_per_block: 1,
            attention_heads: vec![2, 2, 4],
            cross_attention_dim: 16,
            norm_num_groups: 4,
            use_linear_projection: true,
            cross_attn_blocks: vec![true, true, false],
            camera_dim: None,
        }
    );
    let conv = UNetConfig::from_file(&fixture("unet_tiny_conv.safetensors")).unwrap();
    assert!(!conv.use_linear_projection);
    assert_eq!(conv.block_out_channels, vec![8, 16]);
    let mv = UNetConfig::from_file(&fixture("unet_tiny_mvdream.safetensors")).unwrap();
    assert_eq!(mv.camera_dim, Some(16));
    assert_eq!(mv.attention_heads, vec![2, 4]);

    let base = UNetConfig::sd21_base();
    base.validate().unwrap();
    assert_eq!(base.time_embed_dim(), 1280);
    assert_eq!(UNetConfig::mvdream_sd21(), UNetConfig { camera_dim: Some(16), ..base });
    UNetConfig::tiny().validate().unwrap();
}

#[test]
fn sd_parity_with_per_sample_timesteps() {
    let fx = load_tensors(&fixture("unet_tiny_sd_outputs.safetensors"));
    assert_eq!(fx["timesteps"].to_vec1::<f32>().unwrap(), vec![981.0, 37.0]);
    for dtype in [DType::F32, DType::F64] {
        let unet = model("unet_tiny_sd", dtype);
        let t = std::time::Instant::now();
        let out = run(&unet, &fx, dtype, 1);
        let d = max_abs_diff(&out, &fx["out"]);
        println!(
            "unet sd (8x6, batch 2, t = 981, 37) {dtype:?}: max |diff| vs diffusers {d:.2e} ({:.3} s)",
            t.elapsed().as_secs_f64()
        );
        assert!(d < TOL, "{dtype:?}: max abs diff {d}");
    }
    // The second sample really uses its own timestep: with t = 981 for both it moves away.
    let unet = model("unet_tiny_sd", DType::F32);
    let same_t = unet
        .forward(&fx["sample"], &Tensor::new(&[981f32], &Device::Cpu).unwrap(), &fx["encoder_hidden_states"], None, 1)
        .unwrap();
    let d0 = max_abs_diff(&same_t.i(0).unwrap(), &fx["out"].i(0).unwrap());
    let d1 = max_abs_diff(&same_t.i(1).unwrap(), &fx["out"].i(1).unwrap());
    println!("unet sd, broadcast t = 981: item 0 max |diff| {d0:.2e}, item 1 (reference t = 37) {d1:.2e}");
    assert!(d0 < TOL && d1 > 1e-2);
}

#[test]
fn sd1_style_conv_projection_parity() {
    let fx = load_tensors(&fixture("unet_tiny_conv_outputs.safetensors"));
    let unet = model("unet_tiny_conv", DType::F32);
    let d = max_abs_diff(&run(&unet, &fx, DType::F32, 1), &fx["out"]);
    println!("unet conv projections (8x8, batch 2): max |diff| vs diffusers {d:.2e}");
    assert!(d < TOL, "max abs diff {d}");
}

#[test]
fn mvdream_parity_four_views_with_camera() {
    let fx = load_tensors(&fixture("unet_tiny_mvdream_outputs.safetensors"));
    let unet = model("unet_tiny_mvdream", DType::F32);
    let out4 = run(&unet, &fx, DType::F32, 4);
    let out1 = run(&unet, &fx, DType::F32, 1);
    let d4 = max_abs_diff(&out4, &fx["out"]);
    let d1 = max_abs_diff(&out1, &fx["out_1view"]);
    let between = max_abs_diff(&out4, &out1);
    let ref_between = max_abs_diff(&fx["out"], &fx["out_1view"]);
    println!(
        "unet mvdream (1 object x 4 views, 8x8): 4-view max |diff| vs reference {d4:.2e}, 1-view vs reference \
         {d1:.2e}; ours 4-view vs 1-view {between:.3} (reference {ref_between:.3})"
    );
    assert!(d4 < TOL, "4 views: max abs diff {d4}");
    assert!(d1 < TOL, "1 view: max abs diff {d1}");
    assert!(between > 0.1, "cross-view attention changes nothing ({between})");
    // The 4-view output is not the 1-view reference: the parity above is not an accident.
    assert!(max_abs_diff(&out4, &fx["out_1view"]) > 0.1);

    // The camera matters, and diffusers' `class_embedding.*` names are accepted for it.
    let no_cam = unet
        .forward(&fx["sample"], &fx["timesteps"], &fx["encoder_hidden_states"], Some(&fx["camera"].zeros_like().unwrap()), 4)
        .unwrap();
    assert!(max_abs_diff(&no_cam, &out4) > 1e-2);
    let renamed: HashMap<String, Tensor> = load_tensors(&fixture("unet_tiny_mvdream.safetensors"))
        .into_iter()
        .map(|(k, v)| (k.replace("camera_embedding.", "class_embedding."), v))
        .collect();
    assert!(renamed.contains_key("class_embedding.linear_1.weight"));
    let aliased = UNet::from_varbuilder(unet.config(), VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu)).unwrap();
    let da = max_abs_diff(&run(&aliased, &fx, DType::F32, 4), &out4);
    assert!(da == 0.0, "class_embedding alias differs by {da}");
}

/// Central-difference check of `d loss / d input` on a few coordinates, loss = sum(out * probe).
fn check_gradient(label: &str, f: &dyn Fn(&Tensor) -> Tensor, x0: &Tensor, coords: &[usize], probe: &Tensor) -> f64 {
    let var = Var::from_tensor(x0).unwrap();
    let loss = |x: &Tensor| (f(x) * probe).unwrap().sum_all().unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("no gradient reaches {label}"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = 0f64;
    for &i in coords {
        let h = 1e-4;
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            loss(&Tensor::from_vec(v, x0.shape(), &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let rel = (fd - g[i]).abs() / fd.abs().max(g[i].abs()).max(1e-6);
        println!("  d loss / d {label}[{i}]: autograd {:+.6e}, finite difference {fd:+.6e}, relative error {rel:.1e}", g[i]);
        assert!(g[i].abs() > 1e-6, "{label}[{i}]: vanishing gradient {}", g[i]);
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn gradients_match_finite_differences_f64() {
    let fx = load_tensors(&fixture("unet_tiny_mvdream_outputs.safetensors"));
    let unet = model("unet_tiny_mvdream", DType::F64);
    let sample = cast(&fx["sample"], DType::F64);
    let ehs = cast(&fx["encoder_hidden_states"], DType::F64);
    let camera = cast(&fx["camera"], DType::F64);
    let t = &fx["timesteps"];
    let n: usize = fx["out"].elem_count();
    let probe_v: Vec<f64> = (0..n).map(|i| (0.37 * i as f64).sin()).collect();
    let probe = Tensor::from_vec(probe_v, fx["out"].shape(), &Device::Cpu).unwrap();

    let by_ehs = |x: &Tensor| unet.forward(&sample, t, x, Some(&camera), 4).unwrap();
    let e_ehs = check_gradient("encoder_hidden_states", &by_ehs, &ehs, &[0, 17, 95, 170, 300], &probe);
    let by_cam = |x: &Tensor| unet.forward(&sample, t, &ehs, Some(x), 4).unwrap();
    let e_cam = check_gradient("camera", &by_cam, &camera, &[0, 5, 22, 47, 60], &probe);
    let by_sample = |x: &Tensor| unet.forward(x, t, &ehs, Some(&camera), 4).unwrap();
    let e_sample = check_gradient("sample", &by_sample, &sample, &[0, 100, 555, 1000], &probe);
    println!(
        "unet mvdream f64 gradients, worst relative error: encoder_hidden_states {e_ehs:.1e}, camera {e_cam:.1e}, \
         sample {e_sample:.1e}"
    );
    assert!(e_ehs < 1e-3 && e_cam < 1e-3 && e_sample < 1e-3);

    // In 4-view mode a view's output depends on another view's text tokens only through the joint
    // self-attention: the gradient of view 0's output w.r.t. view 3's tokens is non-zero.
    let var = Var::from_tensor(&ehs).unwrap();
    let out = unet.forward(&sample, t, var.as_tensor(), Some(&camera), 4).unwrap();
    let grads = out.i(0).unwrap().sum_all().unwrap().backward().unwrap();
    let g3 = grads.get(var.as_tensor()).unwrap().i(3).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let out1 = unet.forward(&sample, t, var.as_tensor(), Some(&camera), 1).unwrap();
    let grads1 = out1.i(0).unwrap().sum_all().unwrap().backward().unwrap();
    let g3_1 = match grads1.get(var.as_tensor()) {
        Some(g) => g.i(3).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap(),
        None => 0.0,
    };
    println!("unet mvdream: max |d out[view 0] / d tokens[view 3]| = {g3:.2e} with 4 views, {g3_1:.2e} with 1");
    assert!(g3 > 1e-6 && g3_1 == 0.0);
}

fn weights_message(e: Error) -> String {
    match e {
        Error::Weights { path, message } => format!("{}: {message}", path.display()),
        other => panic!("expected Error::Weights, got {other:?}"),
    }
}

#[test]
fn bad_weight_files_and_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = UNetConfig::from_file(&fixture("unet_tiny_sd.safetensors")).unwrap();

    let missing = dir.path().join("nope.safetensors");
    let m = weights_message(UNet::load(&missing, &cfg, DType::F32, &Device::Cpu).unwrap_err());
    println!("missing file: {m}");
    assert!(m.contains("nope.safetensors"));
    let m = weights_message(UNetConfig::from_file(&missing).unwrap_err());
    assert!(m.contains("nope.safetensors"));

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    let m = weights_message(UNet::load(&garbage, &cfg, DType::F32, &Device::Cpu).unwrap_err());
    assert!(m.contains("garbage.safetensors"));

    let tensors = load_tensors(&fixture("unet_tiny_sd.safetensors"));
    let name = "down_blocks.1.resnets.0.conv1.weight";
    let mut wrong = tensors.clone();
    wrong.insert(name.into(), Tensor::zeros((8, 8, 1, 1), DType::F32, &Device::Cpu).unwrap());
    let wrong_path = dir.path().join("wrong_shape.safetensors");
    candle_core::safetensors::save(&wrong, &wrong_path).unwrap();
    let m = weights_message(UNet::load(&wrong_path, &cfg, DType::F32, &Device::Cpu).unwrap_err());
    println!("wrong shape: {m}");
    assert!(m.contains("wrong_shape.safetensors") && m.contains(name), "{m}");
    assert!(!m.contains('\n'), "a one-line message (no backtrace): {m}");

    let gone = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let mut partial = tensors.clone();
    partial.remove(gone);
    let partial_path = dir.path().join("partial.safetensors");
    candle_core::safetensors::save(&partial, &partial_path).unwrap();
    let m = weights_message(UNet::load(&partial_path, &cfg, DType::F32, &Device::Cpu).unwrap_err());
    println!("missing tensor: {m}");
    assert!(m.contains("partial.safetensors") && m.contains(gone), "{m}");

    // An SD config on the MVDream weights is fine (camera ignored); the reverse misses the camera.
    let mv_cfg = UNetConfig { camera_dim: Some(16), ..cfg.clone() };
    let m = weights_message(UNet::load(&fixture("unet_tiny_sd.safetensors"), &mv_cfg, DType::F32, &Device::Cpu).unwrap_err());
    assert!(m.contains("camera_embedding.linear_1.weight"), "{m}");

    // Inputs.
    let fx = load_tensors(&fixture("unet_tiny_mvdream_outputs.safetensors"));
    let unet = model("unet_tiny_mvdream", DType::F32);
    let (s, t, e, c) = (&fx["sample"], &fx["timesteps"], &fx["encoder_hidden_states"], &fx["camera"]);
    let invalid = |r: congeal::Result<Tensor>| match r {
        Err(Error::InvalidInput(m)) => m,
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let m = invalid(unet.forward(s, t, e, Some(c), 3));
    println!("batch 4 with 3 views: {m}");
    invalid(unet.forward(s, t, e, Some(c), 0));
    // No camera: no camera term (as MVDream's forward), so the output differs from the camera's.
    let without = unet.forward(s, t, e, None, 4).unwrap();
    let with = unet.forward(s, t, e, Some(c), 4).unwrap();
    let d = (without - with).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d > 1e-3, "camera term had no effect ({d})");
    invalid(unet.forward(s, &t.narrow(0, 0, 3).unwrap(), e, Some(c), 4));
    invalid(unet.forward(s, t, &e.narrow(2, 0, 8).unwrap(), Some(c), 4));
    invalid(unet.forward(s, t, e, Some(&c.narrow(1, 0, 12).unwrap()), 4));
    invalid(unet.forward(&s.narrow(1, 0, 3).unwrap(), t, e, Some(c), 4));
    let sd = model("unet_tiny_sd", DType::F32);
    invalid(sd.forward(&s.narrow(3, 0, 6).unwrap(), t, e, Some(c), 1));
}

#[test]
fn random_model_is_seeded_and_runs() {
    let cfg = UNetConfig { camera_dim: Some(16), cross_attention_dim: 32, ..UNetConfig::tiny() };
    let a = UNet::random(&cfg, DType::F32, &Device::Cpu).unwrap();
    let b = UNet::random(&cfg, DType::F32, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let sample = Tensor::randn(0f32, 1.0, (4, 4, 16, 16), &dev).unwrap();
    let t = Tensor::new(&[10f32, 200.0, 500.0, 999.0], &dev).unwrap();
    let ehs = Tensor::randn(0f32, 1.0, (4, 7, 32), &dev).unwrap();
    let cam = Tensor::randn(0f32, 1.0, (4, 16), &dev).unwrap();
    let ya = a.forward(&sample, &t, &ehs, Some(&cam), 2).unwrap();
    let yb = b.forward(&sample, &t, &ehs, Some(&cam), 2).unwrap();
    assert_eq!(ya.dims(), &[4, 4, 16, 16]);
    assert_eq!(max_abs_diff(&ya, &yb), 0.0);
    let std = ya.flatten_all().unwrap().var(0).unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    println!("random tiny UNet output std {std:.3}");
    assert!(std.is_finite() && std > 1e-3 && std < 1e3);
}

/// A [`VarBuilder`] backend that records every requested name and shape and hands back a
/// zero-memory broadcast view, so the full-size model can be "built" without its weights.
struct Recorder(std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<usize>>>>);

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let previous = self.0.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        assert!(previous.is_none(), "{name} requested twice");
        Tensor::zeros(1, dtype, dev)?.reshape(vec![1; s.rank()])?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        panic!("unchecked get of {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

fn requested(cfg: &UNetConfig) -> HashMap<String, Vec<usize>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(seen.clone())), DType::F32, Device::Cpu);
    UNet::from_varbuilder(cfg, vb).unwrap();
    let out = seen.lock().unwrap().clone();
    out
}

#[test]
fn full_sd21_and_mvdream_request_exactly_the_diffusers_tensors() {
    let text = std::fs::read_to_string(fixture("unet_sd21_shapes.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected: HashMap<String, Vec<usize>> = serde_json::from_value(json["shapes"].clone()).unwrap();
    let ours = requested(&UNetConfig::sd21_base());
    let mut missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let mut extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    let mut wrong: Vec<_> = ours
        .iter()
        .filter(|(k, s)| expected.get(*k).is_some_and(|e| e != *s))
        .map(|(k, s)| format!("{k}: ours {s:?}, diffusers {:?}", expected[k]))
        .collect();
    missing.sort();
    extra.sort();
    wrong.sort();
    let params: usize = ours.values().map(|s| s.iter().product::<usize>()).sum();
    println!(
        "unet sd21_base: {} tensors ({params} parameters) requested, diffusers has {}; missing {}, extra {}, wrong shape {}",
        ours.len(),
        expected.len(),
        missing.len(),
        extra.len(),
        wrong.len()
    );
    assert!(missing.is_empty() && extra.is_empty() && wrong.is_empty(), "missing {missing:?}\nextra {extra:?}\nwrong {wrong:?}");

    let mv = requested(&UNetConfig::mvdream_sd21());
    let mut added: Vec<_> = mv.iter().filter(|(k, _)| !ours.contains_key(*k)).map(|(k, s)| (k.clone(), s.clone())).collect();
    added.sort();
    assert_eq!(
        added,
        vec![
            ("camera_embedding.linear_1.bias".to_string(), vec![1280]),
            ("camera_embedding.linear_1.weight".to_string(), vec![1280, 16]),
            ("camera_embedding.linear_2.bias".to_string(), vec![1280]),
            ("camera_embedding.linear_2.weight".to_string(), vec![1280, 1280]),
        ]
    );
    assert_eq!(mv.len(), ours.len() + 4);
}
