#!/usr/bin/env python3
"""Write conf/tasks.tsv, the examples the gateway's task classifier votes
with: the project's hand-written examples (handwritten.tsv) plus, from every
training collection of train.tsv, PER_SOURCE prompts picked at random
(seeded), each cut to its first CHARS characters at a word boundary. Short
examples keep the gateway's config load fast (it embeds every example) and
were as accurate as whole prompts when chosen by leave-one-source-out
validation on train.tsv (see README.md). Nothing from heldout.tsv is used.

Also writes heldout-sample.tsv: SAMPLE_PER_TASK prompts of each task drawn
(seeded) from heldout.tsv, which a test of the smartllm crate classifies with
the real embedder (a guard against regressions, not a measurement).

    python3 data/router/tasks/make_conf.py   # after make_tasks.py
"""

from __future__ import annotations

import collections
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
CONF = os.path.join(HERE, "..", "..", "..", "conf", "tasks.tsv")
SEED = 18
PER_SOURCE = 12
CHARS = 400
SAMPLE_PER_TASK = 12

HEADER = """# Labelled examples for the router's task classifier: task<TAB>prompt.
# Tasks: code, math, reasoning, summarisation, extraction, translation, creative, chat.
# A prompt's task is voted by its nearest examples (sentence embeddings), each
# task's votes divided by its number of examples; add examples from your own
# traffic to sharpen it. Reloads live. The first block is hand-written; the
# rest comes from public benchmark collections (data/router/tasks/SOURCES.md),
# made by data/router/tasks/make_conf.py.
"""


def cut(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    head = text[:n]
    space = head.rfind(" ")
    return head[:space] if space > n * 0.6 else head


def rows(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]


def pick_examples(train: list[list[str]]) -> list[tuple[str, str, str]]:
    """(task, prompt cut to CHARS, source): PER_SOURCE prompts of every
    training collection, drawn with a generator seeded by the collection's
    name, so adding a collection leaves the others' picks as they were."""
    by_source = collections.defaultdict(list)
    for task, prompt, source in train:
        by_source[source].append((task, prompt))
    picked = []
    for source in sorted(by_source):
        items = sorted(by_source[source])
        random.Random(f"{SEED}:{source}").shuffle(items)
        picked.extend((task, cut(prompt, CHARS), source) for task, prompt in items[:PER_SOURCE])
    return picked


def main() -> None:
    picked = [(t, p) for t, p, _ in pick_examples(rows(os.path.join(HERE, "train.tsv")))]
    seen = set()
    with open(CONF, "w", encoding="utf-8") as f:
        f.write(HEADER)
        for task, prompt in [tuple(r[:2]) for r in rows(os.path.join(HERE, "handwritten.tsv"))] + picked:
            if prompt in seen:
                continue
            seen.add(prompt)
            f.write(f"{task}\t{prompt}\n")
    print(f"{os.path.normpath(CONF)}: {len(seen)} examples")

    rng = random.Random(SEED)
    by_task = collections.defaultdict(list)
    for task, prompt, source in rows(os.path.join(HERE, "heldout.tsv")):
        by_task[task].append((task, prompt, source))
    with open(os.path.join(HERE, "heldout-sample.tsv"), "w", encoding="utf-8") as f:
        f.write("# task\tprompt\tsource: a seeded sample of heldout.tsv (make_conf.py)\n")
        for task in sorted(by_task):
            items = sorted(by_task[task])
            rng.shuffle(items)
            for r in sorted(items[:SAMPLE_PER_TASK]):
                f.write("\t".join(r) + "\n")


if __name__ == "__main__":
    main()
