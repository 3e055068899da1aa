#!/usr/bin/env python3
"""Write the tiny-VAE parity fixtures of tests/vae.rs (run once by hand; the output is committed).

Reference: diffusers `AutoencoderKL` (diffusers==0.31.0, torch==2.5.1, CPU) on a tiny random
configuration: block_out_channels (8, 16), layers_per_block 1, norm_num_groups 4, latent_channels 4,
DownEncoderBlock2D / UpDecoderBlock2D, in/out channels 3 (the Stable Diffusion 2.1 VAE layout, scaled
down). Every parameter is redrawn from a seeded normal (conv/linear weights N(0, 1/fan_in), norm scales
1 + N(0, 0.2^2), all biases N(0, 0.1^2)) so that norms and biases matter and activations stay O(1).
The weights are rounded to float32 first; the reference is then computed in float64 from those
rounded weights and stored as float32.

Files:
  tests/fixtures/vae_tiny.safetensors          the weights in diffusers naming (`encoder.*`, `decoder.*`,
                                               `quant_conv`, `post_quant_conv`; current attention names
                                               `to_q/to_k/to_v/to_out.0`), metadata `norm_num_groups`,
                                               `scaling_factor`; loadable by `Vae::load`;
  tests/fixtures/vae_tiny_outputs.safetensors
      `images`  [2, 3, 16, 16] the encoder input, pixel[b, c, y, x] =
                0.9 sin(0.37 y + 0.23 x + 1.3 c + 2.1 b) * cos(0.11 x y + 0.5 b) (in [-1, 1]);
      `mean`, `logvar` [2, 4, 8, 8]  encode(images).latent_dist (after quant_conv; logvar clamped to
                [-30, 20]);
      `latents` [2, 4, 8, 8]  a fixed latent, 1.5 sin(0.5 x + 0.7 y + 0.9 c + 1.7 b);
      `decoded` [2, 3, 16, 16]  decode(latents).sample (post_quant_conv then decoder).

Usage: python make_tiny_vae_fixture.py [--out tests/fixtures]
  (needs: pip install torch==2.5.1 diffusers==0.31.0 safetensors numpy, in a throwaway venv)
"""
import argparse
import os

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import save_file

SCALING_FACTOR = 0.18215
GROUPS = 4


def images():
    b, c, y, x = np.meshgrid(np.arange(2), np.arange(3), np.arange(16), np.arange(16), indexing="ij")
    v = 0.9 * np.sin(0.37 * y + 0.23 * x + 1.3 * c + 2.1 * b) * np.cos(0.11 * x * y + 0.5 * b)
    return v.astype(np.float32)


def latents():
    b, c, y, x = np.meshgrid(np.arange(2), np.arange(4), np.arange(8), np.arange(8), indexing="ij")
    return (1.5 * np.sin(0.5 * x + 0.7 * y + 0.9 * c + 1.7 * b)).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=GROUPS, sample_size=16, scaling_factor=SCALING_FACTOR,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
            p.copy_(p.float().double())  # round to float32 so Rust and reference share the weights
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    assert any(k.endswith("attentions.0.to_q.weight") for k in weights), "expected current attention names"
    save_file(weights, os.path.join(args.out, "vae_tiny.safetensors"),
              metadata={"format": "pt", "norm_num_groups": str(GROUPS), "scaling_factor": str(SCALING_FACTOR),
                        "source": f"random AutoencoderKL, diffusers {diffusers.__version__}, seed 0"})

    model = model.double()
    x = torch.from_numpy(images()).double()
    z = torch.from_numpy(latents()).double()
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        decoded = model.decode(z).sample
    outs = {
        "images": images(), "latents": latents(),
        "mean": dist.mean.float().numpy().copy(), "logvar": dist.logvar.float().numpy().copy(),
        "decoded": decoded.float().numpy().copy(),
    }
    for k, v in outs.items():
        print(k, v.shape, f"min {v.min():.3f} max {v.max():.3f} std {v.std():.3f}")
    save_file(outs, os.path.join(args.out, "vae_tiny_outputs.safetensors"),
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__,
                        "precision": "float64 reference, stored as float32"})


if __name__ == "__main__":
    main()
