#!/usr/bin/env python3
"""What the calibrated cache default costs: novel prompts through a gateway
whose namespace already holds real questions, with the shipped pair (cosine
0.70, verifier 0.70) against the previous default (0.95, verifier 0.6), same
binary, same run, rounds alternating. Prints req/s, p50/p99 and the cache's
lookup and verifier counters of each, and the ratio to the baseline.

The texts are real questions and prompts from the project's training data
(`data/cache-eval/train.tsv`, the verifier's training pairs, and
`data/router/tasks/train.tsv`), never the cache yardstick's tuning or
held-out splits. oha draws lines at random, so some novel requests repeat
and are exact hits, in both settings alike.

    bench/cache-default.py [--fill 2000] [--novel 3000] [--rounds 2]

Needs the release build (`$CARGO_TARGET_DIR/release/{smartllm,mock-llm}`),
the assets, and oha (`bench/compare` installs it under
~/.cache/smartllm-bench). Like bench/compare, the gateway runs on both CPUs,
oha and mock-llm on CPU 1.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import compare as C  # noqa: E402  (the gateway config and process helpers)

SETTINGS = (("previous default", 0.95, 0.6), ("calibrated default", 0.70, 0.70))


def texts():
    out, seen = [], set()
    for path, cols in ((ROOT / "data/cache-eval/train.tsv", (0, 1)), (ROOT / "data/router/tasks/train.tsv", None)):
        for line in open(path, encoding="utf-8"):
            if line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            cand = [parts[c] for c in cols if c < len(parts)] if cols else [p for p in parts if len(p) > 25][:1]
            for t in cand:
                t = t.replace("\\n", " ")[:400]
                if len(t) > 15 and t not in seen:
                    seen.add(t)
                    out.append(t)
    random.Random(7).shuffle(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fill", type=int, default=2000, help="questions stored before measuring")
    ap.add_argument("--novel", type=int, default=3000, help="requests measured")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--oha", default=str(Path.home() / ".cache/smartllm-bench/oha/bin/oha"))
    ap.add_argument("--work", default="/tmp/smartllm-cache-default")
    args = ap.parse_args()
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    binary = Path(target) / "release"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    all_texts = texts()
    fill, novel = all_texts[:args.fill], all_texts[args.fill:args.fill + args.novel]

    def lines(name, ts):
        p = work / f"{name}.jsonl"
        with open(p, "w") as f:
            for t in ts:
                f.write(C.body(t) + "\n")
        return p

    fill_f, novel_f = lines("fill", fill), lines("novel", novel)

    def oha(url, f, n):
        cmd = ["taskset", "-c", "1", args.oha, "--no-tui", "-n", str(n), "-c", "16", "-m", "POST",
               "-T", "application/json", "--output-format", "json", "-t", "30s", "-Z", str(f), url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        j = json.loads(out.stdout)
        lp = j["latencyPercentiles"]
        return j["summary"]["requestsPerSec"], lp["p50"] * 1000, lp["p99"] * 1000

    def counters(admin):
        txt = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
        return {l.split(" ")[0]: float(l.split(" ")[1]) for l in txt.splitlines()
                if l.startswith(("smartllm_cache_lookups_total", "smartllm_cache_verifier_total"))}

    def run(i, label, threshold, verifier):
        d = work / f"{i}-{label.replace(' ', '-')}"
        d.mkdir()
        mp = C.free_port()
        mock = C.spawn([f"{binary}/mock-llm", "--listen", f"127.0.0.1:{mp}", "--threads", "1"], d, "mock", 1)
        try:
            C.wait_http(f"http://127.0.0.1:{mp}/health", 10)
            port, admin = C.free_port(), C.free_port()
            conf = C.smartllm_conf(d, "g", port, admin, f"http://127.0.0.1:{mp}", cache=True, sized=True)
            (conf / "cache.yaml").write_text(
                f"cache:\n  enabled: true\n  similarity_threshold: {threshold}\n  verifier_threshold: {verifier}\n")
            g = C.spawn([f"{binary}/smartllm", "serve", "--config", str(conf)], d, "g", "0,1")
            try:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                C.wait_http(url, 120, (), C.body("warm up"))
                oha(url, fill_f, len(fill))
                time.sleep(3)  # the stored answers written, the index built
                before = counters(admin)
                rps, p50, p99 = oha(url, novel_f, len(novel))
                after = counters(admin)
                delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
                return rps, p50, p99, delta
            finally:
                os.killpg(g.pid, signal.SIGTERM)
        finally:
            os.killpg(mock.pid, signal.SIGTERM)
            time.sleep(1)

    results = {label: [] for label, _, _ in SETTINGS}
    for r in range(args.rounds):
        for label, threshold, verifier in SETTINGS:
            rps, p50, p99, delta = run(r, label, threshold, verifier)
            results[label].append(rps)
            print(f"round {r + 1}, {label} ({threshold} + verifier {verifier}): {rps:,.0f} req/s, "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
            for k, v in sorted(delta.items()):
                print(f"    {k} {v:.0f}")
    base = results[SETTINGS[0][0]]
    new = results[SETTINGS[1][0]]
    ratios = ", ".join(f"{n / b:.2f}x" for n, b in zip(new, base))
    print(f"calibrated / previous default, novel req/s by round: {ratios}")


if __name__ == "__main__":
    main()
