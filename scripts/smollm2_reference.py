#!/usr/bin/env python3
"""An independent implementation of a Llama-family GGUF decoder (SmolLM2-135M-Instruct).

The backend's tests check its native Llama engine against this script, so it shares no code
with it: the `gguf` package (llama.cpp's own Python reader and dequantiser) reads and decodes
the weights, numpy does the arithmetic on the whole dequantised matrices, jinja2 (what
Hugging Face's transformers renders chat templates with) applies the chat template, and the
`tokenizers` package tokenizes from a tokenizer.json assembled from the GGUF vocabulary the
way Hugging Face's file for SmolLM2 describes it. No key/value cache: every step recomputes
the whole sequence, so a cache bug in the engine cannot be mirrored here.

    smollm2_reference.py MODEL.gguf OUT_DIR [--dtype float32|float64] < request.json

stdin: {"chats": [[{"role": .., "content": ..}, ...], ...], "greedy_tokens": N}.
For chat i, writes OUT_DIR/logits-i.f32 (little-endian float32, [prompt tokens, vocab], each
position's next-token logits); prints {"vocab": int, "chats": [{"prompt": str, "tokens":
[int...], "greedy": [int...]}, ...]}, with each greedy continuation stopping early at the
end-of-turn token.
"""

import argparse
import json
import pathlib
import sys

import jinja2
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer


def field(reader, key):
    return reader.fields[key].contents()


def load(path, dtype):
    reader = GGUFReader(path)
    weights = {}
    for t in reader.tensors:
        # dequantize gives [rows, row length] in GGML order: [out, in] for a weight matrix.
        w = dequantize(t.data, t.tensor_type)
        weights[t.name] = np.asarray(w, dtype=dtype).reshape([int(d) for d in reversed(t.shape)])
    config = {
        "layers": field(reader, "llama.block_count"),
        "heads": field(reader, "llama.attention.head_count"),
        "kv_heads": field(reader, "llama.attention.head_count_kv"),
        "eps": field(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_base": field(reader, "llama.rope.freq_base"),
    }
    return reader, weights, config


def tokenizer_from(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    spec = {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": list(field(reader, "tokenizer.ggml.merges"))},
    }
    return Tokenizer.from_str(json.dumps(spec))


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def rope(x, heads, base):
    """Turns adjacent pairs (2i, 2i+1) of each head by position * base^(-2i/head_dim)."""
    t, width = x.shape
    hd = width // heads
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    x = x.reshape(t, heads, hd // 2, 2)
    a, b = x[..., 0], x[..., 1]
    out = np.stack([a * cos[:, None, :] - b * sin[:, None, :],
                    a * sin[:, None, :] + b * cos[:, None, :]], axis=-1)
    return out.reshape(t, width)


def forward(ids, w, c):
    dtype = w["output_norm.weight"].dtype
    x = w["token_embd.weight"][ids]
    t = len(ids)
    heads, kv_heads = c["heads"], c["kv_heads"]
    causal = np.triu(np.full((t, t), -np.inf, dtype=dtype), k=1)
    for i in range(c["layers"]):
        p = f"blk.{i}."
        h = rms_norm(x, w[p + "attn_norm.weight"], c["eps"])
        q = rope(h @ w[p + "attn_q.weight"].T, heads, c["rope_base"])
        k = rope(h @ w[p + "attn_k.weight"].T, kv_heads, c["rope_base"])
        v = h @ w[p + "attn_v.weight"].T
        hd = q.shape[1] // heads
        q = q.reshape(t, heads, hd).transpose(1, 0, 2)
        # Grouped-query attention: query head h reads key/value head h // (heads / kv_heads).
        k = np.repeat(k.reshape(t, kv_heads, hd).transpose(1, 0, 2), heads // kv_heads, axis=0)
        v = np.repeat(v.reshape(t, kv_heads, hd).transpose(1, 0, 2), heads // kv_heads, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(dtype.type(hd)) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = (scores @ v).transpose(1, 0, 2).reshape(t, heads * hd)
        x = x + attended @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], c["eps"])
        gate = h @ w[p + "ffn_gate.weight"].T
        up = h @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    x = rms_norm(x, w["output_norm.weight"], c["eps"])
    head = w.get("output.weight", w["token_embd.weight"])
    return x @ head.T


def main():
    args = argparse.ArgumentParser()
    args.add_argument("model")
    args.add_argument("out_dir", type=pathlib.Path)
    args.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = args.parse_args()
    request = json.load(sys.stdin)
    reader, weights, config = load(args.model, np.dtype(args.dtype))
    template = jinja2.Environment().from_string(field(reader, "tokenizer.chat_template"))
    tokenizer = tokenizer_from(reader)
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, messages in enumerate(request["chats"]):
        prompt = template.render(messages=messages, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        logits = forward(np.array(ids), weights, config)
        logits.astype("<f4").tofile(args.out_dir / f"logits-{i}.f32")
        greedy, seq = [], list(ids)
        next_id = int(np.argmax(logits[-1]))
        for _ in range(request.get("greedy_tokens", 0)):
            greedy.append(next_id)
            if next_id == eos:
                break
            seq.append(next_id)
            next_id = int(np.argmax(forward(np.array(seq), weights, config)[-1]))
        results.append({"prompt": prompt, "tokens": ids, "greedy": greedy})
    json.dump({"vocab": weights["token_embd.weight"].shape[0], "chats": results}, sys.stdout)

if __name__ == "__main__":
    main()
