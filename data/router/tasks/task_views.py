#!/usr/bin/env python3
"""How the task classifier's task vectors were chosen (bench/README.md,
"Task classifier on real prompts").

Embeds the shipped examples (as make_conf.py picks them), train.tsv and
heldout.tsv with the gateway's model file (onnxruntime, one text per run, 256
tokens), keeps per text the mean of all token states ("whole") and the means
of the first / last N tokens ("headN" / "tailN"), and scores weighted
combinations of their cosines with the gateway's vote (k=7, similarity^3,
votes divided by the task's number of examples) by leave-one-collection-out
over the training collections: each collection classified with the examples
of all the others, accuracy averaged per collection, then per task. Only the
winner is run on heldout.tsv, with --heldout.

Needs numpy, onnxruntime and tokenizers (e.g. the quantiser's venv of
packaging/fetch-assets.sh plus `pip install tokenizers`) and the assets in
$SMARTLLM_ASSETS_DIR (default ~/.cache/smartllm-assets).

    python3 data/router/tasks/task_views.py [--heldout]
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
SIZES = (4, 8, 16, 32)
SHIPPED = {"whole": 1, "head32": 2}

tok = tokenizers.Tokenizer.from_file(os.path.join(ASSETS, "tokenizer.json"))
tok.enable_truncation(256)
tok.no_padding()
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
opts.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
session = ort.InferenceSession(os.path.join(ASSETS, "model.int8.onnx"), opts, providers=["CPUExecutionProvider"])


def unit(v):
    return v / max(np.linalg.norm(v), 1e-12)


def views(text):
    ids = np.array([tok.encode(text).ids], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    h = session.run(None, feed)[0][0]
    out = {"whole": unit(h.mean(0))}
    for k in SIZES:
        out[f"head{k}"] = unit(h[:k].mean(0))
        out[f"tail{k}"] = unit(h[-k:].mean(0))
    return out


def embed(items):
    v = collections.defaultdict(list)
    for _, prompt, _ in items:
        for k, x in views(prompt).items():
            v[k].append(x)
    return {
        "labels": np.array([t for t, _, _ in items]),
        "sources": np.array([s for _, _, s in items]),
        **{k: np.array(x) for k, x in v.items()},
    }


def classify(query, examples, weights, k=7):
    sims = sum(w * (query[v] @ examples[v].T) for v, w in weights.items()) / sum(weights.values())
    counts = collections.Counter(examples["labels"])
    out = []
    for row in sims:
        votes = collections.defaultdict(float)
        for i in np.argpartition(-row, k)[:k]:
            votes[examples["labels"][i]] += max(row[i], 0) ** 3
        out.append(max(votes, key=lambda t: votes[t] / counts[t]))
    return np.array(out)


def subset(d, mask):
    return {k: v[mask] for k, v in d.items()}


def loco(train, examples, weights):
    per_task = collections.defaultdict(list)
    for src in sorted(set(train["sources"])):
        q = subset(train, train["sources"] == src)
        pred = classify(q, subset(examples, examples["sources"] != src), weights)
        per_task[q["labels"][0]].append((pred == q["labels"]).mean())
    return np.mean([np.mean(a) for a in per_task.values()])


def main():
    train = [tuple(r) for r in rows(os.path.join(HERE, "train.tsv"))]
    ex = [(r[0], r[1], "handwritten") for r in rows(os.path.join(HERE, "handwritten.tsv"))]
    ex.extend(pick_examples(train))
    examples, trained = embed(ex), embed(train)
    candidates = [{"whole": 1}]
    for h in SIZES:
        for t in (0,) + SIZES:
            for w in (0.5, 1, 2):
                c = {"whole": 1, f"head{h}": w}
                if t:
                    c[f"tail{t}"] = w
                candidates.append(c)
    scored = sorted(((loco(trained, examples, c), c) for c in candidates), key=lambda x: -x[0])
    for score, c in scored[:8]:
        print(f"leave-one-collection-out {score:.3f}  {c}")
    print(f"leave-one-collection-out {loco(trained, examples, {'whole': 1}):.3f}  whole only")
    if "--heldout" in sys.argv:
        held = embed([tuple(r) for r in rows(os.path.join(HERE, "heldout.tsv"))])
        for c in ({"whole": 1}, SHIPPED):
            pred = classify(held, examples, c)
            print(f"heldout {np.mean(pred == held['labels']):.3f}  {c}")


if __name__ == "__main__":
    main()
