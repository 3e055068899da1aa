//! The MVDream checkpoint converter (src/models/convert.rs) against diffusers' reference converters.
//!
//! tests/fixtures/mvdream_tiny.pt is a tiny synthetic checkpoint in the real LDM / OpenCLIP naming
//! (nested under `state_dict`), and tests/fixtures/mvdream_tiny_expected.safetensors holds what
//! diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
//! `convert_open_clip_checkpoint` give for it (`unet/`, `vae/`, `text_encoder/` prefixes; the camera
//! embedding as `camera_embedding.*`); both written by scripts/weights/make_tiny_mvdream_checkpoint.py.
//! Converted names must match exactly and values bit for bit.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use congeal::models::convert::{
    convert_ldm_state_dict, convert_mvdream_checkpoint, ldm_unet_to_diffusers, ldm_vae_to_diffusers, open_clip_text_to_hf,
    ConvertedModel, UnetLayout, VaeLayout, TEXT_ENCODER_FILE, UNET_FILE, VAE_FILE,
};
use congeal::Error;

/// Expected tensors of one part (`unet`, `vae`, `text_encoder`), prefix removed.
fn expected(part: &str) -> BTreeMap<String, Tensor> {
    let all = candle_core::safetensors::load(fixture("mvdream_tiny_expected.safetensors"), &Device::Cpu).unwrap();
    let prefix = format!("{part}/");
    let out: BTreeMap<String, Tensor> =
        all.into_iter().filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v))).collect();
    assert!(!out.is_empty(), "no {part}/ tensors in the expected fixture");
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), DType::F32);
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// Same names, shapes and bit-identical f32 values.
fn assert_same(part: &str, got: &HashMap<String, Tensor>, want: &BTreeMap<String, Tensor>) {
    let got_names: BTreeSet<&String> = got.keys().collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    let missing: Vec<_> = want_names.difference(&got_names).take(5).collect();
    let extra: Vec<_> = got_names.difference(&want_names).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{part}: missing {missing:?}, unexpected {extra:?}");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dims(), w.dims(), "{part}: shape of {name}");
        assert!(bits(g) == bits(w), "{part}: values of {name} differ");
    }
}

fn as_map(m: &ConvertedModel) -> HashMap<String, Tensor> {
    m.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The fixture's LDM tensors, read with candle's pickle reader.
fn ldm_tensors() -> Vec<(String, Tensor)> {
    candle_core::pickle::read_all_with_key(fixture("mvdream_tiny.pt"), Some("state_dict")).unwrap()
}

/// The `__metadata__` of a safetensors file.
fn metadata(path: &Path) -> BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_value(header["__metadata__"].clone()).unwrap()
}

#[test]
fn tiny_checkpoint_converts_to_the_reference_tensors() {
    let out = tempfile::tempdir().unwrap();
    let report = convert_mvdream_checkpoint(&fixture("mvdream_tiny.pt"), out.path()).unwrap();
    for (part, file) in [("unet", UNET_FILE), ("vae", VAE_FILE), ("text_encoder", TEXT_ENCODER_FILE)] {
        let got = candle_core::safetensors::load(out.path().join(file), &Device::Cpu).unwrap();
        assert_same(part, &got, &expected(part));
    }
    assert_eq!(report.unet_tensors, expected("unet").len());
    assert_eq!(report.vae_tensors, expected("vae").len());
    assert_eq!(report.text_encoder_tensors, expected("text_encoder").len());
    assert_eq!(report.text_layers, 2);
    assert_eq!(report.unet_layout, UnetLayout { layers_per_block: 2, attention: vec![true, true, false] });
    assert_eq!(report.dtypes, vec![DType::F32]);
    assert_eq!(report.files, vec![out.path().join(UNET_FILE), out.path().join(VAE_FILE), out.path().join(TEXT_ENCODER_FILE)]);
    // `model_ema.num_updates` (int32) is in the file too, but candle's pickle reader skips int32 storages.
    assert_eq!(
        report.ignored,
        vec![
            "alphas_cumprod",
            "betas",
            "cond_stage_model.model.logit_scale",
            "cond_stage_model.model.text_projection",
            "model_ema.decay"
        ]
    );
}

#[test]
fn converted_files_carry_architecture_metadata() {
    let out = tempfile::tempdir().unwrap();
    convert_mvdream_checkpoint(&fixture("mvdream_tiny.pt"), out.path()).unwrap();
    let unet = metadata(&out.path().join(UNET_FILE));
    assert_eq!(unet["layers_per_block"], "2");
    assert_eq!(unet["block_out_channels"], "4,8,8");
    assert_eq!(unet["down_block_types"], "CrossAttnDownBlock2D,CrossAttnDownBlock2D,DownBlock2D");
    assert_eq!(unet["up_block_types"], "UpBlock2D,CrossAttnUpBlock2D,CrossAttnUpBlock2D");
    assert_eq!(unet["cross_attention_dim"], "8");
    assert_eq!(unet["camera_dim"], "16");
    assert_eq!(unet["dtype"], "F32");
    assert_eq!(unet["source"], "converted from mvdream_tiny.pt by congeal");
    assert!(!unet.contains_key("num_attention_heads"), "4/8 channels are not whole 64-channel heads");
    let vae = metadata(&out.path().join(VAE_FILE));
    assert_eq!(vae["block_out_channels"], "2,4");
    assert_eq!(vae["layers_per_block"], "1");
    assert_eq!(vae["latent_channels"], "4");
    let text = metadata(&out.path().join(TEXT_ENCODER_FILE));
    assert_eq!(text["num_hidden_layers"], "2");
    assert_eq!(text["hidden_size"], "8");
    assert_eq!(text["intermediate_size"], "16");
    assert_eq!(text["max_position_embeddings"], "8");
    assert_eq!(text["vocab_size"], "32");
}

#[test]
fn safetensors_state_dict_converts_like_the_checkpoint() {
    // The same LDM state dict, round-tripped through a safetensors file, through the core function.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ldm.safetensors");
    let tensors: HashMap<String, Tensor> = ldm_tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let loaded: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_iter().collect();
    let parts = convert_ldm_state_dict(loaded).unwrap();
    assert_same("unet", &as_map(&parts.unet), &expected("unet"));
    assert_same("vae", &as_map(&parts.vae), &expected("vae"));
    assert_same("text_encoder", &as_map(&parts.text_encoder), &expected("text_encoder"));
    assert_eq!(parts.ignored.len(), 5, "{:?}", parts.ignored);
}

#[test]
fn unknown_tensor_names_are_a_weights_error_listing_them() {
    let extra = [
        "model.diffusion_model.label_emb.0.0.weight",
        // An upsampler where the layout has none (the last up level).
        "model.diffusion_model.output_blocks.8.1.conv.weight",
        "some_other_model.weight",
    ];
    let mut tensors = ldm_tensors();
    for name in extra {
        tensors.push((name.to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap()));
    }
    match convert_ldm_state_dict(tensors) {
        Err(Error::Weights { message, .. }) => {
            assert!(message.starts_with("3 tensor name(s)"), "{message}");
            for name in extra {
                assert!(message.contains(name), "{name} not named in: {message}");
            }
        }
        other => panic!("expected Error::Weights, got {other:?}"),
    }
}

#[test]
fn missing_or_corrupt_checkpoint_is_a_weights_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pt");
    let corrupt = dir.path().join("corrupt.pt");
    std::fs::write(&corrupt, b"this is not a zip file").unwrap();
    let truncated = dir.path().join("truncated.pt");
    let bytes = std::fs::read(fixture("mvdream_tiny.pt")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    for path in [&missing, &corrupt, &truncated] {
        match convert_mvdream_checkpoint(path, &dir.path().join("out")) {
            Err(e @ Error::Weights { .. }) => {
                let Error::Weights { path: p, .. } = &e else { unreachable!() };
                assert_eq!(p, path);
                assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            }
            other => panic!("{}: expected Error::Weights, got {other:?}", path.display()),
        }
    }
    assert!(!dir.path().join("out").exists(), "nothing is written for a bad checkpoint");
}

#[test]
fn a_part_missing_from_the_state_dict_is_a_weights_error() {
    let tensors: Vec<(String, Tensor)> =
        ldm_tensors().into_iter().filter(|(k, _)| !k.starts_with("first_stage_model.")).collect();
    match convert_ldm_state_dict(tensors) {
        Err(Error::Weights { message, .. }) => {
            assert!(message.contains("first_stage_model."), "{message}")
        }
        other => panic!("expected Error::Weights, got {other:?}"),
    }
}

#[test]
fn name_maps_follow_the_sd2_layout() {
    let unet = [
        ("time_embed.2.bias", Some("time_embedding.linear_2.bias")),
        ("camera_embed.0.weight", Some("camera_embedding.linear_1.weight")),
        ("input_blocks.0.0.weight", Some("conv_in.weight")),
        ("input_blocks.3.0.op.weight", Some("down_blocks.0.downsamplers.0.conv.weight")),
        ("input_blocks.4.0.skip_connection.weight", Some("down_blocks.1.resnets.0.conv_shortcut.weight")),
        ("input_blocks.8.1.proj_in.weight", Some("down_blocks.2.attentions.1.proj_in.weight")),
        ("input_blocks.11.0.emb_layers.1.bias", Some("down_blocks.3.resnets.1.time_emb_proj.bias")),
        ("input_blocks.10.1.norm.weight", None), // no attention on the deepest level
        ("input_blocks.12.0.in_layers.0.weight", None),
        ("middle_block.2.out_layers.3.weight", Some("mid_block.resnets.1.conv2.weight")),
        (
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            Some("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        ),
        ("output_blocks.2.1.conv.weight", Some("up_blocks.0.upsamplers.0.conv.weight")),
        ("output_blocks.5.2.conv.bias", Some("up_blocks.1.upsamplers.0.conv.bias")),
        ("output_blocks.8.2.conv.weight", Some("up_blocks.2.upsamplers.0.conv.weight")),
        ("output_blocks.11.2.conv.weight", None), // no upsampler after the last level
        ("output_blocks.11.1.proj_out.bias", Some("up_blocks.3.attentions.2.proj_out.bias")),
        ("output_blocks.0.0.in_layers.2.weight", Some("up_blocks.0.resnets.0.conv1.weight")),
        ("output_blocks.1.1.norm.weight", None), // no attention on the deepest level
        ("out.0.weight", Some("conv_norm_out.weight")),
        ("out.2.bias", Some("conv_out.bias")),
        ("label_emb.0.0.weight", None),
    ];
    for (ldm, want) in unet {
        assert_eq!(ldm_unet_to_diffusers(ldm).as_deref(), want, "UNet {ldm}");
    }
    let vae = [
        ("encoder.down.1.block.0.nin_shortcut.weight", Some("encoder.down_blocks.1.resnets.0.conv_shortcut.weight")),
        ("encoder.down.2.downsample.conv.bias", Some("encoder.down_blocks.2.downsamplers.0.conv.bias")),
        ("encoder.down.3.downsample.conv.bias", None),
        ("decoder.up.3.block.2.norm1.weight", Some("decoder.up_blocks.0.resnets.2.norm1.weight")),
        ("decoder.up.1.upsample.conv.weight", Some("decoder.up_blocks.2.upsamplers.0.conv.weight")),
        ("decoder.up.0.upsample.conv.weight", None),
        ("decoder.mid.attn_1.proj_out.weight", Some("decoder.mid_block.attentions.0.to_out.0.weight")),
        ("encoder.mid.attn_1.norm.bias", Some("encoder.mid_block.attentions.0.group_norm.bias")),
        ("encoder.mid.block_2.conv1.weight", Some("encoder.mid_block.resnets.1.conv1.weight")),
        ("decoder.norm_out.weight", Some("decoder.conv_norm_out.weight")),
        ("post_quant_conv.bias", Some("post_quant_conv.bias")),
        ("loss.logvar", None),
    ];
    for (ldm, want) in vae {
        assert_eq!(ldm_vae_to_diffusers(ldm).as_deref(), want, "VAE {ldm}");
    }
    let text = [
        ("positional_embedding", Some("text_model.embeddings.position_embedding.weight")),
        ("transformer.resblocks.23.mlp.c_fc.weight", Some("text_model.encoder.layers.23.mlp.fc1.weight")),
        ("transformer.resblocks.0.attn.out_proj.bias", Some("text_model.encoder.layers.0.self_attn.out_proj.bias")),
        ("transformer.resblocks.5.attn.in_proj_weight", Some("text_model.encoder.layers.5.self_attn.in_proj.weight")),
        ("ln_final.bias", Some("text_model.final_layer_norm.bias")),
        ("text_projection", None),
        ("logit_scale", None),
    ];
    for (ldm, want) in text {
        assert_eq!(open_clip_text_to_hf(ldm).as_deref(), want, "text {ldm}");
    }
}

#[test]
fn layouts_are_inferred_from_names() {
    let mut names = vec!["input_blocks.0.0.weight".to_string()];
    for i in 1..12 {
        names.push(format!("input_blocks.{i}.0.in_layers.0.weight"));
        if i % 3 == 0 {
            names.push(format!("input_blocks.{i}.0.op.weight"));
        } else if i < 9 {
            names.push(format!("input_blocks.{i}.1.norm.weight"));
        }
    }
    assert_eq!(UnetLayout::infer(names.iter().map(String::as_str)), Ok(UnetLayout::sd2()));
    // A downsampler out of place.
    let bad: Vec<&str> = names.iter().map(String::as_str).filter(|n| *n != "input_blocks.6.0.op.weight").collect();
    assert!(UnetLayout::infer(bad.iter().copied().chain(["input_blocks.5.0.op.weight"])).is_err());
    let vae = ["encoder.down.0.block.0.conv1.weight", "decoder.up.3.block.0.conv1.weight", "quant_conv.weight"];
    assert_eq!(VaeLayout::infer(vae), Some(VaeLayout::sd()));
}
