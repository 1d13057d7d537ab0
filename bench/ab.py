#!/usr/bin/env python3
"""A/B of two gateway builds on the plain proxy path, in one run.

    python3 bench/ab.py --a OLD/smartllm --b NEW/smartllm --mock $CARGO_TARGET_DIR/release/mock-llm \
        --oha ~/.cache/smartllm-bench/oha/bin/oha [--body-size 1024] [--model-last] [--rounds 6] [--duration 4]

Both gateways run the same config as `bench/compare.py --suite frontdoor` (one
worker, cache off, access log off, a fixed model), each pinned to CPU 0 and
stopped (SIGSTOP) while the other is measured; the mock (one thread, no delay)
and oha (c=16) share CPU 1. Rounds alternate which build goes first. Each cell
is the gateway's CPU time per request (user + system, from /proc) and its
requests/s; the last line is the ratio B/A of the medians. CPU per request is
the figure to read: the requests/s of both are capped near the same value
when the mock's core is the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as C  # noqa: E402


def measure(args, port, pids, body_file):
    t0 = C.cpu_seconds(pids)
    out = subprocess.run(
        ["taskset", "-c", "1", args.oha, "--no-tui", "-z", f"{args.duration}s", "-w", "-c", "16",
         "-m", "POST", "-T", "application/json", "--output-format", "json", "-D", str(body_file),
         f"http://127.0.0.1:{port}/v1/chat/completions"],
        capture_output=True, text=True, check=True)
    t1 = C.cpu_seconds(pids)
    s = json.loads(out.stdout)
    ok = s["statusCodeDistribution"].get("200", 0)
    bad = sum(v for k, v in s["statusCodeDistribution"].items() if k != "200")
    if bad or not ok:
        raise RuntimeError(f"port {port}: {bad} non-200 answers of {ok + bad}")
    return ok / args.duration, (t1 - t0) / ok * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="baseline smartllm binary")
    ap.add_argument("--b", required=True, help="candidate smartllm binary")
    ap.add_argument("--mock", required=True, help="mock-llm binary")
    ap.add_argument("--oha", required=True)
    ap.add_argument("--body-size", type=int, default=1024)
    ap.add_argument("--model-last", action="store_true",
                    help="put `model` after `messages`, the key order the OpenAI SDKs send")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=4)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="smartllm-ab-"))
    mock_port = C.free_port()
    procs = [C.spawn([args.mock, "--listen", f"127.0.0.1:{mock_port}", "--threads", "1"], work, "mock", 1)]
    try:
        upstream = f"http://127.0.0.1:{mock_port}"
        C.wait_http(f"{upstream}/health", 10)
        body_file = work / "body.json"
        text = C.sized_body(args.body_size)
        if args.model_last:
            d = json.loads(text)
            d["model"] = d.pop("model")
            text = json.dumps(d, separators=(",", ":"))
        body_file.write_text(text)
        gws = {}
        for name, binary in (("A", args.a), ("B", args.b)):
            port, admin = C.free_port(), C.free_port()
            conf = C.smartllm_conf(work, name, port, admin, upstream)
            p = C.spawn([binary, "serve", "--config", str(conf)], work, name, 0)
            procs.append(p)
            C.wait_http(f"http://127.0.0.1:{port}/v1/chat/completions", 120, data=C.body(C.PROMPT))
            gws[name] = (port, p)
        rows = {"A": [], "B": []}
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            for name in order:
                port, p = gws[name]
                other = gws["B" if name == "A" else "A"][1]
                os.killpg(other.pid, signal.SIGSTOP)
                try:
                    rps, us = measure(args, port, C.proc_tree(p.pid), body_file)
                finally:
                    os.killpg(other.pid, signal.SIGCONT)
                rows[name].append((rps, us))
                C.log(f"round {r + 1} {name}: {rps:,.0f} req/s, {us:.1f} us CPU/request")
        med = {k: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v)) for k, v in rows.items()}
        print(f"| build | req/s (median of {args.rounds}) | gateway CPU us/request | rounds (us/request) |")
        print("|---|---|---|---|")
        for k, path in (("A", args.a), ("B", args.b)):
            cells = " ".join(f"{y:.1f}" for _, y in rows[k])
            print(f"| {k} `{path}` | {med[k][0]:,.0f} | {med[k][1]:.1f} | {cells} |")
        print(f"| B / A | {med['B'][0] / med['A'][0]:.2f}x | {med['B'][1] / med['A'][1]:.2f}x | |")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


if __name__ == "__main__":
    main()
