#!/usr/bin/env python3
"""Capping the tokens embedded per prompt (issue #22 item 4): what a smaller
`embedder.max_seq_len` buys in speed and costs in hits, measured in one run.

Speed: a gateway on both CPUs (as `make run` starts it; oha and mock-llm on
CPU 1 beside it, as in bench/compare), cache on, no recent-embeddings cache,
novel prompts of ~60 and ~250 tokens at c=16 (bench/compare's synthetic
`miss-60tok` / `miss-250tok` lines), one instance per cap, caps alternating
within each round. Ratios are against the first cap (the shipped 256).

Hits: `smartllm cache eval` at each cap (on a copy of conf/ with only
`embedder.max_seq_len` changed) on the yardstick's tuning split, and on the
same pairs inside a long prompt: each text after a shared context of about
170 tokens ("Context: ... Question: <text>"), the shape of a retrieval or
template prompt. The context is written for this check (synthetic) and so
is that variant; the pairs are the tuning split's. Past the window a lookup
serves a pair only when what follows is the same in both (`beyond_window`),
and `cache eval` decides the same way.

    bench/embed-cap.py [--caps 256,128,64] [--rounds 2] [--duration 5]

Needs the release build (`$CARGO_TARGET_DIR/release/{smartllm,mock-llm}`),
the assets, and oha (bench/compare installs it under ~/.cache/smartllm-bench).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import compare as C  # noqa: E402  (the gateway config and process helpers)

CONTEXT = (
    "Context: You are the support assistant of a company that sells accounting software to small "
    "businesses. The product runs in the browser and on phones, keeps invoices, receipts and bank "
    "feeds in one ledger, and files sales tax returns in the countries the company supports. "
    "Customers reach support through chat and email; most of them are owners or bookkeepers rather "
    "than accountants, so answers should be short, plain and practical, point to the screen where "
    "a setting lives, and say when a question needs an accountant instead. Never invent features, "
    "prices or deadlines. If the customer's plan does not include what they ask about, say which plan "
    "does. Keep personal data out of the answer and do not repeat card numbers or passwords. When a "
    "question is unclear, answer the most likely reading and say what you assumed."
)


def cap_conf(work, cap):
    """A copy of the shipped conf/ with only embedder.max_seq_len changed."""
    conf = work / f"conf-{cap}"
    shutil.copytree(ROOT / "conf", conf)
    main = conf / "smartllm.yaml"
    text, n = re.subn(r"(?m)^  max_seq_len: \d+", f"  max_seq_len: {cap}", main.read_text())
    assert n == 1, "conf/smartllm.yaml has no embedder.max_seq_len line"
    main.write_text(text)
    return conf


def long_pairs(work):
    out = work / "tuning-long.tsv"
    with open(ROOT / "data/cache-eval/tuning.tsv") as f, open(out, "w") as g:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 3 or not cols[2].strip() in ("0", "1"):
                g.write(line)  # header or comment, as is
                continue
            cols[0] = f"{CONTEXT} Question: {cols[0]}"
            cols[1] = f"{CONTEXT} Question: {cols[1]}"
            g.write("\t".join(cols) + "\n")
    return out


def evaluate(binary, conf, pairs):
    out = subprocess.run([str(binary), "cache", "eval", "--config", str(conf), "--pairs", str(pairs), "--json"],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, SMARTLLM_CONFIG=str(conf)))
    report = json.loads(out.stdout)
    row = next(r for r in report["rows"] if r["configured"])
    return row


def speed(args, work, bin_dir, caps):
    oha = types.SimpleNamespace(oha=args.oha)
    mp = C.free_port()
    mock = C.spawn([f"{bin_dir}/mock-llm", "--listen", f"127.0.0.1:{mp}", "--threads", "1"], work, "mock", 1)
    vocab = ("route cache cost tenant budget latency model answer question invoice contract "
             "summary python function database index server request token price").split()
    lines = {}
    for name, words in (("60", 45), ("250", 190)):
        path = work / f"miss-{name}.jsonl"
        with open(path, "w") as f:
            for i in range(200_000):
                filler = " ".join(vocab[(i * 7 + k * 13) % len(vocab)] for k in range(max(0, words - 8)))
                f.write(C.body(f"Unique question {i} about topic {i * 7919 % 100003}? {filler}") + "\n")
        lines[name] = path
    res = {}
    try:
        for r in range(args.rounds):
            for cap in caps:
                port, admin = C.free_port(), C.free_port()
                name = f"g{r}-{cap}"
                conf = C.smartllm_conf(work, name, port, admin, f"http://127.0.0.1:{mp}", cache=True, sized=True)
                main = conf / "smartllm.yaml"
                main.write_text(main.read_text().replace("  model: paraphrase-l3.int8.onnx\n",
                                                         f"  model: paraphrase-l3.int8.onnx\n  max_seq_len: {cap}\n"))
                g = C.spawn([f"{bin_dir}/smartllm", "serve", "--config", str(conf)], work, name, "0,1")
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                try:
                    C.wait_http(url, 120, (), C.body("How do I reset my password?"))
                    t = types.SimpleNamespace(url=url, proc=g, name=name, peak_rss=0, headers=[],
                                              pids=lambda g=g: C.proc_tree(g.pid))
                    for path in ("60", "250"):
                        m = C.oha(oha, t, duration=args.duration, conns=16, lines=lines[path])
                        res.setdefault((path, cap), []).append(m)
                        print(f"round {r + 1}, max_seq_len {cap}, ~{path}-token novel prompts c=16: "
                              f"{m['rps']:,.0f} req/s, p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms, "
                              f"errors {m['errors']}", flush=True)
                finally:
                    os.killpg(g.pid, signal.SIGTERM)
                    g.wait()
    finally:
        os.killpg(mock.pid, signal.SIGTERM)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caps", default="256,128,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--oha", default=str(Path.home() / ".cache/smartllm-bench/oha/bin/oha"))
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    bin_dir = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"embed-cap-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        longs = long_pairs(work)
        print("| max_seq_len | tuning: duplicates / traps served | long prompts: duplicates / traps served "
              "| long prompts blocked before the verifier |")
        print("|---|---|---|---|")
        for cap in caps:
            conf = cap_conf(work, cap)
            short = evaluate(bin_dir / "smartllm", conf, ROOT / "data/cache-eval/tuning.tsv")
            long = evaluate(bin_dir / "smartllm", conf, longs)
            print(f"| {cap} | {short['recall']:.1%} / {short['trap_rate']:.1%} | "
                  f"{long['recall']:.1%} / {long['trap_rate']:.1%} | {long['guard_blocked']} |", flush=True)
        if args.no_speed:
            return
        res = speed(args, work, bin_dir, caps)
        print()
        print("| max_seq_len | ~60 tokens: req/s by round | vs first cap | ~250 tokens: req/s by round | vs first cap |")
        print("|---|---|---|---|---|")
        for cap in caps:
            cells = []
            for path in ("60", "250"):
                rps = [m["rps"] for m in res[(path, cap)]]
                base = [m["rps"] for m in res[(path, caps[0])]]
                cells.append(" / ".join(f"{x:,.0f}" for x in rps))
                cells.append(" / ".join(f"{x / b:.2f}x" for x, b in zip(rps, base)))
            print(f"| {cap} | " + " | ".join(cells) + " |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
