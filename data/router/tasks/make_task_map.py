#!/usr/bin/env python3
"""Fit the default embedding model's task map
(crates/smartllm-embed/src/task-map-l3.bin; bench/README.md, "The 3-layer
model is the default").

paraphrase-MiniLM-L3-v2, the default embedder, was tuned on paraphrases: its
vectors say what a text is about more than what it asks for, and the task
classifier's leave-one-collection-out accuracy fell from 57.5% (all-MiniLM-L6)
to 50.1% on it. The task map is a linear map (384 x 384, ridge regression,
lambda 1) from its unit-length views (whole text and head, the same map for
both) to all-MiniLM-L6-v2's views of the same texts. The classifier compares
mapped views: 56.3% by the same measure, with no second model run.

The texts are the shipped examples (hand-written plus those make_conf.py
picks) and every prompt of train.tsv; no label is read, and nothing from
heldout.tsv. Both models run as the gateway runs them (onnxruntime, one text
per run, 256 tokens). Writes 384 x 384 little-endian float32, row-major: a
view x (row vector) maps to x @ W.

Needs numpy, onnxruntime and tokenizers (see task_views.py) and the assets in
$SMARTLLM_ASSETS_DIR (default ~/.cache/smartllm-assets).

    python3 data/router/tasks/make_task_map.py          # ~15 minutes on 2 cores
"""
import os
import sys

import numpy as np
import onnxruntime as ort
import tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_conf import pick_examples, rows  # noqa: E402

ASSETS = os.environ.get("SMARTLLM_ASSETS_DIR", os.path.expanduser("~/.cache/smartllm-assets"))
OUT = os.path.join(HERE, "..", "..", "..", "crates", "smartllm-embed", "src", "task-map-l3.bin")
HEAD = 32
LAMBDA = 1.0


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def views(model, texts):
    tok = tokenizers.Tokenizer.from_file(os.path.join(ASSETS, "tokenizer.json"))
    tok.enable_truncation(256)
    tok.no_padding()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    s = ort.InferenceSession(os.path.join(ASSETS, model), opts, providers=["CPUExecutionProvider"])
    whole, head = [], []
    for t in texts:
        ids = np.array([tok.encode(t).ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        h = s.run(None, feed)[0][0]
        whole.append(h.mean(0))
        head.append(h[:HEAD].mean(0))
    return np.vstack([unit(np.array(whole)), unit(np.array(head))])


def main():
    train = [tuple(r) for r in rows(os.path.join(HERE, "train.tsv"))]
    ex = [(r[0], r[1], "handwritten") for r in rows(os.path.join(HERE, "handwritten.tsv"))]
    ex.extend(pick_examples(train))
    texts = [p for _, p, _ in ex + train]
    x = views("paraphrase-l3.int8.onnx", texts)
    y = views("model.int8.onnx", texts)
    w = np.linalg.solve(x.T @ x + LAMBDA * np.eye(x.shape[1]), x.T @ y).astype("<f4")
    with open(OUT, "wb") as f:
        f.write(w.tobytes())
    fit = np.mean(np.sum(unit(x @ w) * y, axis=1))
    print(f"wrote {os.path.normpath(OUT)}: {w.shape}, mean cosine of mapped to target views {fit:.3f}")


if __name__ == "__main__":
    main()
