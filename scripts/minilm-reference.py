"""Reference embeddings for all-MiniLM-L6-v2, computed independently of
Kiln and candle: the BERT forward pass written out in float64 numpy (no
torch), mean pooling over tokens, L2 normalisation, as sentence-transformers
does for this model. Writes tests/fixtures/minilm_reference.json, which the
MiniLM tests compare Kiln's answers against (cosine distance < 1e-4).

    scripts/fetch-minilm.sh
    .venv/bin/pip install numpy safetensors tokenizers
    .venv/bin/python scripts/minilm-reference.py
"""

import json
import math
import pathlib

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "minilm" / "1"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model

SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "Kiln batches requests within each model's latency budget.",
    "Ok",
    "The quick brown fox jumps over the lazy dog, while the five boxing wizards jump quickly "
    "and a wizard's job is to vex chumps quickly in fog; meanwhile, pack my box with five dozen "
    "liquor jugs, because sphinx of black quartz, judge my vow.",
    "Überraschung: naïve café façades in Zürich cost €12.50!",
]

config = json.loads((MODEL / "config.json").read_text())
weights = {k: v.astype(np.float64) for k, v in load_file(str(MODEL / "model.safetensors")).items()}
tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
tokenizer.no_padding()
tokenizer.enable_truncation(MAX_TOKENS)

heads = config["num_attention_heads"]
eps = config["layer_norm_eps"]
erf = np.vectorize(math.erf)


def w(name):
    return weights[name]


def linear(x, prefix):
    return x @ w(prefix + ".weight").T + w(prefix + ".bias")


def layer_norm(x, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w(prefix + ".weight") + w(prefix + ".bias")


def gelu(x):
    # The exact (erf) GELU that BERT's "gelu" means.
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def embed(ids):
    n = len(ids)
    x = w("embeddings.word_embeddings.weight")[ids]
    x = x + w("embeddings.position_embeddings.weight")[:n]
    x = x + w("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, "embeddings.LayerNorm")
    d = x.shape[1] // heads
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q = linear(x, p + ".attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = linear(x, p + ".attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = linear(x, p + ".attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attention = scores / scores.sum(-1, keepdims=True)
        context = (attention @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = layer_norm(linear(context, p + ".attention.output.dense") + x, p + ".attention.output.LayerNorm")
        hidden = gelu(linear(x, p + ".intermediate.dense"))
        x = layer_norm(linear(hidden, p + ".output.dense") + x, p + ".output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


fixture = []
for sentence in SENTENCES:
    ids = tokenizer.encode(sentence).ids
    fixture.append({"text": sentence, "tokens": len(ids), "embedding": [float(v) for v in embed(ids)]})

out = ROOT / "tests" / "fixtures" / "minilm_reference.json"
out.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "max_tokens": MAX_TOKENS, "sentences": fixture}, indent=1) + "\n")
print(f"wrote {out}: {len(fixture)} sentences, dims {len(fixture[0]['embedding'])}")
