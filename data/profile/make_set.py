#!/usr/bin/env python3
"""Build data/profile/set.jsonl: the labelled set `smartllm profile run` measures models on.

Standard library only. The input is one PyPI package, fetched with
`python3 -m pip download --no-deps` (nothing is installed) and checked against
its pinned sha256 (the same file data/router/tasks/make_tasks.py reads):

  bigbench==1.0.0 (sdist)   Google's BIG-bench task data, Apache-2.0

    python3 data/profile/make_set.py                 # downloads (~300 MB) to a temp dir
    python3 data/profile/make_set.py --cache DIR     # reuse / keep the download in DIR

One JSON object a line:
  {"id", "task", "kind", "question", "choices"?, "answer", "source"}
kind "exact": the answer is a number, scored by exact match of the final answer;
kind "choice": "choices" are the options, "answer" the letter of the right one
(options in a seeded random order). Questions are the benchmark's own, unchanged
except for whitespace (code keeps its lines). See SOURCES.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 18
PACKAGE = ("bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
           "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"

# (task, kind, BIG-bench task dir, how many)
SOURCES = [
    ("math", "exact", "arithmetic/3_digit_multiplication", 14),
    ("math", "exact", "arithmetic/4_digit_subtraction", 13),
    ("math", "exact", "arithmetic/2_digit_division", 13),
    ("reasoning", "choice", "logical_deduction/three_objects", 20),
    ("reasoning", "choice", "date_understanding", 20),
    ("code", "choice", "code_line_description", 40),
]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: str) -> str:
    spec, name, digest = PACKAGE
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", cache, spec], check=True)
    if sha256(path) != digest:
        sys.exit(f"{path}: sha256 mismatch (want {digest})")
    return path


def clean(text: str) -> str:
    return " ".join(text.split())


def keep_lines(text: str) -> str:
    """Code keeps its lines and indentation; only trailing spaces go."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def items(tar: tarfile.TarFile, task: str, kind: str, src: str, n: int, rng: random.Random):
    data = json.load(tar.extractfile(ROOT + src + "/task.json"))
    examples = data["examples"]
    picked = rng.sample(range(len(examples)), n)
    slug = src.replace("/", "-").replace("_", "-")
    for k, i in enumerate(sorted(picked)):
        ex = examples[i]
        item = {"id": f"{slug}-{k + 1:02d}", "task": task, "kind": kind,
                "question": keep_lines(ex["input"]) if task == "code" else clean(ex["input"])}
        if kind == "exact":
            target = ex["target"]
            item["answer"] = clean(target if isinstance(target, str) else target[0])
        else:
            options = list(ex["target_scores"].items())
            rng.shuffle(options)
            item["choices"] = [clean(o) for o, _ in options]
            right = [j for j, (_, s) in enumerate(options) if s == 1]
            if len(right) != 1:
                continue
            item["answer"] = "ABCDEFGHIJ"[right[0]]
        item["source"] = f"bigbench:{src}"
        yield item


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="keep the download here")
    ap.add_argument("--out", default=os.path.join(HERE, "set.jsonl"))
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp()
    os.makedirs(cache, exist_ok=True)
    tar = tarfile.open(fetch(cache))
    rng = random.Random(SEED)
    out = []
    for task, kind, src, n in SOURCES:
        out.extend(items(tar, task, kind, src, n, rng))
    with open(args.out, "w") as f:
        for item in out:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{len(out)} items -> {args.out}")


if __name__ == "__main__":
    main()
