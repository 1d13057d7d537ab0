#!/usr/bin/env python3
"""Train the semantic cache's verifier (crates/smartllm-cache/src/verifier-l3.json
for the default embedding model, verifier.json for all-MiniLM-L6-v2 with --model l6).

The verifier scores a would-be semantic hit from how the two prompts' tokens
align (see crates/smartllm-cache/src/verify.rs). Its training data are the
features the gateway itself computes, dumped by the real binary:

    smartllm cache eval --config conf --pairs data/cache-eval/train.tsv  --features-out /tmp/train.tsv
    smartllm cache eval --config conf --pairs data/cache-eval/tuning.tsv --features-out /tmp/tuning.tsv
    python3 -m venv /tmp/vv && /tmp/vv/bin/pip install numpy==2.4.6 scikit-learn==1.9.1
    /tmp/vv/bin/python data/cache-eval/train_verifier.py /tmp/train.tsv /tmp/tuning.tsv

The features come from the embedding model the config names (the default,
paraphrase-MiniLM-L3-v2, writes verifier-l3.json; for all-MiniLM-L6-v2 dump
them with `embedder.model: model.int8.onnx` and pass `--model l6`).

train.tsv (make_train.py) and tuning.tsv are its only inputs; heldout.tsv is
never read. It prints cross-validated figures on tuning (5 folds grouped by
first text: each fold scored by a model trained on train.tsv and the other
folds) for each cosine gate and pass score, then trains the shipped model on
everything and writes it. Only pairs the verifier would see count: cosine >=
0.70 and the precision guard passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import GroupKFold

FEATURES = [
    "cosine", "mean_alignment", "worst_alignment", "second_worst_alignment",
    "fourth_worst_alignment", "share_below_0_6", "share_below_0_8",
    "worst_pair_similarity", "worst_pair_offset", "unmatched_fewer_side",
    "unmatched_more_side", "order_kept", "length_ratio",
]
MIN_COSINE = 0.70
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "crates", "smartllm-cache", "src")
MODELS = {
    "l3": ("verifier-l3.json", "int8 paraphrase-MiniLM-L3-v2 (paraphrase-l3.int8.onnx)"),
    "l6": ("verifier.json", "int8 all-MiniLM-L6-v2 (model.int8.onnx)"),
}


# Tuning pairs added for calibration only (real SQuAD rewrites and
# look-alikes, 2026-11-30): never trained on, so that `cache calibrate`
# judges the verifier on pairs it has not seen.
CALIBRATION_ONLY = {"squad-rewrites", "squad-dev"}


def load(path):
    rows = []
    n = len(FEATURES)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert header[: len(FEATURES)] == FEATURES, header
        for line in f:
            c = line.rstrip("\n").split("\t")
            if c[n + 3] not in CALIBRATION_ONLY:
                rows.append(c)
    X = np.array([[float(x) for x in r[:n]] for r in rows], dtype=np.float32)
    guard = np.array([r[n] == "1" for r in rows])
    y = np.array([int(r[n + 1]) for r in rows])
    cats = [r[n + 2] for r in rows]
    groups = [r[n + 4] for r in rows]
    return X, guard, y, cats, groups


def model():
    return HistGradientBoostingClassifier(
        max_depth=3, max_iter=150, learning_rate=0.05, min_samples_leaf=20,
        l2_regularization=1.0, random_state=16,
    )


def export(m) -> dict:
    trees = []
    for (p,) in m._predictors:
        nodes = []
        for n in p.nodes:
            if n["is_leaf"]:
                nodes.append({"leaf": True, "value": round(float(n["value"]), 7)})
            else:
                nodes.append({
                    "leaf": False, "feature": int(n["feature_idx"]),
                    "threshold": float(n["num_threshold"]),
                    "left": int(n["left"]), "right": int(n["right"]),
                })
        trees.append(nodes)
    return {"baseline": float(np.ravel(m._baseline_prediction)[0]), "trees": trees}


def raw_score(doc, X):
    out = np.full(len(X), doc["baseline"])
    for tree in doc["trees"]:
        for k, x in enumerate(X):
            i = 0
            while not tree[i]["leaf"]:
                n = tree[i]
                i = n["left"] if x[n["feature"]] <= n["threshold"] else n["right"]
            out[k] += tree[i]["value"]
    return 1 / (1 + np.exp(-out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train")
    ap.add_argument("tuning")
    ap.add_argument("--model", choices=sorted(MODELS), default="l3",
                    help="the embedding model the features were dumped with")
    ap.add_argument("--out", help="default: the shipped file for --model")
    args = ap.parse_args()
    out_file, model_name = MODELS[args.model]
    args.out = args.out or os.path.join(SRC, out_file)
    Xt, gt, yt, cats_t, groups_t = load(args.train)
    X, g, y, cats, groups = load(args.tuning)
    keep_t = gt & (Xt[:, 0] >= MIN_COSINE)
    keep = g & (X[:, 0] >= MIN_COSINE)
    print(f"train: {keep_t.sum()} of {len(yt)} pairs reach the verifier; tuning: {keep.sum()} of {len(y)}")

    # Out-of-fold scores on tuning.
    oof = np.zeros(len(y))
    idx = np.flatnonzero(keep)
    for tr, te in GroupKFold(5).split(idx, y[idx], [groups[i] for i in idx]):
        m = model().fit(np.vstack([Xt[keep_t], X[idx[tr]]]), np.concatenate([yt[keep_t], y[idx[tr]]]))
        oof[idx[te]] = m.predict_proba(X[idx[te]])[:, 1]
    dups, traps = (y == 1).sum(), (y == 0).sum()
    print("cross-validated on tuning (guard + cosine gate + pass score; the exact stage not counted):")
    print("gate  pass  dup_served  trap_rate")
    for gate in (0.70, 0.75, 0.80, 0.85, 0.90, 0.95):
        for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            served = keep & (X[:, 0] >= gate) & (oof >= p)
            print(f"{gate:.2f}  {p:.2f}  {(served & (y == 1)).sum() / dups:10.3f}  {(served & (y == 0)).sum() / traps:9.3f}")

    # Out-of-fold over train + tuning together (5 folds grouped by first
    # text): the share of each category's pairs the verifier keeps, among
    # those that reach it at each gate. This is what the pass score is read
    # off, since tuning alone has almost no real traps past the guard.
    Xa = np.vstack([Xt, X])
    ya = np.concatenate([yt, y])
    ka = np.concatenate([keep_t, keep])
    ca = np.array(list(cats_t) + list(cats))
    ga = np.array(list(groups_t) + list(groups))
    ia = np.flatnonzero(ka)
    oof_all = np.zeros(len(ya))
    for tr, te in GroupKFold(5).split(ia, ya[ia], ga[ia]):
        m = model().fit(Xa[ia[tr]], ya[ia[tr]])
        oof_all[ia[te]] = m.predict_proba(Xa[ia[te]])[:, 1]
    shown = [c for c in ("near-repeat", "paraphrase", "related", "twin") if (ca == c).any()]
    for gate in (0.70, 0.75, 0.80):
        reach = ka & (Xa[:, 0] >= gate)
        print(f"cross-validated over train + tuning, gate {gate:.2f}: share kept among the pairs that reach the verifier")
        print("pass  " + "  ".join(f"{c}({(reach & (ca == c)).sum()})" for c in shown) + "  other-traps")
        for p in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            kept = reach & (oof_all >= p)
            cells = [f"{(kept & (ca == c)).sum() / max(1, (reach & (ca == c)).sum()):.3f}" for c in shown]
            other = reach & (ya == 0) & ~np.isin(ca, shown)
            cells.append(f"{(kept & other).sum() / max(1, other.sum()):.3f}")
            print(f"{p:.2f}  " + "  ".join(cells))

    # The shipped model: everything.
    m = model().fit(np.vstack([Xt[keep_t], X[keep]]), np.concatenate([yt[keep_t], y[keep]]))
    doc = {
        "about": (
            "gradient-boosted trees (scikit-learn HistGradientBoosting, depth 3, "
            f"{m.n_iter_} trees) over token-alignment features of the {model_name} "
            "model; trained by data/cache-eval/train_verifier.py on data/cache-eval/train.tsv "
            "and tuning.tsv (pairs with cosine >= 0.70 that pass the precision guard); "
            "heldout.tsv never read"
        ),
        "features": FEATURES,
    }
    doc.update(export(m))
    check = raw_score(doc, X[:200])
    want = m.predict_proba(X[:200])[:, 1]
    assert np.allclose(check, want, atol=1e-5), np.abs(check - want).max()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
