#!/usr/bin/env python3
"""Converts a Llama-family GGUF file into a Hugging Face Llama model folder.

Sluice's tests use this as an independent fixture generator: from one GGUF file (such as
SmolLM2-135M-Instruct's) it makes the Hugging Face folder the backend's safetensors loader
reads, so both loaders can be checked against each other on the same weights. It shares no
code with the backend: the `gguf` package (llama.cpp's own reader and dequantiser) reads the
file and the `tokenizers` package builds tokenizer.json.

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype f32|f16|bf16] [--tokenizer-only]

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json into OUT_DIR (created if missing; existing files are overwritten).
Every tensor is dequantised to float32 first, then cast to --dtype (default f32).
--tokenizer-only writes tokenizer.json alone (a reference for token counts), reading no tensor.
"""

import argparse
import json
import pathlib
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens such as <|im_start|>

# --dtype -> (safetensors dtype, config.json torch_dtype)
DTYPES = {"f32": ("F32", "float32"), "f16": ("F16", "float16"), "bf16": ("BF16", "bfloat16")}

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def field(reader, key, default=None):
    return reader.fields[key].contents() if key in reader.fields else default


def as_float32_decimal(value):
    # GGUF stores these as float32; the shortest decimal that round-trips as float32 gives
    # back the original config's value (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def hf_name(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"


def unpermute_rope_rows(w, n_head):
    """Undoes the row permutation llama.cpp's convert_hf_to_gguf.py applies to q/k weights.

    Hugging Face's Llama rotates the two halves of each head (rotate-half RoPE); llama.cpp
    rotates adjacent pairs. So the converter reordered each head's rows from [first half,
    second half] to interleaved pairs: w.reshape(n_head, 2, head_dim // 2, in)
    .swapaxes(1, 2), which moves HF row (head, half, i) to GGUF row (head, i, half). Reading
    GGUF rows as (head, i, half) and swapping the last two axes back puts each row at
    (head, half, i) again, so this is the exact inverse: a pure reordering of rows, no
    arithmetic.
    """
    out, n_in = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, n_in).swapaxes(1, 2).reshape(out, n_in)


def load_tensors(reader, heads, kv_heads):
    tensors = {}
    for t in reader.tensors:
        # dequantize gives [rows, row length]; GGUF lists dims innermost first, so the numpy
        # shape is the GGUF shape reversed: [out, in] for a weight matrix, as PyTorch stores it.
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, kv_heads)
        tensors[hf_name(t.name)] = w
    return tensors


def to_bytes(w, dtype):
    if dtype == "f32":
        return w.astype("<f4").tobytes()
    if dtype == "f16":
        return w.astype("<f2").tobytes()
    # numpy has no bfloat16: keep the upper 16 bits of each float32, rounding to nearest
    # even. The carry out of the low half is only wrong for NaN, which weights never hold.
    assert np.isfinite(w).all(), "bf16 rounding assumes finite weights"
    bits = np.ascontiguousarray(w, dtype="<f4").view("<u4")
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return rounded.astype("<u2").tobytes()


def save_safetensors(tensors, path, dtype):
    """Writes the safetensors format directly, since numpy cannot hold bf16."""
    header, blobs, offset = {}, [], 0
    for name, w in tensors.items():
        blob = to_bytes(w, dtype)
        header[name] = {"dtype": DTYPES[dtype][0], "shape": list(w.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Readers expect the data to start 8-byte aligned; the format pads the header with spaces.
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def build_tokenizer(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens are already in the vocabulary, so adding them keeps their ids; as added
    # tokens they are matched whole before BPE runs instead of being split into pieces.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN])
    moved = [t for i, t in enumerate(tokens) if tokenizer.token_to_id(t) != i]
    assert not moved, f"token ids changed for {moved[:5]}"
    return tokenizer, tokens


def write_json(path, value):
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def main():
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("gguf_file")
    args.add_argument("out_dir", type=pathlib.Path)
    args.add_argument("--dtype", choices=list(DTYPES), default="f32")
    args.add_argument("--tokenizer-only", action="store_true")
    args = args.parse_args()

    reader = GGUFReader(args.gguf_file)
    if args.tokenizer_only:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        build_tokenizer(reader)[0].save(str(args.out_dir / "tokenizer.json"))
        return
    arch = field(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"gguf_to_hf.py: architecture {arch!r} is not llama")
    heads = field(reader, "llama.attention.head_count")
    kv_heads = field(reader, "llama.attention.head_count_kv", heads)
    context = field(reader, "llama.context_length")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")

    tensors = load_tensors(reader, heads, kv_heads)
    tokenizer, tokens = build_tokenizer(reader)
    assert tensors["model.embed_tokens.weight"].shape[0] == len(tokens)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, args.out_dir / "model.safetensors", args.dtype)
    tokenizer.save(str(args.out_dir / "tokenizer.json"))
    write_json(args.out_dir / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": field(reader, "llama.embedding_length"),
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": as_float32_decimal(
            field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": as_float32_decimal(field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": context,
        "vocab_size": len(tokens),
        # Without its own output matrix the model reuses the embeddings as its head.
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": DTYPES[args.dtype][1],
        "hidden_act": "silu",
    })
    write_json(args.out_dir / "tokenizer_config.json", {
        "chat_template": field(reader, "tokenizer.chat_template"),
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": context,
        "tokenizer_class": "GPT2Tokenizer",
    })
    write_json(args.out_dir / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})


if __name__ == "__main__":
    main()
