#!/usr/bin/env python3
"""Leave-one-collection-out accuracy of the task classifier as the gateway
runs it by default: paraphrase-MiniLM-L3-v2 (int8), its task map
(crates/smartllm-embed/src/task-map-l3.bin) applied to the whole-text and
first-32-token views, k = 7, similarity^3 votes divided by the task's number
of examples; the examples are the hand-written ones plus make_conf.py's pick
from the training file. Each training collection is classified with the
examples of all the others; accuracy is averaged per collection, then per
task. Reads nothing of heldout.tsv.

With two training files (the shipped one and one with more collections, e.g.
make_tasks.py --extra), both are scored over the first file's collections,
so the figures compare; the second is also scored over all of its own.

Needs numpy, onnxruntime and tokenizers (see task_views.py) and the assets
in $SMARTLLM_ASSETS_DIR (default ~/.cache/smartllm-assets).

    python3 data/router/tasks/loco_mapped.py [TRAIN.tsv [MORE.tsv]]
"""
import collections
import os
import sys

import numpy as np
import onnxruntime as ort
import tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_conf import pick_examples, rows  # noqa: E402

ASSETS = os.environ.get("SMARTLLM_ASSETS_DIR", os.path.expanduser("~/.cache/smartllm-assets"))
MAP = os.path.join(HERE, "..", "..", "..", "crates", "smartllm-embed", "src", "task-map-l3.bin")
K = 7

tok = tokenizers.Tokenizer.from_file(os.path.join(ASSETS, "tokenizer.json"))
tok.enable_truncation(256)
tok.no_padding()
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
opts.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
session = ort.InferenceSession(os.path.join(ASSETS, "paraphrase-l3.int8.onnx"), opts,
                               providers=["CPUExecutionProvider"])
W = np.fromfile(MAP, "<f4").reshape(384, 384)
memo = {}


def unit(v):
    return v / max(np.linalg.norm(v), 1e-12)


def task_vector(text):
    """crates/smartllm-embed's task_vector_mapped: the mapped whole and head
    views, weighted so that a dot product is (cos(whole) + 2 cos(head)) / 3."""
    if text not in memo:
        ids = np.array([tok.encode(text).ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        h = session.run(None, feed)[0][0]
        whole, head = unit(unit(h.mean(0)) @ W), unit(unit(h[:32].mean(0)) @ W)
        memo[text] = np.concatenate([whole / np.sqrt(3), head * np.sqrt(2 / 3)])
    return memo[text]


def embed(items):
    return {"labels": np.array([t for t, _, _ in items]), "sources": np.array([s for _, _, s in items]),
            "v": np.array([task_vector(p) for _, p, _ in items])}


def classify(query, examples):
    counts = collections.Counter(examples["labels"])
    out = []
    for row in query["v"] @ examples["v"].T:
        votes = collections.defaultdict(float)
        for i in np.argpartition(-row, K)[:K]:
            votes[examples["labels"][i]] += max(row[i], 0) ** 3
        out.append(max(votes, key=lambda t: votes[t] / counts[t]))
    return np.array(out)


def subset(d, mask):
    return {k: v[mask] for k, v in d.items()}


def loco(path, only=None):
    train = [tuple(r) for r in rows(path)]
    hand = [(r[0], r[1], "handwritten") for r in rows(os.path.join(HERE, "handwritten.tsv"))]
    examples, trained = embed(hand + pick_examples(train)), embed(train)
    per_task = collections.defaultdict(list)
    for src in sorted(set(trained["sources"])):
        if only is not None and src not in only:
            continue
        q = subset(trained, trained["sources"] == src)
        pred = classify(q, subset(examples, examples["sources"] != src))
        per_task[q["labels"][0]].append((pred == q["labels"]).mean())
    tasks = {t: np.mean(a) for t, a in sorted(per_task.items())}
    detail = "  ".join(f"{t} {v:.0%}" for t, v in tasks.items())
    return np.mean(list(tasks.values())), detail, {s for _, _, s in train}


def main():
    files = sys.argv[1:] or [os.path.join(HERE, "train.tsv")]
    score, detail, first = loco(files[0])
    print(f"{files[0]}: {score:.1%}  ({detail})")
    for more in files[1:]:
        score, detail, _ = loco(more, only=first)
        print(f"{more} over the first file's collections: {score:.1%}  ({detail})")
        score, detail, _ = loco(more)
        print(f"{more} over all its collections: {score:.1%}  ({detail})")


if __name__ == "__main__":
    main()
