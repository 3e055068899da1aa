//! The CLIP text encoder and tokenizer against HF transformers (fixtures committed in tests/fixtures/,
//! written by scripts/weights/make_tiny_clip_fixture.py):
//! - `CLIPTextModel` on two tiny random configurations (exact GELU and quick GELU), last layer and
//!   penultimate layer (skip 1), tolerance max |diff| <= 1e-4 in f32 and 1e-5 in f64;
//! - the slow `CLIPTokenizer` on a synthetic BPE vocabulary, ids equal for every prompt;
//! - gradients with respect to the token embeddings against central finite differences (f64);
//! - the errors for missing or wrong weight and tokenizer files.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{load_tensors, max_abs_diff};
use congeal::models::clip_text::{Activation, ClipTextConfig, ClipTextModel};
use congeal::models::tokenizer::ClipTokenizer;
use congeal::Error;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture_ids(outputs: &HashMap<String, Tensor>) -> Tensor {
    // Stored as int64 by numpy; our model takes u32.
    outputs["input_ids"].to_dtype(DType::U32).unwrap()
}

fn load_variant(name: &str, dtype: DType) -> (ClipTextModel, HashMap<String, Tensor>) {
    let path = fixtures().join(format!("{name}.safetensors"));
    let cfg = ClipTextConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let model = ClipTextModel::load(&path, &cfg, dtype, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    (model, load_tensors(&fixtures().join(format!("{name}_outputs.safetensors"))))
}

fn parity(name: &str, activation: Activation) {
    let path = fixtures().join(format!("{name}.safetensors"));
    let cfg = ClipTextConfig::from_file(&path).unwrap();
    assert_eq!(
        cfg,
        ClipTextConfig {
            vocab_size: 99,
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            max_position_embeddings: 16,
            activation,
            layer_norm_eps: 1e-5,
        }
    );
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-5)] {
        let (model, out) = load_variant(name, dtype);
        let ids = fixture_ids(&out);
        assert_eq!(ids.dims(), &[2, 16]);
        for (skip, key) in [(0, "last_hidden_state"), (1, "penultimate")] {
            let y = model.forward(&ids, skip).unwrap();
            assert_eq!(y.dtype(), dtype);
            let d = max_abs_diff(&y, &out[key]);
            let scale = max_abs_diff(&out[key], &out[key].zeros_like().unwrap());
            println!("{name} {dtype:?} skip {skip} ({key}): max |diff| = {d:.3e} (max |ref| {scale:.2})");
            assert!(d <= tol, "{name} {dtype:?} skip {skip}: max |diff| {d} > {tol}");
        }
        // The two outputs really differ, so skip is exercised.
        let d01 = max_abs_diff(&model.forward(&ids, 0).unwrap(), &model.forward(&ids, 1).unwrap());
        assert!(d01 > 0.1, "skip 0 and skip 1 nearly equal ({d01})");
    }
}

#[test]
fn parity_with_transformers_gelu() {
    parity("clip_tiny_gelu", Activation::Gelu);
}

#[test]
fn parity_with_transformers_quick_gelu() {
    parity("clip_tiny_quick_gelu", Activation::QuickGelu);
}

#[test]
fn loads_names_without_text_model_prefix() {
    let (model, out) = load_variant("clip_tiny_gelu", DType::F32);
    let stripped: HashMap<String, Tensor> = load_tensors(&fixtures().join("clip_tiny_gelu.safetensors"))
        .into_iter()
        .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stripped.safetensors");
    candle_core::safetensors::save(&stripped, &path).unwrap();
    // No metadata in this file: heads default to hidden / 64, so give the configuration explicitly.
    let cfg = model.config().clone();
    let m = weights_message(ClipTextConfig::from_file(&path));
    assert!(m.contains("num_attention_heads"), "hidden 32 / 64 = 0 heads: {m}");
    let m2 = ClipTextModel::load(&path, &cfg, DType::F32, &Device::Cpu).unwrap();
    let ids = fixture_ids(&out);
    assert_eq!(max_abs_diff(&model.forward(&ids, 0).unwrap(), &m2.forward(&ids, 0).unwrap()), 0.0);
}

/// A fixed probe for the loss `sum(output * probe)`.
fn probe(dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|i| (0.37 * i as f64).sin() + 0.5 * (0.011 * (i * i) as f64).cos()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn gradient_check(name: &str, skip: usize) {
    let (model, out) = load_variant(name, DType::F64);
    let ids = fixture_ids(&out);
    let embeds = model.embed_tokens(&ids).unwrap();
    let p = probe(embeds.dims());
    let loss = |e: &Tensor| -> Tensor { (model.forward_embeddings(e, skip).unwrap() * &p).unwrap().sum_all().unwrap() };
    let var = Var::from_tensor(&embeds).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("a gradient reaches the token embeddings");
    // The "placeholder" positions: batch 0 token 4, batch 1 token 2, and the first token (which
    // every later token attends to).
    let base: Vec<f64> = embeds.flatten_all().unwrap().to_vec1().unwrap();
    let (_, l, c) = embeds.dims3().unwrap();
    let mut worst = 0f64;
    for &(b, t) in &[(0usize, 4usize), (1, 2), (0, 0)] {
        for &k in &[0usize, 7, 19, 31] {
            let idx = (b * l + t) * c + k;
            let h = 1e-5;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                loss(&Tensor::from_vec(v, embeds.dims(), &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let an = g.i((b, t, k)).unwrap().to_scalar::<f64>().unwrap();
            let rel = (an - fd).abs() / fd.abs().max(an.abs()).max(1e-3);
            worst = worst.max(rel);
            assert!(rel < 1e-3, "{name} skip {skip} d/de[{b},{t},{k}]: autograd {an} vs finite difference {fd} (rel {rel})");
        }
    }
    println!("{name} skip {skip}: worst relative gradient error {worst:.3e} over 12 coordinates");
    // Causality: the last token's embedding cannot change earlier outputs, so with a probe on the
    // first token only, its gradient is exactly zero.
    let mut mask = vec![0f64; embeds.elem_count()];
    mask[..c].fill(1.0);
    let first_only = Tensor::from_vec(mask, embeds.dims(), &Device::Cpu).unwrap();
    let var2 = Var::from_tensor(&embeds).unwrap();
    let l2 = (model.forward_embeddings(var2.as_tensor(), skip).unwrap() * first_only).unwrap().sum_all().unwrap();
    let g2 = l2.backward().unwrap();
    let g2 = g2.get(var2.as_tensor()).unwrap();
    let last = g2.i((0, l - 1)).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(last, 0.0, "causal mask: output 0 depends on token {}", l - 1);
}

#[test]
fn gradient_matches_finite_differences_gelu() {
    gradient_check("clip_tiny_gelu", 0);
}

#[test]
fn gradient_matches_finite_differences_quick_gelu_penultimate() {
    gradient_check("clip_tiny_quick_gelu", 1);
}

#[derive(serde::Deserialize)]
struct Expected {
    max_len: usize,
    pad_id: u32,
    prompts: Vec<Prompt>,
}

#[derive(serde::Deserialize)]
struct Prompt {
    text: String,
    ids: Vec<u32>,
    ids_unpadded: Vec<u32>,
    ids_eos_padded: Vec<u32>,
    ids_hf_bang_pad: Vec<u32>,
}

fn tokenizer_dir() -> PathBuf {
    fixtures().join("clip_tiny_tokenizer")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(tokenizer_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let tok = ClipTokenizer::from_dir(&tokenizer_dir()).unwrap();
    let exp = expected();
    assert_eq!(tok.max_len(), exp.max_len);
    assert_eq!(tok.pad_id(), exp.pad_id, "pads with \"!\" like SD 2.1");
    assert_eq!((tok.bos_id(), tok.eos_id()), (560, 561));
    assert!(exp.prompts.len() >= 8);
    // SD 1.x pads with eos.
    let sd1 = ClipTokenizer::from_dir(&tokenizer_dir()).unwrap().with_pad_id(tok.eos_id());
    let mut with_bang = 0;
    for p in &exp.prompts {
        assert_eq!(tok.encode_unpadded(&p.text).unwrap(), p.ids_unpadded, "unpadded ids of {:?}", p.text);
        assert_eq!(tok.encode(&p.text).unwrap(), p.ids, "ids of {:?}", p.text);
        assert_eq!(sd1.encode(&p.text).unwrap(), p.ids_eos_padded, "eos-padded ids of {:?}", p.text);
        // transformers with pad_token="!" turns a literal "!" into the pad token; OpenCLIP and we
        // give "!</w>". Equal otherwise.
        if p.text.contains('!') {
            with_bang += 1;
            assert_ne!(p.ids, p.ids_hf_bang_pad);
        } else {
            assert_eq!(p.ids, p.ids_hf_bang_pad, "{:?}", p.text);
        }
    }
    assert_eq!(with_bang, 1);
    println!("{} prompts tokenized as transformers' CLIPTokenizer does", exp.prompts.len());
}

#[test]
fn token_positions_find_the_placeholder() {
    let tok = ClipTokenizer::from_dir(&tokenizer_dir()).unwrap();
    let sks = tok.token_id("sks</w>").expect("sks is one token of the synthetic vocabulary");
    assert_eq!(tok.token_positions("a photo of sks object", "sks").unwrap(), vec![4]);
    assert_eq!(tok.token_positions("A photo of SKS, object", "sks").unwrap(), vec![4]);
    // A word of several tokens: "zyxwv" is unknown to the merges and splits into 5 symbols.
    let text = "a photo of zyxwv qqq object";
    let pos = tok.token_positions(text, "zyxwv").unwrap();
    assert_eq!(pos, vec![4, 5, 6, 7, 8]);
    assert_eq!(tok.token_positions(text, "zyxwv qqq").unwrap(), vec![4, 5, 6, 7, 8, 9, 10, 11]);
    // Several occurrences, cut at the truncation: only positions before eos (76) count.
    let long = ["a photo of sks object"; 20].join(" ");
    let pos = tok.token_positions(&long, "sks").unwrap();
    let ids = tok.encode(&long).unwrap();
    assert_eq!(pos, (0..15).map(|k| 4 + 5 * k).collect::<Vec<_>>());
    assert!(pos.iter().all(|&q| ids[q] == sks));
    assert_eq!(ids.iter().filter(|&&i| i == sks).count(), pos.len());
    // Not a substring match: "sk" is not "sks"; absent words are an error.
    assert!(matches!(tok.token_positions("a photo of sks object", "sk"), Err(Error::InvalidInput(_))));
    assert!(matches!(tok.token_positions("a photo", "sks"), Err(Error::InvalidInput(_))));
    assert!(matches!(tok.token_positions("a photo", " "), Err(Error::InvalidInput(_))));
}

fn weights_message(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ Error::Weights { .. }) => e.to_string(),
        other => panic!("expected Error::Weights, got {other:?}"),
    }
}

#[test]
fn missing_and_wrong_weight_files_are_weights_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let m = weights_message(ClipTextModel::load(&missing, &ClipTextConfig::tiny(), DType::F32, &Device::Cpu));
    assert!(m.contains("nope.safetensors"), "{m}");
    let m = weights_message(ClipTextConfig::from_file(&missing));
    assert!(m.contains("nope.safetensors"), "{m}");

    let good = load_tensors(&fixtures().join("clip_tiny_gelu.safetensors"));
    let cfg = ClipTextConfig::from_file(&fixtures().join("clip_tiny_gelu.safetensors")).unwrap();

    let mut wrong = good.clone();
    let name = "text_model.encoder.layers.1.mlp.fc1.weight";
    wrong.insert(name.into(), Tensor::zeros((36, 32), DType::F32, &Device::Cpu).unwrap());
    let path = dir.path().join("wrong_shape.safetensors");
    candle_core::safetensors::save(&wrong, &path).unwrap();
    let m = weights_message(ClipTextModel::load(&path, &cfg, DType::F32, &Device::Cpu));
    assert!(m.contains(name) && m.contains("wrong_shape.safetensors"), "{m}");
    println!("wrong shape: {m}");

    let mut incomplete = good.clone();
    incomplete.remove("text_model.final_layer_norm.bias");
    let path = dir.path().join("incomplete.safetensors");
    candle_core::safetensors::save(&incomplete, &path).unwrap();
    let m = weights_message(ClipTextModel::load(&path, &cfg, DType::F32, &Device::Cpu));
    assert!(m.contains("final_layer_norm.bias") && m.contains("incomplete.safetensors"), "{m}");
    println!("missing tensor: {m}");

    let path = dir.path().join("garbage.safetensors");
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    let m = weights_message(ClipTextModel::load(&path, &cfg, DType::F32, &Device::Cpu));
    assert!(m.contains("garbage.safetensors"), "{m}");
    let m = weights_message(ClipTextConfig::from_file(&path));
    assert!(m.contains("garbage.safetensors"), "{m}");

    // A file from another model: from_file names the tensor it looked for.
    let path = fixtures().join("dinov2_tiny_gelu.safetensors");
    let m = weights_message(ClipTextConfig::from_file(&path));
    assert!(m.contains("embeddings.token_embedding.weight"), "{m}");
}

#[test]
fn missing_and_corrupt_tokenizer_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = weights_message(ClipTokenizer::from_dir(dir.path()));
    assert!(m.contains("vocab.json"), "{m}");

    let vocab = std::fs::read_to_string(tokenizer_dir().join("vocab.json")).unwrap();
    std::fs::write(dir.path().join("vocab.json"), &vocab).unwrap();
    let m = weights_message(ClipTokenizer::from_dir(dir.path()));
    assert!(m.contains("merges.txt"), "{m}");

    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\np h\nthree symbols here\n").unwrap();
    let m = weights_message(ClipTokenizer::from_dir(dir.path()));
    assert!(m.contains("merges.txt") && m.contains("three symbols here"), "{m}");

    std::fs::write(dir.path().join("vocab.json"), "[1, 2]").unwrap();
    let m = weights_message(ClipTokenizer::from_dir(dir.path()));
    assert!(m.contains("vocab.json"), "{m}");

    std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n").unwrap();
    let m = weights_message(ClipTokenizer::from_dir(dir.path()));
    assert!(m.contains("<|startoftext|>"), "{m}");
}

#[test]
fn hashed_tokenizer_drives_the_tiny_random_model() {
    let cfg = ClipTextConfig::tiny();
    let tok = ClipTokenizer::hashed(cfg.vocab_size, cfg.max_position_embeddings).unwrap();
    let ids = tok.encode("a photo of sks object").unwrap();
    assert!(ids.iter().all(|&i| (i as usize) < cfg.vocab_size));
    assert_eq!(ids.len(), 77);
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = ClipTextModel::from_varbuilder(&cfg, vb).unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let y = model.forward(&t, 0).unwrap();
    assert_eq!(y.dims(), &[1, 77, 32]);
    assert_eq!(tok.token_positions("a photo of sks object", "sks").unwrap(), vec![4]);
}
