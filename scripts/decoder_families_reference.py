#!/usr/bin/env python3
"""Small random-weight decoders of the Llama family's relatives, and their logits from an
independent numpy implementation written the way Hugging Face's transformers computes them.

The backend's tests load each model with its native engine and check the logits and greedy
tokens against this script, which shares no code with it: numpy does the arithmetic in
float64, safetensors writes the Hugging Face folder, llama.cpp's `gguf` package writes the
GGUF file. Rotary embeddings turn the two halves of each head (Hugging Face's layout; the
GGUF for the `llama` architecture gets llama.cpp's permuted rows, Qwen2's keeps the halves),
and the frequencies are scaled here as transformers' `_compute_llama3_parameters` does.

    decoder_families_reference.py FAMILY OUT_DIR [--seed N]

FAMILY: llama3 (Llama 3 `rope_scaling`, untied head), qwen2 (q/k/v biases, tied head),
mistral (a sliding window wider than the served context), llama-bias (`attention_bias`).
Writes OUT_DIR/hf/ (config.json, model.safetensors), OUT_DIR/model.gguf (llama3, qwen2),
OUT_DIR/logits.f32 (little-endian float32, [prompt tokens, vocab]) and prints
{"prompt": [ids], "greedy": [ids], "vocab": n}.
"""

import argparse
import json
import math
import pathlib

import numpy as np
from safetensors.numpy import save_file

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 256, 64, 4, 2, 2, 96
HEAD_DIM = HIDDEN // HEADS
EPS = 1e-5
PROMPT, GREEDY = 48, 12


def families():
    return {
        "llama3": {
            "model_type": "llama",
            "rope_theta": 10000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
        },
        "qwen2": {
            "model_type": "qwen2",
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "sliding_window": 32,
            "use_sliding_window": False,
        },
        "mistral": {
            "model_type": "mistral",
            "rope_theta": 10000.0,
            "sliding_window": 512,
            "tie_word_embeddings": False,
        },
        "llama-bias": {
            "model_type": "llama",
            "rope_theta": 500000.0,
            "attention_bias": True,
            "tie_word_embeddings": False,
        },
    }


def inv_frequencies(config):
    base = config["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    scaling = config.get("rope_scaling")
    if not scaling:
        return inv
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled)


def weights(config, rng):
    def mat(rows, cols):
        return rng.normal(0, 1 / math.sqrt(cols), (rows, cols))

    kv = KV_HEADS * HEAD_DIM
    w = {"model.embed_tokens.weight": rng.normal(0, 1, (VOCAB, HIDDEN)),
         "model.norm.weight": 1 + rng.normal(0, 0.1, HIDDEN)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(VOCAB, HIDDEN)
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        w[p + "self_attn.q_proj.weight"] = mat(HIDDEN, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = mat(kv, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = mat(kv, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = mat(HIDDEN, HIDDEN)
        w[p + "mlp.gate_proj.weight"] = mat(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = mat(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = mat(HIDDEN, FFN)
        if qkv_bias:
            w[p + "self_attn.q_proj.bias"] = rng.normal(0, 0.5, HIDDEN)
            w[p + "self_attn.k_proj.bias"] = rng.normal(0, 0.5, kv)
            w[p + "self_attn.v_proj.bias"] = rng.normal(0, 0.5, kv)
        if config.get("attention_bias", False):
            w[p + "self_attn.o_proj.bias"] = rng.normal(0, 0.5, HIDDEN)
    # Stored in float32; the reference computes in float64 from the same stored values.
    return {k: v.astype(np.float32) for k, v in w.items()}


def rms_norm(x, w):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS) * w


def rotate_half(x, heads, cos, sin):
    t = x.shape[0]
    x = x.reshape(t, heads, HEAD_DIM)
    a, b = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1).reshape(t, heads * HEAD_DIM)


def forward(ids, w, config):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_frequencies(config)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    causal = np.triu(np.full((t, t), -np.inf), k=1)
    zero = np.zeros(1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        bias = lambda name: w.get(p + f"self_attn.{name}.bias", zero)  # noqa: E731
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = h @ w[p + "self_attn.q_proj.weight"].T + bias("q_proj")
        k = h @ w[p + "self_attn.k_proj.weight"].T + bias("k_proj")
        v = h @ w[p + "self_attn.v_proj.weight"].T + bias("v_proj")
        q = rotate_half(q, HEADS, cos, sin).reshape(t, HEADS, HEAD_DIM).transpose(1, 0, 2)
        k = rotate_half(k, KV_HEADS, cos, sin).reshape(t, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
        v = v.reshape(t, KV_HEADS, HEAD_DIM).transpose(1, 0, 2)
        k = np.repeat(k, HEADS // KV_HEADS, axis=0)
        v = np.repeat(v, HEADS // KV_HEADS, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(HEAD_DIM) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = (scores @ v).transpose(1, 0, 2).reshape(t, HIDDEN)
        x = x + attended @ w[p + "self_attn.o_proj.weight"].T + bias("o_proj")
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def llama_cpp_permute(rows, heads):
    """llama.cpp's converter order for the `llama` architecture: each head's halves
    interleaved into adjacent pairs."""
    shape = rows.shape
    return (rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def write_gguf(path, family, config, w):
    import gguf

    arch = "qwen2" if family == "qwen2" else "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_vocab_size(VOCAB)
    permute = (lambda rows, heads: rows) if arch == "qwen2" else llama_cpp_permute
    names = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.v_proj.bias": "attn_v.bias",
             "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    if "lm_head.weight" in w:
        writer.add_tensor("output.weight", w["lm_head.weight"])
    if config.get("rope_scaling"):
        base = 1.0 / config["rope_theta"] ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        writer.add_tensor("rope_freqs.weight",
                          (base / inv_frequencies(config)).astype(np.float32))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for hf, ours in names.items():
            if p + hf in w:
                writer.add_tensor(f"blk.{i}.{ours}", w[p + hf])
        for proj, heads in (("q", HEADS), ("k", KV_HEADS)):
            writer.add_tensor(f"blk.{i}.attn_{proj}.weight",
                              permute(w[p + f"self_attn.{proj}_proj.weight"], heads))
            if p + f"self_attn.{proj}_proj.bias" in w:
                writer.add_tensor(f"blk.{i}.attn_{proj}.bias",
                                  permute(w[p + f"self_attn.{proj}_proj.bias"], heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    args = argparse.ArgumentParser()
    args.add_argument("family", choices=sorted(families()))
    args.add_argument("out_dir", type=pathlib.Path)
    args.add_argument("--seed", type=int, default=1)
    args = args.parse_args()
    spec = families()[args.family]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": EPS,
        "max_position_embeddings": 4096,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        **spec,
    }
    rng = np.random.default_rng(args.seed)
    w = weights(config, rng)
    hf = args.out_dir / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    save_file(w, str(hf / "model.safetensors"))
    if args.family in ("llama3", "qwen2"):
        write_gguf(args.out_dir / "model.gguf", args.family, config, w)

    prompt = [int(i) for i in rng.integers(0, VOCAB, PROMPT)]
    logits = forward(prompt, w, config)
    logits.astype("<f4").tofile(args.out_dir / "logits.f32")
    tokens = list(prompt)
    greedy = []
    for _ in range(GREEDY):
        nxt = int(np.argmax(forward(tokens, w, config)[-1]))
        greedy.append(nxt)
        tokens.append(nxt)
    print(json.dumps({"prompt": prompt, "greedy": greedy, "vocab": VOCAB}))


if __name__ == "__main__":
    main()
