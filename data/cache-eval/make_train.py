#!/usr/bin/env python3
"""Build the verifier's training pairs: data/cache-eval/train.tsv.

Standard library only; the same input as make_pairs.py (the sdist of the PyPI
package `bigbench==1.0.0`, sha256-pinned). Run make_pairs.py first: this
script reads tuning.tsv and heldout.tsv and keeps every text of both out.

    python3 data/cache-eval/make_train.py --sdist PATH/bigbench-1.0.0.tar.gz

The pairs come only from collections that feed neither split's figures, or
from the tuning side's collections with the tuning pairs removed; nothing is
taken from a held-out collection (Spider, SNIPS, known_unknowns,
general_knowledge, unit_conversion_with_relative_error, WinoGrande persons):

  paraphrase (1)  QASC crowd paraphrases (NI subtask045) not used in tuning.tsv
  twin (0)        WinoGrande object twins (NI subtask034) not used in tuning.tsv
  related (0)     two different questions written for the same passage, most
                  words in common first, each question once: DROP (NI
                  subtask026) and Quoref (NI subtask001), real
  near-repeat (1) and the seven rule-made trap categories: generated from
                  DROP, Quoref and MultiRC questions by make_pairs.py's rules
                  (synthetic:X), with their own seed
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_pairs as mp  # noqa: E402

SEED = 1600
RELATED_PER_SOURCE = 400
TWINS = 600


def passage_questions(t: mp.Tasks, sub: str) -> dict[str, list[str]]:
    """Questions written for one passage, grouped by it."""
    by = collections.defaultdict(list)
    for e in t.examples(mp.NI + sub):
        for q in mp.targets(e):
            q = mp.clean(q)
            if 8 <= len(q) <= 300 and q.endswith("?"):
                by[e["input"][-400:]].append(q)
    return {k: list(dict.fromkeys(v)) for k, v in by.items()}


def answers(t: mp.Tasks, sub: str) -> dict[str, str]:
    """question -> its gold answer (the collection's answer-generation task)."""
    out = {}
    for e in t.examples(mp.NI + sub):
        m = re.search(r"\nQuestion:\s*(.*?)\s*(?:\nAnswer type:.*)?$", e["input"], re.S)
        tg = mp.targets(e)
        if m and tg:
            out[mp.clean(m.group(1))] = norm_answer(tg[0])
    return out


def norm_answer(a: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", a.lower()))


def related(groups: dict[str, list[str]], gold: dict[str, str], n: int) -> list[tuple]:
    """Two questions on one passage whose gold answers differ: annotators
    sometimes wrote one question twice in other words, and those are not
    traps, so only pairs with two known answers that share no word are
    kept."""
    words = lambda q: set(re.findall(r"[a-z0-9]+", q.lower()))
    scored = []
    for key in sorted(groups):
        qs = groups[key]
        for i in range(len(qs)):
            for j in range(i + 1, len(qs)):
                wa, wb = words(qs[i]), words(qs[j])
                if wa == wb or not wa or not wb:
                    continue
                ga, gb = gold.get(qs[i]), gold.get(qs[j])
                # Different answers that share no word ("7" / "10 points"
                # may be one answer written twice; "7" / "10" are not).
                if not ga or not gb or set(ga.split()) & set(gb.split()):
                    continue
                scored.append((-len(wa & wb) / len(wa | wb), qs[i], qs[j]))
    return mp.most_alike(scored, n)


def multirc_questions(t: mp.Tasks) -> list[str]:
    qs = []
    for e in t.examples(mp.NI + "subtask058_multirc_question_answering"):
        m = re.search(r"\nQuestion:\s*(.*?)\s*\(A\)", e["input"], re.S)
        if m:
            qs.append(mp.clean(m.group(1)))
    return qs


def read_texts(path: str) -> set[str]:
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b = line.split("\t")[:2]
            out.update((a.lower(), b.lower()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", help="a downloaded bigbench-1.0.0.tar.gz")
    ap.add_argument("--out", default=mp.HERE)
    args = ap.parse_args()
    t = mp.Tasks(mp.fetch_sdist(args.sdist))
    taken = read_texts(os.path.join(args.out, "tuning.tsv")) | read_texts(os.path.join(args.out, "heldout.tsv"))
    rng = random.Random(SEED)

    def tag(pairs, src):
        return [p + (src,) for p in pairs]

    real = []
    # every QASC paraphrase pair (not just two per sentence) ...
    qasc = []
    for e in t.examples(mp.NI + "subtask045_miscellaneous_sentence_paraphrasing"):
        m = re.search(r"Sentence:\s*(.*)$", e["input"], re.S)
        if m:
            a = mp.clean(m.group(1))
            qasc += [(a, mp.clean(x), 1, "paraphrase") for x in mp.targets(e) if mp.clean(x) and mp.clean(x) != a]
    real += tag(qasc, "qasc-ni045")
    twins = mp.winogrande_twins(t, "subtask034_winogrande_question_modification_object")[0]
    real += tag(rng.sample(twins, min(TWINS, len(twins))), "winogrande-ni034")
    drop = passage_questions(t, "subtask026_drop_question_generation")
    quoref = passage_questions(t, "subtask001_quoref_question_generation")
    real += tag(related(drop, answers(t, "subtask028_drop_answer_generation"), RELATED_PER_SOURCE), "drop-ni026")
    real += tag(related(quoref, answers(t, "subtask002_quoref_answer_generation"), RELATED_PER_SOURCE), "quoref-ni001")
    # ... minus anything that tuning.tsv or heldout.tsv holds
    real = [r for r in real if r[0].lower() not in taken and r[1].lower() not in taken]
    mp.NEAR_REPEATS = 400
    mp.TRAPS_PER_CATEGORY = 150
    qsets = [
        ("drop-ni026", [q for qs in drop.values() for q in qs]),
        ("quoref-ni001", [q for qs in quoref.values() for q in qs]),
        ("multirc-ni058", multirc_questions(t)),
    ]
    qsets = [(s, [q for q in qs if q.lower() not in taken]) for s, qs in qsets]
    train = mp.build_split("train", real, qsets, rng)
    train = [r for r in train if r[0].lower() not in taken and r[1].lower() not in taken]
    header = (
        "# split: train (the verifier's training pairs; never a figure to report)\n"
        "# built by data/cache-eval/make_train.py from the PyPI package "
        f"{mp.PACKAGE} (sha256 {mp.SDIST_SHA256[:16]}...).\n"
        "# No text of tuning.tsv or heldout.tsv is here; no held-out collection is used.\n"
        "# label 1 = duplicate, 0 = trap; source 'synthetic:X' = generated from X's real questions.\n"
    )
    mp.write(os.path.join(args.out, "train.tsv"), train, header)


if __name__ == "__main__":
    main()
