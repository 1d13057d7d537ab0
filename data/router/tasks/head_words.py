#!/usr/bin/env python3
"""Tried, not shipped (bench/README.md, "Task classifier on real prompts"):
a word model of a prompt's first words beside the embedding vote.

A logistic regression on TF-IDF word unigrams and bigrams of the first N
words (each training collection weighted equally, classes balanced), mixed
with the gateway's vote (task vectors, k=7, similarity^3 per example count)
as alpha * vote + (1 - alpha) * P(task). Scored like task_views.py, by
leave-one-collection-out over the training collections only; heldout.tsv is
not read.

Needs numpy, scikit-learn, onnxruntime and tokenizers, and the assets in
$SMARTLLM_ASSETS_DIR.

    python3 data/router/tasks/head_words.py 12,30 1,10    # N words, C values
"""
import collections
import os
import pickle
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import task_views as tv
from make_conf import pick_examples, rows
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "smartllm-task-embeddings.pkl")
train = [tuple(r) for r in rows(os.path.join(HERE, "train.tsv"))]
ex = [(r[0], r[1], "handwritten") for r in rows(os.path.join(HERE, "handwritten.tsv"))]
ex.extend(pick_examples(train))
if os.path.exists(CACHE):
    examples, trained = pickle.load(open(CACHE, "rb"))
else:
    examples, trained = tv.embed(ex), tv.embed(train)
    pickle.dump((examples, trained), open(CACHE, "wb"))
TASKS = sorted(set(trained["labels"]))
W = tv.SHIPPED

def votes(query, exs, k=7):
    sims = sum(w * (query[v] @ exs[v].T) for v, w in W.items()) / sum(W.values())
    counts = collections.Counter(exs["labels"])
    out = np.zeros((len(sims), len(TASKS)))
    for r, row in enumerate(sims):
        for i in np.argpartition(-row, k)[:k]:
            out[r, TASKS.index(exs["labels"][i])] += max(row[i], 0) ** 3
        for j, t in enumerate(TASKS):
            out[r, j] /= max(counts.get(t, 1), 1)
        s = out[r].sum()
        if s > 0: out[r] /= s
    return out

def head(text, n):
    return " ".join(text.split()[:n])

texts = [p for _, p, _ in train]
labels = np.array([t for t, _, _ in train])
sources = np.array([s for _, _, s in train])

def loco(nwords, C, alphas):
    per = {a: collections.defaultdict(list) for a in alphas}
    for src in sorted(set(sources)):
        m = sources == src
        q = tv.subset(trained, m)
        v = votes(q, tv.subset(examples, examples["sources"] != src))
        if nwords:
            vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=True)
            Xtr = vec.fit_transform([head(t, nwords) for t, mm in zip(texts, ~m) if mm])
            # balance collections: weight each prompt by 1/collection size
            cnt = collections.Counter(sources[~m])
            sw = np.array([1.0 / cnt[s] for s in sources[~m]])
            lr = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
            lr.fit(Xtr, labels[~m], sample_weight=sw * len(sw) / sw.sum())
            p = lr.predict_proba(vec.transform([head(t, nwords) for t, mm in zip(texts, m) if mm]))
            p = p[:, [list(lr.classes_).index(t) for t in TASKS]]
        else:
            p = np.zeros_like(v)
        for a in alphas:
            pred = np.array(TASKS)[np.argmax(a * v + (1 - a) * p, 1)]
            per[a][labels[m][0]].append((pred == labels[m]).mean())
    return {a: (np.mean([np.mean(x) for x in per[a].values()]), {t: round(np.mean(x), 2) for t, x in per[a].items()}) for a in alphas}

print("knn only", loco(0, 1, [1.0]))
for nw in (int(x) for x in sys.argv[1].split(",")):
    for C in (float(x) for x in sys.argv[2].split(",")):
        r = loco(nw, C, [0.0, 0.3, 0.5, 0.7])
        for a, (s, pt) in r.items():
            print(f"words={nw} C={C} alpha={a}: {s:.3f} {pt}", flush=True)
