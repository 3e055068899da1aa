//! U^2-Net-p: parity with onnxruntime on rembg's `u2netp.onnx`, weight-file errors, and mask quality on
//! shipped images. Needs `scripts/setup_weights.sh` (weights and the onnxruntime fixture): without them
//! these tests fail and say so, they never skip.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use congeal::collection::segment::{preprocess, Segmenter};
use congeal::collection::{load_mask, load_rgb};
use congeal::error::Error;
use congeal::models::u2net::U2NetP;

const WEIGHTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/u2netp.safetensors");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/fixtures/u2netp_onnx.safetensors");
/// The images of the fixture (see scripts/weights/make_u2netp_fixture.py).
const FIXTURE_IMAGES: [&str; 2] = ["duck/rgb/000.png", "chair-plaid/rgb/000.png"];

fn need(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(p.is_file(), "{} is missing: run scripts/setup_weights.sh to fetch and convert the weights", p.display());
    p
}

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(need(FIXTURE), &Device::Cpu).expect("fixture unreadable: rerun scripts/setup_weights.sh")
}

fn max_abs(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let max = d.iter().copied().fold(0f32, f32::max);
    (max, d.iter().sum::<f32>() / d.len() as f32)
}

/// All seven outputs match onnxruntime on the stored preprocessed input (float32; the summation order
/// differs). Tolerances on the probabilities: max |diff| <= 1e-4 for d0 (measured 3.2e-5, mean 1.2e-7) and
/// <= 2.5e-4 for the side outputs d1..d6 (measured up to 7.8e-5, on d2).
#[test]
fn parity_with_onnxruntime() {
    let net = U2NetP::load(&need(WEIGHTS), &Device::Cpu).unwrap();
    let fx = fixture();
    let x = &fx["input"];
    assert_eq!(x.dims(), &[2, 3, 320, 320]);
    let t = std::time::Instant::now();
    let probs = net.forward(x).unwrap();
    eprintln!("forward of 2 images at 320x320: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(probs.dims(), &[2, 1, 320, 320]);
    let (max, mean) = max_abs(&probs, &fx["d0"]);
    eprintln!("d0 vs onnxruntime: max |diff| {max:.3e}, mean {mean:.3e}");
    assert!(max <= 1e-4, "d0 differs from onnxruntime by up to {max}");
    let logits = net.forward_logits(x).unwrap();
    for (k, l) in logits.iter().enumerate() {
        let p = candle_nn::ops::sigmoid(l).unwrap();
        let (max, mean) = max_abs(&p, &fx[&format!("d{k}")]);
        eprintln!("d{k} (via forward_logits) vs onnxruntime: max |diff| {max:.3e}, mean {mean:.3e}");
        let tol = if k == 0 { 1e-4 } else { 2.5e-4 };
        assert!(max <= tol, "d{k} differs from onnxruntime by up to {max} (tolerance {tol})");
    }
}

/// Our preprocessing (image crate Lanczos3) against rembg's (PIL LANCZOS) on the fixture images, and the
/// whole `predict` against rembg's final 0-255 map. Bounds are loose (different resamplers) and were set
/// from the measured values printed here.
#[test]
fn preprocessing_and_prediction_close_to_rembg() {
    let fx = fixture();
    let seg = Segmenter::load(&need(WEIGHTS), &Device::Cpu).unwrap();
    for (i, rel) in FIXTURE_IMAGES.iter().enumerate() {
        let rgb = load_rgb(&common::collections_dir().join(rel)).unwrap();
        let ours = Tensor::from_vec(preprocess(&rgb), (3, 320, 320), &Device::Cpu).unwrap();
        let theirs = fx["input"].get(i).unwrap();
        let (max, mean) = max_abs(&ours, &theirs);
        eprintln!("{rel}: preprocessing vs PIL: max |diff| {max:.3} mean {mean:.4} (normalised units)");
        assert!(mean < 0.05, "{rel}: preprocessing differs from rembg's by {mean} on average");

        let pred = seg.predict(&rgb).unwrap();
        assert_eq!(pred.dimensions(), rgb.dimensions());
        let rembg = fx[&format!("rembg_mask_{i}")].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diff: Vec<f32> = pred.as_raw().iter().zip(&rembg).map(|(&a, &b)| (f32::from(a) - f32::from(b)).abs()).collect();
        let mean = diff.iter().sum::<f32>() / diff.len() as f32;
        let over = diff.iter().filter(|&&d| d > 64.0).count() as f32 / diff.len() as f32;
        eprintln!("{rel}: predict vs rembg: mean |diff| {mean:.2} / 255, {:.3} % of pixels off by > 64", over * 100.0);
        assert!(mean < 2.0 && over < 0.005, "{rel}: prediction differs from rembg's: mean {mean}, {over} > 64");
    }
}

#[test]
fn missing_weights_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let err = U2NetP::load(&missing, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Weights { ref path, .. } if path == &missing), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("nope.safetensors") && msg.contains("setup_weights.sh"), "{msg}");
    let err = Segmenter::load(&missing, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Weights { .. }), "{err:?}");
}

#[test]
fn wrong_weight_files_name_the_path_and_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    // Not safetensors at all.
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a weight file").unwrap();
    let err = U2NetP::load(&garbage, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Weights { ref path, .. } if path == &garbage), "{err:?}");
    assert!(err.to_string().contains("garbage.safetensors"), "{err}");
    // Safetensors of another model.
    let other = dir.path().join("other.safetensors");
    let t = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("embeddings.cls_token".to_string(), t)]), &other).unwrap();
    let err = U2NetP::load(&other, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Weights { ref path, .. } if path == &other), "{err:?}");
    assert!(msg.contains("other.safetensors") && msg.contains("stage1.rebnconvin.conv.weight"), "{msg}");
    // Right names, one wrong shape.
    let mut ts = candle_core::safetensors::load(need(WEIGHTS), &Device::Cpu).unwrap();
    ts.insert("side3.weight".into(), Tensor::zeros((1, 32, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
    let bad = dir.path().join("bad_shape.safetensors");
    candle_core::safetensors::save(&ts, &bad).unwrap();
    let msg = U2NetP::load(&bad, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("bad_shape.safetensors") && msg.contains("side3.weight") && msg.contains("[1, 64, 3, 3]"), "{msg}");
}

#[test]
fn bad_input_shape_is_an_error() {
    let net = U2NetP::load(&need(WEIGHTS), &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 4, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(net.forward(&x), Err(Error::InvalidInput(_))));
    let x = Tensor::zeros((3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(net.forward(&x), Err(Error::InvalidInput(_))));
}

/// Masks of six shipped images (backgrounds: solid x2, brick texture x2, gravel texture, checkerboard)
/// against the ground truth. Measured: IoU 0.996, 0.985, 0.978, 0.984, 0.886, 0.661 (mean 0.915); rembg's
/// own pipeline (onnxruntime + PIL) gives the same masks to within rounding. Over all 200 shipped images
/// the per-collection median IoU is 0.91-0.99 but single images on busy backgrounds drop far lower
/// (checkerboards and textures), so the check is on the mean over this mix, with a margin of 0.065
/// for numerical and resampling differences across machines.
#[test]
fn mask_iou_on_shipped_images() {
    let seg = Segmenter::load(&need(WEIGHTS), &Device::Cpu).unwrap();
    let picks = [("duck", 1), ("duck", 2), ("sofa-burlap", 3), ("chairs-mixed", 4), ("chair-teak", 5), ("chair-plaid", 6)];
    let mut rgbs = Vec::new();
    let mut gts = Vec::new();
    for (c, i) in picks {
        let root = common::collections_dir().join(c);
        assert!(root.is_dir(), "{} missing (the shared data collections)", root.display());
        rgbs.push(load_rgb(&root.join(format!("rgb/{i:03}.png"))).unwrap());
        gts.push(load_mask(&root.join(format!("mask/{i:03}.png"))).unwrap());
    }
    let masks = seg.mask_batch(&rgbs).unwrap();
    let mut ious = Vec::new();
    for (((c, i), m), gt) in picks.iter().zip(masks).zip(&gts) {
        let m = m.unwrap();
        let (mut inter, mut union) = (0usize, 0usize);
        for (a, b) in m.as_raw().iter().zip(gt.as_raw()) {
            inter += (*a > 127 && *b > 127) as usize;
            union += (*a > 127 || *b > 127) as usize;
        }
        let iou = inter as f64 / union.max(1) as f64;
        eprintln!("{c}/{i:03}: IoU {iou:.3}");
        ious.push(iou);
    }
    let mean = ious.iter().sum::<f64>() / ious.len() as f64;
    eprintln!("mean IoU {mean:.3}");
    assert!(mean >= MEAN_IOU_FLOOR, "mean mask IoU {mean:.3} < {MEAN_IOU_FLOOR}");
    // The one shipped image where the network finds nothing (largest probability 0.285, on a
    // checkerboard): a clear error instead of rembg's min-max-normalised noise.
    let rgb = load_rgb(&common::collections_dir().join("chair-plaid/rgb/015.png")).unwrap();
    let err = seg.mask(&rgb).unwrap_err();
    assert!(matches!(err, Error::Mask { .. }) && err.to_string().contains("no confident foreground"), "{err}");
}

#[test]
fn empty_or_full_masks_are_errors() {
    use congeal::collection::segment::threshold_mask;
    let empty = image::GrayImage::from_pixel(8, 6, image::Luma([127]));
    assert!(matches!(threshold_mask(&empty), Err(Error::Mask { .. })));
    let full = image::GrayImage::from_pixel(8, 6, image::Luma([128]));
    assert!(matches!(threshold_mask(&full), Err(Error::Mask { .. })));
    let mut half = empty.clone();
    half.put_pixel(3, 3, image::Luma([200]));
    let m = threshold_mask(&half).unwrap();
    assert_eq!(m.as_raw().iter().filter(|&&v| v == 255).count(), 1);
    assert!(m.as_raw().iter().all(|&v| v == 0 || v == 255));
}

/// See `mask_iou_on_shipped_images`.
const MEAN_IOU_FLOOR: f64 = 0.85;

/// Time of one forward pass (not a check; `cargo test --release --test u2net -- --ignored --nocapture`).
#[test]
#[ignore]
fn timing() {
    let net = U2NetP::load(&need(WEIGHTS), &Device::Cpu).unwrap();
    let fx = fixture();
    for n in [1, 2] {
        let x = fx["input"].narrow(0, 0, n).unwrap();
        let t = std::time::Instant::now();
        net.forward(&x).unwrap();
        eprintln!("{n} image(s) at 320x320: {:.2} s", t.elapsed().as_secs_f64());
    }
}
