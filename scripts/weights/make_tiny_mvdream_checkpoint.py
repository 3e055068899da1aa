#!/usr/bin/env python3
"""Write the tiny synthetic MVDream checkpoint of tests/convert_mvdream.rs (run once by hand; outputs committed).

MVDream ships `sd-v2.1-base-4view.pt`: a PyTorch zip pickle whose state dict (possibly nested under a
`state_dict` key) uses the original LDM / OpenCLIP naming:
  model.diffusion_model.*     the multi-view UNet (SD 2.1 layout) plus `camera_embed.0/2`,
  first_stage_model.*         the KL autoencoder,
  cond_stage_model.model.*    the OpenCLIP ViT-H text tower,
  and bookkeeping tensors (noise-schedule buffers, EMA copies) that no model uses.
This script builds the same naming at toy size, so that our converter (src/models/convert.rs) can be
tested without the 5 GB file:
  1. tiny random diffusers `UNet2DConditionModel` (SD2-style: linear projections, 3 levels of
     (4, 8, 8) channels, 2 resnets per level, cross-attention (dim 8) on the first two levels, and
     `class_embed_type="projection"` with a 16-d input standing in for MVDream's camera embedding),
     tiny `AutoencoderKL` (2 levels of (2, 4) channels) and a tiny HF `CLIPTextModel` (width 8,
     2 layers); the sizes are this small so that both files stay under 300 KB;
  2. our own inverse map (diffusers/HF -> LDM/OpenCLIP names, 1x1-conv VAE attention weights,
     fused OpenCLIP in-projections), written below;
  3. a check that diffusers' reference converters (`convert_ldm_unet_checkpoint`,
     `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint` in diffusers.loaders.single_file_utils)
     turn that LDM checkpoint back into exactly the diffusers/HF state dicts (same names, equal values),
     which proves that the synthetic checkpoint has the real naming. The camera embedding goes through
     the reference UNet converter under `label_emb.0.0/0.2` (its name for a projection class embedding),
     since diffusers has no MVDream-specific name for it.
Outputs (tests/fixtures/):
  mvdream_tiny.pt                      torch.save zip pickle, {"state_dict": {...}, "global_step": 0},
                                       LDM names, float32 (UNet and VAE tensors are views of one
                                       storage per part, see `pack`), plus tensors the converter must ignore
                                       (`betas`, `alphas_cumprod`, `model_ema.decay`,
                                       `model_ema.num_updates` (int32, which candle's reader skips),
                                       `cond_stage_model.model.text_projection`, `...logit_scale`);
  mvdream_tiny_expected.safetensors    the expected converted tensors, float32, prefixed by part:
                                       `unet/<diffusers name>` (class_embedding.* renamed to
                                       camera_embedding.*), `vae/<diffusers name>`,
                                       `text_encoder/<HF CLIPTextModel name>`.

Versions: torch==2.5.1 (CPU), diffusers==0.31.0, transformers==4.46.3, safetensors, numpy.
Usage: python scripts/weights/make_tiny_mvdream_checkpoint.py [--out tests/fixtures]
"""
import argparse
import os
import re

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_WIDTH = 8


def randomise(module, seed):
    """Redraws every parameter so that each tensor is distinct (a swapped name cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if p.dim() < 2 else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm.weight") else 0.0))


# ---------------------------------------------------------------- inverse maps (ours)

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(name, layers_per_block, attention_levels):
    """diffusers UNet2DConditionModel name -> LDM openaimodel name (without `model.diffusion_model.`)."""
    per = layers_per_block + 1
    n = len(attention_levels)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "class_embedding.linear_1": "camera_embed.0", "class_embedding.linear_2": "camera_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    stem, leaf = name.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", name)
    if m:
        kind, b, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        idx = 1 + b * per + j if kind == "down" else b * per + j
        blocks = "input_blocks" if kind == "down" else "output_blocks"
        if part == "attentions":
            return f"{blocks}.{idx}.1.{rest}"
        sub, leaf = rest.rsplit(".", 1)
        return f"{blocks}.{idx}.0.{RESNET_TO_LDM[sub]}.{leaf}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$", name)
    if m:
        return f"input_blocks.{1 + int(m.group(1)) * per + layers_per_block}.0.op.{m.group(2)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$", name)
    if m:
        b = int(m.group(1))
        slot = 2 if attention_levels[n - 1 - b] else 1
        return f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{m.group(2)}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", name)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}"
        sub, leaf = rest.rsplit(".", 1)
        return f"middle_block.{2 * j}.{RESNET_TO_LDM[sub]}.{leaf}"
    raise KeyError(f"no LDM name for UNet tensor {name}")


VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(name, levels):
    """diffusers AutoencoderKL name -> LDM name (without `first_stage_model.`)."""
    name = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)$", name)
    if m:
        tail = f"block.{m.group(3)}" if m.group(3) is not None else "downsample"
        return f"encoder.down.{m.group(1)}.{tail}.{m.group(4)}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", name)
    if m:
        tail = f"block.{m.group(3)}" if m.group(3) is not None else "upsample"
        return f"decoder.up.{levels - 1 - int(m.group(1))}.{tail}.{m.group(4)}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", name)
    if m:
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", name)
    if m:
        return f"{m.group(1)}.mid.attn_1.{VAE_ATTN_TO_LDM[m.group(2)]}.{m.group(3)}"
    return name  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


CLIP_TO_OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def clip_to_openclip(sd):
    """HF CLIPTextModel state dict -> OpenCLIP text names (without `cond_stage_model.model.`)."""
    out = {}
    for name, t in sd.items():
        fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
        if name in fixed:
            out[fixed[name]] = t
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", name)
        if not m:
            raise KeyError(f"no OpenCLIP name for text tensor {name}")
        i, sub, leaf = m.groups()
        if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            continue  # fused below
        out[f"transformer.resblocks.{i}.{CLIP_TO_OPENCLIP[sub]}.{leaf}"] = t
    layers = {int(m.group(1)) for n in sd for m in [re.match(r"text_model\.encoder\.layers\.(\d+)\.", n)] if m}
    for i in sorted(layers):
        for leaf, key in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            parts = [sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.{key}"] = torch.cat(parts, 0)
    return out


# ---------------------------------------------------------------- models and checks


def pack(sd, prefix):
    """Makes the tensors under `prefix` views of one shared storage (in place). torch.save writes one zip
    record per storage (~280 bytes each), so this keeps the fixture small; it also exercises storage
    offsets in the reader, while the text encoder and the ignored tensors keep a storage each."""
    names = [k for k in sd if k.startswith(prefix)]
    flat = torch.cat([sd[k].reshape(-1) for k in names])
    offset = 0
    for k in names:
        n = sd[k].numel()
        sd[k] = flat[offset:offset + n].view(sd[k].shape)
        offset += n


def same(a, b, what):
    """Asserts two state dicts have the same names and bit-identical values."""
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{what}: {k} differs"
    print(f"{what}: {len(a)} tensors match the diffusers/HF state dict")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    attention_levels = [True, True, False]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8, 8), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 2), cross_attention_dim=TEXT_WIDTH, norm_num_groups=4,
        use_linear_projection=True, class_embed_type="projection", projection_class_embeddings_input_dim=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(2, 4), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=32, hidden_size=TEXT_WIDTH, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, hidden_act="gelu"))
    for seed, m in enumerate((unet, vae, text)):
        randomise(m, seed)
    unet_sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    vae_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    text_sd = {k: v.detach().clone() for k, v in text.state_dict().items() if not k.endswith("position_ids")}

    ldm = {}
    for k, v in unet_sd.items():
        ldm["model.diffusion_model." + unet_to_ldm(k, 2, attention_levels)] = v.clone()
    levels = len(vae.config.block_out_channels)
    for k, v in vae_sd.items():
        ldm_name = vae_to_ldm(k, levels)
        if ".mid.attn_1." in ldm_name and ldm_name.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM stores these as 1x1 convolutions
        ldm["first_stage_model." + ldm_name] = v.clone().contiguous()
    for k, v in clip_to_openclip(text_sd).items():
        ldm["cond_stage_model.model." + k] = v.clone().contiguous()
    g = torch.Generator().manual_seed(7)
    ldm["cond_stage_model.model.text_projection"] = torch.randn(TEXT_WIDTH, 16, generator=g)
    ldm["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    ldm["betas"] = torch.linspace(0.00085, 0.012, 10)
    ldm["alphas_cumprod"] = torch.cumprod(1 - ldm["betas"], 0)
    ldm["model_ema.decay"] = torch.tensor(0.9999)
    ldm["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int)
    assert len(ldm) == len(unet_sd) + len(vae_sd) + len(text_sd) - 2 * 2 * 2 + 6

    # The reference converters must give back exactly the diffusers/HF state dicts.
    as_label_emb = {k.replace("camera_embed.", "label_emb.0."): v for k, v in ldm.items()}
    same(convert_ldm_unet_checkpoint(as_label_emb, unet.config), unet_sd, "UNet")
    same(convert_ldm_vae_checkpoint(ldm, vae.config), vae_sd, "VAE")
    same(convert_open_clip_checkpoint(text, ldm), text_sd, "text encoder")

    pt = os.path.join(args.out, "mvdream_tiny.pt")
    for prefix in ("model.diffusion_model.", "first_stage_model."):
        pack(ldm, prefix)
    torch.save({"state_dict": ldm, "global_step": 0}, pt)
    expected = {}
    for k, v in unet_sd.items():
        expected["unet/" + k.replace("class_embedding.", "camera_embedding.")] = v.contiguous()
    expected.update({"vae/" + k: v.contiguous() for k, v in vae_sd.items()})
    expected.update({"text_encoder/" + k: v.contiguous() for k, v in text_sd.items()})
    exp = os.path.join(args.out, "mvdream_tiny_expected.safetensors")
    save_file(expected, exp, metadata={
        "source": f"make_tiny_mvdream_checkpoint.py: diffusers {diffusers.__version__}, "
                  f"transformers {transformers.__version__}, torch {torch.__version__}"})
    for p in (pt, exp):
        print(f"{p}: {os.path.getsize(p) / 1024:.0f} KiB")
    print(f"{len(ldm)} checkpoint tensors, {len(expected)} expected tensors")


if __name__ == "__main__":
    main()
