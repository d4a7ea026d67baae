#!/usr/bin/env python3
"""An independent float64 implementation of all-MiniLM-L6-v2 sentence embeddings.

The end-to-end test checks sluice-backend's native engine against this script, so it shares
no code with it: numpy for the arithmetic, the `safetensors` package for the weights, the
`tokenizers` package (Hugging Face's own Python bindings) for tokenizing. It computes what
sentence-transformers computes for this model: BERT (post-norm, exact erf GELU), mean pooling
over the tokens, L2 normalisation; without padding or truncation, as the backend reads inputs.

    minilm_reference.py MODEL_DIR < sentences.json > embeddings.json

stdin: a JSON array of strings. stdout: {"embeddings": [[float, ...], ...], "tokens": [int, ...]},
with each input's token count ([CLS] and [SEP] included).
"""

import json
import math
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

erf = np.vectorize(math.erf, otypes=[np.float64])


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def main():
    folder = pathlib.Path(sys.argv[1])
    config = json.loads((folder / "config.json").read_text())
    raw = load_file(str(folder / "model.safetensors"))
    weights = {}
    for name, value in raw.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue  # embeddings.position_ids is an integer buffer, not a weight
        weights[name.removeprefix("bert.")] = value.astype(np.float64)

    def w(name):
        return weights[name]

    def linear(x, name):
        return x @ w(f"{name}.weight").T + w(f"{name}.bias")

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = config.get("layer_norm_eps", 1e-12)

    sentences = json.load(sys.stdin)
    embeddings, counts = [], []
    for sentence in sentences:
        ids = tokenizer.encode(sentence).ids
        n = len(ids)
        x = (
            w("embeddings.word_embeddings.weight")[ids]
            + w("embeddings.position_embeddings.weight")[:n]
            + w("embeddings.token_type_embeddings.weight")[0]
        )
        x = layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
        for layer in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{layer}"
            q = linear(x, f"{p}.attention.self.query").reshape(n, heads, head_dim).transpose(1, 0, 2)
            k = linear(x, f"{p}.attention.self.key").reshape(n, heads, head_dim).transpose(1, 0, 2)
            v = linear(x, f"{p}.attention.self.value").reshape(n, heads, head_dim).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
            attended = linear(context, f"{p}.attention.output.dense") + x
            x = layer_norm(
                attended,
                w(f"{p}.attention.output.LayerNorm.weight"),
                w(f"{p}.attention.output.LayerNorm.bias"),
                eps,
            )
            inner = linear(x, f"{p}.intermediate.dense")
            inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
            out = linear(inner, f"{p}.output.dense") + x
            x = layer_norm(
                out, w(f"{p}.output.LayerNorm.weight"), w(f"{p}.output.LayerNorm.bias"), eps
            )
        pooled = x.mean(axis=0)
        pooled = pooled / max(np.linalg.norm(pooled), 1e-12)
        embeddings.append(pooled.tolist())
        counts.append(n)
    json.dump({"embeddings": embeddings, "tokens": counts}, sys.stdout)


if __name__ == "__main__":
    main()
