#!/usr/bin/env python3
"""How the prompt's keywords came to narrow the task vote (bench/README.md,
"Keywords name the candidates, the vote picks").

The gateway's keyword lists (crates/smartllm-router/src/features.rs, written
with the first hand-written examples, long before these collections) name
tasks: translation, summarisation, extraction, creative and puzzle words,
code markers and code words. Here the shipped vote (loco_mapped.py: the
default model's mapped task vectors, k = 7) is scored by
leave-one-collection-out over the training collections alone, with some of
the named tasks narrowing it: the vote decides among the tasks the prompt's
words name; when none of them got a vote, the first named (in the keyword
classifier's order) that may win so (words that ask for the task, or a code
fence or two code markers; not code words alone) is taken, else the whole
vote decides. Reads nothing of heldout.tsv.

    python3 data/router/tasks/keywords_vote.py [TRAIN.tsv [MORE.tsv]]

With a second training file (more collections), it is scored with the
shipped narrowing over the first file's collections, then over all of its
own.
"""
import collections
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loco_mapped as L  # noqa: E402
from make_conf import pick_examples, rows  # noqa: E402

# features.rs's lists, as Keywords::scan reads them: the code markers cased,
# the rest on the lower-cased text; a list counts its distinct needles found.
CODE_MARKERS = ["def ", "fn ", "function ", "class ", "#include", "import ", "=>", "console.log",
                "public static", "return ", "let ", "const ", "SELECT ", "for (", "while (", "println",
                "std::", "async ", "#!/", "</", "();", "self.", "var "]
LISTS = {
    "code_words": ["python", "rust", "javascript", "typescript", "java ", "golang", "c++", "sql", "bash",
                   "regex", "function", "compile", "debug", "refactor", "bug", "stack trace", "api",
                   "unit test", "algorithm", "implement", "code", "script"],
    "math_markers": ["\\frac", "\\int", "\\sum", "\\sqrt", "$$", "∫", "√", "≤", "≥", "∑", "^2", "x^"],
    "math_words": ["integral", "derivative", "equation", "solve for", "matrix", "probability", "theorem",
                   "prime", "calculate", "compute the", "polynomial", "eigen", "factorial", "geometric",
                   "arithmetic", "percent", "how many", "sum of", "prove that", "square root"],
    "reasoning": ["step by step", "prove", "derive", "explain why", "analy", "compare", "trade-off",
                  "tradeoff", "design", "architecture", "optimi", "complexity", "concurren", "distributed",
                  "edge case", "rigorous", "justify", "evaluate", "critique", "formal", "lock-free",
                  "consisten", "scalab", "in depth", "thread-safe", "memory order", "invariant", "o(1)",
                  "o(n", "correctness", "race condition", "why does"],
    "translation": ["translate", "translation", "in french", "in spanish", "in german", "into english"],
    "summarisation": ["summar", "tl;dr", "tldr", "key points", "in one sentence"],
    "extraction": ["extract", "list all the", "pull out", "parse the following", "as json",
                   "fill in the fields"],
    "creative": ["poem", "story", "haiku", "lyrics", "slogan", "imagine", "creative", "fiction"],
    "puzzle": ["why ", "puzzle", "riddle", "logic"],
}
ORDER = ["translation", "summarisation", "extraction", "code", "math", "creative", "reasoning"]
TASKS = ["code", "math", "reasoning", "summarisation", "extraction", "translation", "creative", "chat"]


ENGLISH_MARKERS = {"function ", "class ", "import ", "return ", "let ", "const ", "async ", "var "}


def marker(m, text):
    """A code marker that starts with a letter counts at the start of a word
    only ("let " in "let x", not in "tablet "), as features.rs reads them."""
    if not m[0].isalpha():
        return m in text
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(m), text) is not None


def named(text):
    """Which tasks the words name, and whether the code evidence is
    structural (a fence or two markers): only that, and the asking words,
    may choose a task the vote gave nothing."""
    low = text.lower()
    n = {k: sum(w in low for w in v) for k, v in LISTS.items()}
    found = [m for m in CODE_MARKERS if marker(m, text)]
    # Two markers, one of them no English word ("import goods and return them"
    # is prose).
    structural = "```" in text or (len(found) >= 2 and any(m not in ENGLISH_MARKERS for m in found))
    has_code = len(found) >= 2 or "```" in text
    return {
        # Only the words that ask for the task narrow: not a language's name ("a
        # dish to order in French restaurants"), "key points", "in one sentence",
        # "list all the", "pull out" or "as json" (the same score here without them).
        "translation": "translate" in low or "translation" in low,
        "summarisation": any(w in low for w in ("summar", "tl;dr", "tldr")),
        "extraction": any(w in low for w in ("extract", "parse the following", "fill in the fields")),
        "code": has_code or n["code_words"] >= 2, "code_structural": structural,
        "math": n["math_markers"] > 0 or n["math_words"] > 0 or re.search(r"\d\s*[-+*/^]\s*\d", text) is not None,
        "creative": n["creative"] > 0, "reasoning": n["reasoning"] > 0 or n["puzzle"] > 0,
    }


def votes(query, examples):
    counts = collections.Counter(examples["labels"])
    out = []
    for row in query["v"] @ examples["v"].T:
        v = collections.defaultdict(float)
        for i in np.argpartition(-row, L.K)[:L.K]:
            v[examples["labels"][i]] += max(row[i], 0) ** 3
        out.append({t: v[t] / counts[t] if counts[t] else 0.0 for t in TASKS})
    return out


def decide(v, flags, narrowing):
    """classify_among: the vote among the named tasks; when none of them got
    a vote, the first that may win unvoted (asking words, structural code),
    else the whole vote."""
    names = [t for t in ORDER if t in narrowing and flags[t]]
    top = max(TASKS, key=lambda t: v[t])
    if not names:
        return top
    best = max(names, key=lambda t: v[t])
    if v[best] > 0:
        return best
    may = [t for t in names if t != "code" or flags["code_structural"]]
    return may[0] if may else top


SHIPPED = ("translation", "summarisation", "extraction", "code")


def main():
    files = sys.argv[1:] or [os.path.join(HERE, "train.tsv")]
    first = run(files[0])
    for more in files[1:]:
        # Another training file (more collections), scored with the shipped
        # narrowing over the first file's collections, then over all its own.
        run(more, only=first, sets=[SHIPPED])
        run(more, sets=[SHIPPED])


def run(path, only=None, sets=None):
    print(f"{path}{' over the first file' + chr(39) + 's collections' if only else ''}:")
    train = [tuple(r) for r in rows(path)]
    hand = [(r[0], r[1], "handwritten") for r in rows(os.path.join(HERE, "handwritten.tsv"))]
    examples, trained = L.embed(hand + pick_examples(train)), L.embed(train)
    flags = [named(p) for _, p, _ in train]
    v = [None] * len(train)
    for src in sorted(set(trained["sources"])):
        mask = trained["sources"] == src
        for i, x in zip(np.where(mask)[0], votes(L.subset(trained, mask),
                                                 L.subset(examples, examples["sources"] != src))):
            v[i] = x
    labels, sources = trained["labels"], trained["sources"]

    def score(pred):
        per = collections.defaultdict(list)
        for src in sorted(set(sources)):
            if only is not None and src not in only:
                continue
            m = sources == src
            per[labels[m][0]].append((pred[m] == labels[m]).mean())
        tasks = {t: np.mean(a) for t, a in sorted(per.items())}
        return np.mean(list(tasks.values())), "  ".join(f"{t} {x:.0%}" for t, x in tasks.items())

    sets = sets or [(), ("translation", "summarisation"), ("translation", "summarisation", "extraction"),
                    SHIPPED,
                    ("translation", "summarisation", "extraction", "creative", "code"),
                    ("translation", "summarisation", "extraction", "creative", "code", "reasoning"),
                    tuple(ORDER)]
    for narrowing in sets:
        pred = np.array([decide(v[i], flags[i], narrowing) for i in range(len(train))])
        s, detail = score(pred)
        print(f"{s:.1%}  {'+'.join(narrowing) or 'the vote alone'}  ({detail})")
    return set(sources)


if __name__ == "__main__":
    main()
