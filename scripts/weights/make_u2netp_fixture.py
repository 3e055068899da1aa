#!/usr/bin/env python3
"""Writes the onnxruntime parity fixture of U^2-Net-p: weights/fixtures/u2netp_onnx.safetensors.

Two shipped images (duck/rgb/000.png, 320x240, and chair-plaid/rgb/000.png, 256x256) are preprocessed
exactly like rembg's u2netp session (RGB, PIL LANCZOS resize to 320x320, divide by the image's max pixel
value, subtract mean (0.485, 0.456, 0.406), divide by std (0.229, 0.224, 0.225)) and run through
u2netp.onnx with onnxruntime (CPU, one image at a time: the graph has batch size 1). Stored tensors:

    input        f32 [2, 3, 320, 320]  the preprocessed input (so the Rust test isolates the network)
    d0 .. d6     f32 [2, 1, 320, 320]  the ONNX outputs (sigmoid probabilities; d0 = fused output)
    rembg_mask_0 u8  [240, 320]        rembg's post-processing of d0 (min-max, x255, uint8, LANCZOS back)
    rembg_mask_1 u8  [256, 256]

Usage: make_u2netp_fixture.py --src weights/src --out weights [--data DATA_DIR]
"""
import argparse
import os

import numpy as np
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file

IMAGES = ["duck/rgb/000.png", "chair-plaid/rgb/000.png"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(img):
    im = np.array(img.convert("RGB").resize((320, 320), Image.LANCZOS)).astype(np.float64)
    im = im / np.max(im)
    im = (im - np.array(MEAN)) / np.array(STD)
    return im.transpose(2, 0, 1)[None].astype(np.float32)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "..", "shared", "data", "collections"))
    args = ap.parse_args()
    sess = ort.InferenceSession(os.path.join(args.src, "u2netp.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    inputs, outs, tensors = [], [], {}
    for i, rel in enumerate(IMAGES):
        path = os.path.join(args.data, rel)
        if not os.path.isfile(path):
            raise SystemExit(f"make_u2netp_fixture: {path} not found (pass --data COLLECTIONS_DIR)")
        img = Image.open(path)
        x = preprocess(img)
        o = sess.run(None, {name: x})
        inputs.append(x)
        outs.append(o)
        pred = o[0][:, 0]
        pred = np.squeeze((pred - pred.min()) / (pred.max() - pred.min()))
        mask = Image.fromarray((pred * 255).astype("uint8")).resize(img.size, Image.LANCZOS)
        tensors[f"rembg_mask_{i}"] = np.ascontiguousarray(np.array(mask, dtype=np.uint8))
    tensors["input"] = np.ascontiguousarray(np.concatenate(inputs))
    for k in range(7):
        tensors[f"d{k}"] = np.ascontiguousarray(np.concatenate([o[k] for o in outs]).astype(np.float32))
    dest = os.path.join(args.out, "fixtures", "u2netp_onnx.safetensors")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    save_file(tensors, dest + ".part", metadata={"images": ",".join(IMAGES), "onnxruntime": ort.__version__})
    os.replace(dest + ".part", dest)
    print(f"make_u2netp_fixture: {len(IMAGES)} images -> {dest}")


if __name__ == "__main__":
    main()
