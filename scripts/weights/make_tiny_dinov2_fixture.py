#!/usr/bin/env python3
"""Write the tiny-DINOv2 parity fixtures of tests/dinov2.rs (run once by hand; the output is committed).

Reference: HuggingFace transformers `Dinov2Model` (transformers==4.46.3, torch==2.5.1, CPU, eager
attention), on two tiny random configurations, computed in float64 and stored as float32:
  * dinov2_tiny_gelu:   hidden 32, 2 layers, 2 heads, patch 14, image 56 (4x4 grid), GELU MLP (ratio 2);
  * dinov2_tiny_swiglu: hidden 16, 2 layers, 2 heads, patch 14, image 56, SwiGLU MLP (`use_swiglu_ffn`).
Every parameter is redrawn (normal, seeded) so that LayerScale, norms and biases all matter.
Files, per variant NAME:
  tests/fixtures/NAME.safetensors          the weights in HF naming (metadata: num_attention_heads,
                                           layer_norm_eps), loadable by `Dinov2::load`;
  tests/fixtures/NAME_outputs.safetensors  for each input size HxW in SIZES:
      `HxW.last_hidden_state` [2, 1+N, C] (final layernorm applied) and
      `HxW.hidden_state_1`    [2, 1+N, C] (output of block 0, no final norm; HF hidden_states[1]).
The input is not stored: pixel[b, c, y, x] = sin(0.37 y + 0.23 x + 1.3 c + 2.1 b) + 0.5 cos(0.11 x y + b)
(computed in float64, cast to float32), which tests/dinov2.rs recomputes.
Sizes: 56x56 (native grid, no interpolation), 70x98 (5x7 grid, bicubic), 28x112 (2x8: as many patches
as the stored grid but not square, so HF interpolates).

Usage: python make_tiny_dinov2_fixture.py [--out tests/fixtures]
  (needs: pip install torch==2.5.1 transformers==4.46.3 safetensors numpy, in a throwaway venv)
"""
import argparse
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import Dinov2Config, Dinov2Model

SIZES = [(56, 56), (70, 98), (28, 112)]


def pixels(batch, h, w):
    b, c, y, x = np.meshgrid(np.arange(batch), np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    v = np.sin(0.37 * y + 0.23 * x + 1.3 * c + 2.1 * b) + 0.5 * np.cos(0.11 * x * y + b)
    return v.astype(np.float32)


def make(name, hidden, swiglu, seed, out_dir):
    cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                       patch_size=14, image_size=56, layer_norm_eps=1e-6, layerscale_value=1.0,
                       use_swiglu_ffn=swiglu, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("lambda1"):
                p.copy_(0.5 + 0.3 * torch.randn_like(p))
            elif ".norm" in pname or pname.startswith("layernorm"):
                p.copy_((1.0 if pname.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2 and "embeddings" not in pname:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif "projection" in pname:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
            else:  # cls token, mask token, position embeddings
                p.copy_(torch.randn_like(p))
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(out_dir, f"{name}.safetensors"),
              metadata={"format": "pt", "num_attention_heads": "2", "layer_norm_eps": "1e-6",
                        "source": f"random Dinov2Model, transformers {transformers.__version__}, seed {seed}"})
    model = model.double()
    outs = {}
    for h, w in SIZES:
        x = torch.from_numpy(pixels(2, h, w)).double()
        with torch.no_grad():
            r = model(pixel_values=x, output_hidden_states=True)
        outs[f"{h}x{w}.last_hidden_state"] = r.last_hidden_state.float().numpy().copy()
        outs[f"{h}x{w}.hidden_state_1"] = r.hidden_states[1].float().numpy().copy()
        print(name, h, w, tuple(r.last_hidden_state.shape))
    save_file(outs, os.path.join(out_dir, f"{name}_outputs.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                        "precision": "float64 reference, stored as float32"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    make("dinov2_tiny_gelu", 32, False, 0, args.out)
    make("dinov2_tiny_swiglu", 16, True, 1, args.out)


if __name__ == "__main__":
    main()
