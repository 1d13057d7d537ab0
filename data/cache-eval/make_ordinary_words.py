#!/usr/bin/env python3
"""Write crates/smartllm-cache/src/ordinary-words.txt: the English words the
cache's precision guard reads as ordinary when one opens a sentence.

A capitalised word that opens a prompt ("Show the singers ...", "Rewrite
this email ...") is capitalised by its position, not because it is a name.
The guard takes such a word for a name unless it reads as an ordinary word
(crates/smartllm-cache/src/guard.rs, `ordinary_opening`). This list is one
way it tells: a word SCOWL's American English list (Debian's `wamerican`)
and British English list (`wbritish`, for "summarise", "colour") give
only in lower case ("show", "list", "rewrite", "rust"), never capitalised;
a word either also gives capitalised ("Apple", "Bill", "Python",
"Windows") or neither gives ("Kubernetes", "Nvidia") stays a possible name.

The lists come from the Debian packages, fetched from the Debian archive
(the one registry this needs) and checked by sha256:

    apt-get download wamerican=2020.12.07-2 wbritish=2020.12.07-2
    python3 data/cache-eval/make_ordinary_words.py wamerican_2020.12.07-2_all.deb wbritish_2020.12.07-2_all.deb

Only lower-case ASCII words are kept (no possessives). The output starts
with SCOWL's copyright and permission notice, which its licence asks to go
with every copy.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile

DEBS = {
    "wamerican_2020.12.07-2_all.deb": ("american-english", "c8f8e2b2ad0d37bfdd41f0e40f1e4c8e5f907467d768a1d3698b164e9617f0b4"),
    "wbritish_2020.12.07-2_all.deb": ("british-english", "f80571f14aa987ef0d727e2077d4f2abd84adf92492af494e7de04882c53be3f"),
}
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "crates", "smartllm-cache", "src", "ordinary-words.txt")

NOTICE = """\
# Words SCOWL's American and British English lists (Debian wamerican and
# wbritish 2020.12.07-2) give only in lower case:
# data/cache-eval/make_ordinary_words.py. From SCOWL's
# README:
#
# Copyright 2000-2011 by Kevin Atkinson
#
# Permission to use, copy, modify, distribute and sell these word
# lists, the associated scripts, the output created from the scripts,
# and its documentation for any purpose is hereby granted without fee,
# provided that the above copyright notice appears in all copies and
# that both that copyright notice and this permission notice appear in
# supporting documentation. Kevin Atkinson makes no representations
# about the suitability of this array for any purpose. It is provided
# "as is" without express or implied warranty.
#
# (The list also includes material from other word lists under similar
# terms; see /usr/share/doc/wamerican/copyright in the Debian packages.)
"""


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    words: set[str] = set()
    for deb in sys.argv[1:]:
        name = os.path.basename(deb)
        if name not in DEBS:
            sys.exit(f"{deb}: expected one of {sorted(DEBS)}")
        dict_file, want = DEBS[name]
        with open(deb, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != want:
            sys.exit(f"{deb}: sha256 {digest}, expected {want}")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
            with open(os.path.join(tmp, "usr", "share", "dict", dict_file), encoding="utf-8") as f:
                words |= set(f.read().split())
    ordinary = sorted(
        w for w in words
        if w.isascii() and w.isalpha() and w.islower() and w.capitalize() not in words
    )
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(NOTICE)
        f.write("\n".join(ordinary) + "\n")
    print(f"{len(ordinary)} words -> {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
