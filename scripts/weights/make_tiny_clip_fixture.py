#!/usr/bin/env python3
"""Write the tiny CLIP text-encoder and tokenizer fixtures of tests/clip_text.rs (run once by hand; the
output is committed).

Reference: HuggingFace transformers `CLIPTextModel` and the slow (python) `CLIPTokenizer`
(transformers==4.46.3, torch==2.5.1, CPU, eager attention; ftfy NOT installed, so the tokenizer cleans
text with its BasicTokenizer, which for the prompts below is lowercasing + whitespace collapsing, as
ftfy + whitespace_clean would be).

Text encoder: two tiny random configurations, vocab 99, hidden 32, 3 layers, 4 heads, intermediate 37,
max_position_embeddings 16, layer_norm_eps 1e-5:
  * clip_tiny_gelu:       hidden_act "gelu" (exact erf GELU, as OpenCLIP-H in SD 2.x);
  * clip_tiny_quick_gelu: hidden_act "quick_gelu" (x * sigmoid(1.702 x), as CLIP ViT-L in SD 1.x).
Every parameter is redrawn (normal, seeded) so that norms and biases all matter; the model runs in
float64 and everything is stored as float32. Files, per variant NAME:
  tests/fixtures/NAME.safetensors          the weights in HF naming (`text_model.` prefix; metadata
                                           num_attention_heads, hidden_act), loadable by
                                           `ClipTextModel::load` with `ClipTextConfig::from_file`;
  tests/fixtures/NAME_outputs.safetensors  `input_ids` [2, 16] (int64, the fixed ids below),
                                           `last_hidden_state` [2, 16, 32] (skip 0), and
                                           `penultimate` [2, 16, 32] = final_layer_norm(hidden_states[-2])
                                           (skip 1: what SD 2 takes from a 24-layer OpenCLIP-H).

Tokenizer: a synthetic byte-level BPE vocabulary built like CLIP's (the 256 byte symbols in
`bytes_to_unicode` order, then the same with `</w>`, then one token per merge, then <|startoftext|> and
<|endoftext|>), with N_MERGES merges learnt greedily (most frequent pair, ties broken by first
occurrence) from a small corpus of words such as "a photo of sks object". Files in
tests/fixtures/clip_tiny_tokenizer/: vocab.json, merges.txt (with a `#version` first line, as the real
file) and expected.json = {"max_len": 77, "pad_id": id of "!", "prompts": [{"text",
  "ids"             truncated to 77 and padded with "!" (SD 2.1),
  "ids_eos_padded"  truncated and padded with <|endoftext|> by transformers (SD 1.x),
  "ids_unpadded"    neither truncated nor padded,
  "ids_hf_bang_pad" what transformers gives with pad_token="!" (SD 2.1's tokenizer_config)}]}.
"ids" is transformers' truncated output padded with "!" by this script, not transformers' own
pad_token="!" output: that one makes "!" a special token, so a literal "!" in the prompt becomes the
pad token (id of "!") instead of "!</w>", which OpenCLIP's tokenizer (the one SD 2 was trained with)
and ours produce. The two agree on every prompt without a "!" (asserted below).

Usage: python make_tiny_clip_fixture.py [--out tests/fixtures]
  (needs: pip install torch==2.5.1 transformers==4.46.3 safetensors numpy, in a throwaway venv)
"""
import argparse
import json
import os

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

IDS = [
    [0, 97, 5, 17, 42, 42, 3, 98, 60, 11, 1, 88, 23, 50, 98, 98],
    [0, 7, 64, 31, 2, 96, 14, 9, 77, 98, 1, 1, 1, 1, 1, 1],
]

CORPUS = (
    "a photo of sks object . a photo of a sks chair , a rendering of the sks sofa . "
    "photograph of an object on a table ; a photo of the red chair . the object is a toy duck . "
    "a photo of two photos of photographs of objects"
)
N_MERGES = 48

PROMPTS = [
    "a photo of sks object",
    "A Photo of SKS Object",
    "  a   photo\tof\n sks   object  ",
    "a photo of sks, object! (rendered) 3d 2024",
    "a photo of zyxwv qqq object",
    "don't it's we're they've i'm you'll he'd",
    "sks",
    "",
    "Café sks",
    " ".join(["a photo of sks object"] * 20),  # 100 words: truncated to 77 tokens
]


def make_model(name, act, seed, out_dir):
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
                         layer_norm_eps=1e-5, attn_implementation="eager")
    torch.manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:
                p.copy_((1.0 if pname.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in pname:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model = model.double()
    ids = torch.tensor(IDS, dtype=torch.long)
    # transformers builds the causal mask with torch.full(..., finfo(float64).min) in the *default*
    # dtype, which overflows float32: run with a float64 default.
    torch.set_default_dtype(torch.float64)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        last = out.last_hidden_state
        penultimate = model.text_model.final_layer_norm(out.hidden_states[-2])
    weights = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()
               if not k.endswith("position_ids")}
    save_file(weights, os.path.join(out_dir, f"{name}.safetensors"),
              metadata={"num_attention_heads": "4", "hidden_act": act,
                        "source": f"transformers {transformers.__version__} CLIPTextModel, random"})
    save_file({"input_ids": ids.numpy(),
               "last_hidden_state": last.float().numpy(),
               "penultimate": penultimate.float().numpy()},
              os.path.join(out_dir, f"{name}_outputs.safetensors"))
    torch.set_default_dtype(torch.float32)
    print(name, "last", tuple(last.shape), "penultimate", tuple(penultimate.shape))


def learn_merges(corpus, n):
    b2u = bytes_to_unicode()
    words = {}
    for w in corpus.lower().split():
        sym = ["".join(b2u[b] for b in ch.encode("utf-8")) for ch in w]
        sym[-1] += "</w>"
        words[tuple(sym)] = words.get(tuple(sym), 0) + 1
    merges = []
    for _ in range(n):
        counts, first = {}, {}
        for w, c in words.items():
            for pair in zip(w[:-1], w[1:]):
                counts[pair] = counts.get(pair, 0) + c
                first.setdefault(pair, len(first))
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -first[p]))
        merges.append(best)
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def make_tokenizer(out_dir):
    d = os.path.join(out_dir, "clip_tiny_tokenizer")
    os.makedirs(d, exist_ok=True)
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    merges = learn_merges(CORPUS, N_MERGES)
    for a, b in merges:
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab), "duplicate tokens"
    encoder = {t: i for i, t in enumerate(vocab)}
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # Default pad token (<|endoftext|>, as SD 1.x): see the docstring for why not pad_token="!".
    tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    assert tok.fix_text is None, "ftfy is installed: the reference would differ from the documented one"
    tok_bang = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), pad_token="!")
    pad_id = encoder["!"]
    prompts = []
    for text in PROMPTS:
        eos_padded = tok(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        truncated = tok(text, max_length=77, truncation=True)["input_ids"]
        ids = truncated + [pad_id] * (77 - len(truncated))
        bang = tok_bang(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        if "!" not in text:
            assert bang == ids, text
        unpadded = tok(text)["input_ids"]
        assert len(ids) == 77 and len(eos_padded) == 77
        prompts.append({"text": text, "ids": ids, "ids_eos_padded": eos_padded, "ids_unpadded": unpadded,
                        "ids_hf_bang_pad": bang})
        print(repr(text[:40]), unpadded[:20])
    with open(os.path.join(d, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"max_len": 77, "pad_id": pad_id, "merges": len(merges), "prompts": prompts}, f,
                  ensure_ascii=False, indent=1)
    print("tokenizer:", len(vocab), "tokens,", len(merges), "merges")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    make_model("clip_tiny_gelu", "gelu", 11, args.out)
    make_model("clip_tiny_quick_gelu", "quick_gelu", 12, args.out)
    make_tokenizer(args.out)


if __name__ == "__main__":
    main()
