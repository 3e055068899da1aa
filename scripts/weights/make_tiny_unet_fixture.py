#!/usr/bin/env python3
"""Write the tiny-UNet parity fixtures of tests/unet.rs (run once by hand; the outputs are committed).

Reference: diffusers `UNet2DConditionModel` (diffusers==0.31.0, torch==2.5.1, CPU), on tiny random
configurations shaped like Stable Diffusion 2.1 (linear transformer projections, GEGLU feed-forward,
cross-attention down blocks followed by a plain DownBlock2D, up blocks mirrored), computed in
float64 and stored as float32. Every parameter is redrawn from a seeded normal (weights / sqrt(fan_in),
norm scales 1 + 0.2 N, biases 0.1 N) so that norms, biases and the zero-initialised convolutions all
matter and activations stay O(1). The sinusoidal timestep embedding is computed by diffusers in float32
(`Timesteps` always does), as the candle port does.

Variants (NAME), each a weight file `tests/fixtures/NAME.safetensors` in diffusers naming (metadata
`attention_heads` = heads per down block, comma-separated, and `norm_num_groups`) and an output file
`tests/fixtures/NAME_outputs.safetensors`:
  * unet_tiny_sd:   block_out_channels (8, 8, 16), layers_per_block 1, down (CrossAttn, CrossAttn, Down),
                    heads (2, 2, 4), cross_attention_dim 16, norm_num_groups 4, linear projections;
                    batch 2 with two different timesteps, sample 8x6 (odd sizes at the bottom, so the
                    up blocks upsample to the skip's size). Outputs: `sample` [2,4,8,6],
                    `timesteps` [2], `encoder_hidden_states` [2,5,16], `out` [2,4,8,6].
  * unet_tiny_conv: the same shape at block_out_channels (8, 16), heads (2, 4), 2 levels, but SD1-style
                    1x1-convolution `proj_in`/`proj_out` (use_linear_projection False); batch 2, 8x8.
  * unet_tiny_mvdream: block_out_channels (8, 16), heads (2, 4), plus the camera embedding (diffusers
                    class_embed_type="projection", projection_class_embeddings_input_dim=16; stored
                    renamed class_embedding.* -> camera_embedding.*); batch 4 = 1 object x 4 views, the
                    self-attention (attn1) of every transformer block attending across the 4 views (a torch
                    re-derivation of MVDream's multi-view attention: [n*V, L, C] -> [n, V*L, C], attend,
                    back), cross-attention per view. Outputs also hold `camera` [4,16] (flattened 4x4
                    camera-to-world matrices on a circle), `out` (4 views) and `out_1view` (the same model
                    and inputs with num_views = 1, i.e. per-view self-attention), which must differ.

Also `tests/fixtures/unet_sd21_shapes.json`: the name -> shape of every tensor of the full-size
Stable Diffusion 2.1 (base) UNet (`stabilityai/stable-diffusion-2-1-base` unet/config.json, built on
torch's meta device, no weights), which the candle loader must request exactly.

Usage: python make_tiny_unet_fixture.py [--out tests/fixtures]
  (needs: pip install torch==2.5.1 diffusers==0.31.0 transformers safetensors numpy, in a throwaway venv)
"""
import argparse
import json
import math
import os

import diffusers
import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from safetensors.numpy import save_file


class MultiViewAttnProcessor:
    """MVDream's multi-view self-attention: the V views of an object attend jointly to each other."""

    def __init__(self, num_views):
        self.num_views = num_views

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None and attention_mask is None
        b, l, c = hidden_states.shape
        v = self.num_views
        x = hidden_states.reshape(b // v, v * l, c)
        q, k, val = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        n, m, inner = q.shape
        h = attn.heads
        d = inner // h

        def split(t):
            return t.reshape(n, m, h, d).permute(0, 2, 1, 3)

        logits = split(q) @ split(k).transpose(-1, -2) * attn.scale
        out = torch.softmax(logits, dim=-1) @ split(val)
        out = out.permute(0, 2, 1, 3).reshape(n, m, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.reshape(b, l, c)


def set_views(model, num_views):
    procs = {}
    for name in model.attn_processors:
        procs[name] = MultiViewAttnProcessor(num_views) if name.endswith("attn1.processor") else AttnProcessor()
    model.set_attn_processor(procs)


def build(block_out, heads, linear, camera, seed):
    n = len(block_out)
    kw = {}
    if camera:
        kw = dict(class_embed_type="projection", projection_class_embeddings_input_dim=16)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=block_out, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        attention_head_dim=heads, cross_attention_dim=16, norm_num_groups=4, use_linear_projection=linear,
        **kw).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_norm = "norm" in pname.split(".")[-2]
            if is_norm:
                p.copy_((1.0 if pname.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
    return model


def cameras(views):
    """Flattened 4x4 camera-to-world matrices looking at the origin from a circle (elevation 15 deg)."""
    out = []
    for i in range(views):
        az = 2 * math.pi * i / views + 0.3
        el = math.radians(15)
        pos = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]) * 1.5
        fwd = -pos / np.linalg.norm(pos)
        right = np.cross(fwd, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        m = np.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, -fwd, pos
        out.append(m.reshape(-1))
    return np.stack(out)


def save(model, name, heads, out_dir, rename_camera, seed):
    sd = {}
    for k, v in model.state_dict().items():
        if rename_camera and k.startswith("class_embedding."):
            k = "camera_embedding." + k[len("class_embedding."):]
        sd[k] = v.detach().float().numpy().copy()
    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file(sd, path, metadata={
        "format": "pt", "attention_heads": ",".join(str(h) for h in heads), "norm_num_groups": "4",
        "source": f"random UNet2DConditionModel, diffusers {diffusers.__version__}, seed {seed}"})
    print(name, sum(v.size for v in sd.values()), "parameters,", os.path.getsize(path), "bytes")


def run(model, sample, t, ehs, camera=None):
    with torch.no_grad():
        return model(sample, t, encoder_hidden_states=ehs, class_labels=camera).sample


def meta():
    return {"diffusers": diffusers.__version__, "torch": torch.__version__,
            "precision": "float64 reference (float32 timestep sinusoids), stored as float32"}


def f32(x):
    """Rounds to float32 (what is stored) and back to float64 (what the reference computes with)."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).double()


def plain(name, block_out, heads, linear, size, seed, out_dir):
    model = build(block_out, heads, linear, False, seed)
    save(model, name, heads, out_dir, False, seed)
    model = model.double()
    set_views(model, 1)
    g = torch.Generator().manual_seed(seed + 100)
    sample = f32(torch.randn(2, 4, *size, generator=g))
    ehs = f32(torch.randn(2, 5, 16, generator=g))
    t = f32([981.0, 37.0])
    out = run(model, sample, t, ehs)
    # The built-in processor must agree with ours at num_views = 1 (a check on the processor itself).
    model.set_attn_processor(AttnProcessor())
    ref = run(model, sample, t, ehs)
    assert (out - ref).abs().max() < 1e-12
    print(name, "out", tuple(out.shape), "std", float(out.std()))
    save_file({"sample": sample.float().numpy(), "timesteps": t.float().numpy(),
               "encoder_hidden_states": ehs.float().numpy(), "out": out.float().numpy()},
              os.path.join(out_dir, f"{name}_outputs.safetensors"), metadata=meta())


def mvdream(name, seed, out_dir):
    heads = (2, 4)
    model = build((8, 16), heads, True, True, seed)
    save(model, name, heads, out_dir, True, seed)
    model = model.double()
    g = torch.Generator().manual_seed(seed + 100)
    sample = f32(torch.randn(4, 4, 8, 8, generator=g))
    ehs = f32(torch.randn(4, 5, 16, generator=g))
    t = f32([500.0] * 4)
    cam = f32(cameras(4))
    set_views(model, 4)
    out = run(model, sample, t, ehs, cam)
    set_views(model, 1)
    out1 = run(model, sample, t, ehs, cam)
    diff = float((out - out1).abs().max())
    print(name, "out", tuple(out.shape), "std", float(out.std()), "4 views vs 1 view max |diff|", diff)
    assert diff > 1e-2
    save_file({"sample": sample.float().numpy(), "timesteps": t.float().numpy(),
               "encoder_hidden_states": ehs.float().numpy(), "camera": cam.float().numpy(),
               "out": out.float().numpy(), "out_1view": out1.float().numpy()},
              os.path.join(out_dir, f"{name}_outputs.safetensors"), metadata=meta())


SD21_BASE = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4,
    sample_size=64, up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    use_linear_projection=True)


def sd21_shapes(out_dir):
    with torch.device("meta"):
        model = UNet2DConditionModel(**SD21_BASE)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(out_dir, "unet_sd21_shapes.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "config": SD21_BASE, "shapes": shapes}, f, indent=0,
                  sort_keys=True)
    print("sd21", len(shapes), "tensors,", sum(math.prod(s) for s in shapes.values()), "parameters")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    plain("unet_tiny_sd", (8, 8, 16), (2, 2, 4), True, (8, 6), 0, args.out)
    plain("unet_tiny_conv", (8, 16), (2, 4), False, (8, 8), 1, args.out)
    mvdream("unet_tiny_mvdream", 2, args.out)
    sd21_shapes(args.out)


if __name__ == "__main__":
    main()
