#!/usr/bin/env python3
"""Reference vectors for the local embedder, computed independently of the Rust code.

An all-MiniLM-L6-v2 sentence embedding written from the published definitions with numpy only (pinned in
tests/python/requirements.txt), in float64:
  - tokenizer: BERT's original WordPiece algorithm (google-research/bert tokenization.py: clean text, split CJK
    characters, lower-case, strip accents, split punctuation, greedy longest-match WordPiece over vocab read from the
    model's own tokenizer.json), [CLS] ... [SEP], cut at 256 tokens as sentence-transformers' max_seq_length;
  - encoder: BERT (embeddings + LayerNorm, 6 x [self-attention, residual + LayerNorm, erf-GELU FFN, residual +
    LayerNorm]) on the model.safetensors weights, parsed here from the safetensors layout;
  - sentence-transformers' mean pooling over the attention mask and L2 normalisation.

Usage: minilm_reference.py MODEL_DIR [OUT.json]
Writes {"model", "texts", "token_ids", "vectors"} (to stdout without OUT). The Rust test
`crates/embed/tests/local_model.rs` compares the Rust embedder with the committed output
(tests/fixtures/minilm_reference.json) and, when AURA_TEST_PYTHON is set, with a fresh run of this script.
"""

import json
import math
import struct
import sys
import unicodedata

import numpy as np

MAX_TOKENS = 256

TEXTS = [
    "Feeling anxious about the project deadline at work",
    "Went for a 30 minute run in the park, felt great afterwards",
    "Slept badly again; tired and irritable all day.",
    "Café con mis amigos: ¡qué tarde tan bonita! Mañana más.",
    "User: user-003 | Mood Score: 4/10 | Mood Tags: stressed, tired | Notes: Deadline pressure at work",
    "naïve résumé 東京 emoji 🙂 and an unknownwordthatislongerthanusual",
    # Longer than the model's 256-token window: cut there, as sentence-transformers does.
    " ".join(f"sentence {i} about gardening, tomatoes and the weather in spring." for i in range(60)),
]


# --- tokenizer (BERT's original algorithm) -------------------------------------------------------------------------

def is_whitespace(ch):
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def is_control(ch):
    if ch in ("\t", "\n", "\r"):
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def is_cjk(cp):
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def basic_tokens(text):
    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or is_control(ch):
            continue
        cleaned.append(" " if is_whitespace(ch) else ch)
    spaced = []
    for ch in cleaned:
        if is_cjk(ord(ch)):
            spaced.extend([" ", ch, " "])
        else:
            spaced.append(ch)
    tokens = []
    for word in "".join(spaced).split():
        word = word.lower()
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        current = []
        for ch in word:
            if is_punctuation(ch):
                if current:
                    tokens.append("".join(current))
                    current = []
                tokens.append(ch)
            else:
                current.append(ch)
        if current:
            tokens.append("".join(current))
    return tokens


def wordpiece(word, vocab):
    if len(word) > 100:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end, found = len(word), None
        while start < end:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                found = piece
                break
            end -= 1
        if found is None:
            return ["[UNK]"]
        pieces.append(found)
        start = end
    return pieces


def tokenize(text, vocab):
    pieces = [p for word in basic_tokens(text) for p in wordpiece(word, vocab)]
    ids = [vocab["[CLS]"]] + [vocab[p] for p in pieces][: MAX_TOKENS - 2] + [vocab["[SEP]"]]
    return ids


# --- encoder --------------------------------------------------------------------------------------------------------

def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    body = data[8 + header_len :]
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        start, end = meta["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype="<f4").reshape(meta["shape"]).astype(np.float64)
    return tensors


def layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


ERF = np.vectorize(math.erf)


def encode(ids, t, config):
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    d = hidden // heads
    eps = config["layer_norm_eps"]
    n = len(ids)
    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][:n]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)

    def lin(v, name):
        return v @ t[name + ".weight"].T + t[name + ".bias"]

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q = lin(x, p + ".attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(x, p + ".attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(x, p + ".attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = layer_norm(
            x + lin(context, p + ".attention.output.dense"),
            t[p + ".attention.output.LayerNorm.weight"],
            t[p + ".attention.output.LayerNorm.bias"],
            eps,
        )
        h = lin(x, p + ".intermediate.dense")
        h = 0.5 * h * (1.0 + ERF(h / math.sqrt(2.0)))
        x = layer_norm(
            x + lin(h, p + ".output.dense"),
            t[p + ".output.LayerNorm.weight"],
            t[p + ".output.LayerNorm.bias"],
            eps,
        )
    pooled = x.mean(axis=0)
    return pooled / np.linalg.norm(pooled)


# sentence-transformers' README (quickstart, all-MiniLM-L6-v2): model.similarity of these three sentences.
PUBLISHED = (
    ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."],
    {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411},
)


def main():
    model_dir = sys.argv[1]
    with open(f"{model_dir}/config.json") as f:
        config = json.load(f)
    with open(f"{model_dir}/tokenizer.json") as f:
        vocab = json.load(f)["model"]["vocab"]
    tensors = load_safetensors(f"{model_dir}/model.safetensors")
    # This implementation and these weights reproduce the similarities sentence-transformers publishes.
    sentences, expected = PUBLISHED
    published = [encode(tokenize(s, vocab), tensors, config) for s in sentences]
    for (a, b), similarity in expected.items():
        got = float(published[a] @ published[b])
        if abs(got - similarity) > 5e-4:
            sys.exit(f"similarity of {sentences[a]!r} and {sentences[b]!r} is {got:.4f}; published {similarity}")
    token_ids = [tokenize(text, vocab) for text in TEXTS]
    vectors = [[round(float(v), 7) for v in encode(ids, tensors, config)] for ids in token_ids]
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "texts": TEXTS,
        "token_ids": token_ids,
        "vectors": vectors,
    }
    text = json.dumps(out, ensure_ascii=False, indent=1) + "\n"
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
