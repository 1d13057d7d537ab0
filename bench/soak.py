#!/usr/bin/env python3
"""Soak: mixed traffic through SmartLLM for a configurable time.

    bench/soak.py [--minutes 10] [--workers 8] [--window 5] [--ttl 2m] [--slow-clients 4]

Starts two mock-llm instances on loopback, one healthy and one that fails 30%
of its requests (reset, close, malformed JSON, 500, 503, 429), and a gateway
with the cache on and one model over both. Worker threads, each on a
keep-alive connection, send a mix: questions from a small pool (cache hits),
unique questions (misses: embedding, search, upstream, insert), and streamed
requests. Cache entries live `--ttl`, so with unique questions arriving all
the time the stored set reaches a steady size, and so should memory. Slow
clients trickle request heads a byte a second (slowloris) and must be cut off
by server.client_header_timeout. Every 10 s the config is rewritten (a live
reload) and every 15 s the gateway gets SIGHUP. Every window the script
records success rate, p50 and p99 latency, and the gateway's RSS, open file
descriptors and cached vectors.

Writes bench/results/soak-<date>.md (a table over time and a summary) and
soak-<date>.png. Uses only the standard library plus matplotlib for the plot
(bench/compare installs it in ~/.cache/smartllm-bench/plot-venv).
"""

import argparse
import datetime
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from compare import free_port  # noqa: E402 (one port picker for both scripts)


def wait_ready(port, path, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready")


def proc_stats(pid):
    rss = 0
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return rss, fds


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.ok, self.failed, self.lat, self.kinds = 0, 0, [], {}

    def add(self, kind, ok, ms):
        with self.lock:
            if ok:
                self.ok += 1
                self.lat.append(ms)
            else:
                self.failed += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def take(self):
        with self.lock:
            out = (self.ok, self.failed, sorted(self.lat), dict(self.kinds))
            self.reset()
            return out


def pct(xs, p):
    if not xs:
        return 0.0
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def worker(port, stats, stop, seed):
    rng = random.Random(seed)
    pool = [f"How do I configure feature {i} of the gateway?" for i in range(50)]
    conn = None
    n = 0
    while not stop.is_set():
        n += 1
        r = rng.random()
        if r < 0.35:
            kind, prompt, stream = "hit", rng.choice(pool), False
        elif r < 0.70:
            kind, prompt, stream = "miss", f"Unique soak question {seed}-{n} about {rng.randrange(10**6)}", False
        else:
            kind, prompt, stream = "stream", f"Stream soak question {seed}-{n}", True
        body = json.dumps({"model": "soak", "stream": stream,
                           "messages": [{"role": "user", "content": prompt}]})
        t = time.perf_counter()
        ok = False
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and (not stream or data.rstrip().endswith(b"data: [DONE]"))
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
        stats.add(kind, ok, (time.perf_counter() - t) * 1000)


def slow_client(port, stop, cuts):
    """Opens a connection and trickles a request head one byte a second until
    the gateway closes it; records how long that took."""
    import socket

    while not stop.is_set():
        t = time.time()
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\n")
            s.settimeout(1.0)
            while not stop.is_set():
                try:
                    if s.recv(4096) == b"":
                        break
                except socket.timeout:
                    s.sendall(b"x")
            else:
                s.close()
                return
            s.close()
        except OSError:
            pass
        cuts.append(time.time() - t)


def metric(admin, name):
    try:
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        c.request("GET", "/metrics")
        total = 0.0
        for line in c.getresponse().read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total
    except OSError:
        return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--window", type=float, default=5, help="seconds per reported row")
    ap.add_argument("--ttl", default="2m", help="cache entry TTL (bounds the stored set)")
    ap.add_argument("--slow-clients", type=int, default=4, help="connections trickling request heads")
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/smartllm-target")), "release"))
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smartllm-soak-"))
    procs = []

    def spawn(cmd, name):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w"))
        procs.append(p)
        return p

    healthy, faulty, port, admin = free_port(), free_port(), free_port(), free_port()
    spawn([f"{args.bin}/mock-llm", "--listen", f"127.0.0.1:{healthy}", "--chunk-delay-ms", "2"], "healthy")
    spawn([f"{args.bin}/mock-llm", "--listen", f"127.0.0.1:{faulty}", "--chunk-delay-ms", "2",
           "--fault-rate", "0.3", "--faults", "reset,close,malformed-json,500,503,429"], "faulty")
    conf = work / "conf"
    conf.mkdir()
    assets = os.environ.get("SMARTLLM_ASSETS_DIR", str(Path.home() / ".cache/smartllm-assets"))
    (conf / "smartllm.yaml").write_text(f"""server:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
  threads: 2
data_dir: {work / 'data'}
embedder:
  assets_dir: {assets}
logging:
  level: warn
  access_log: false
demo:
  mode: off
""")
    (conf / "providers.yaml").write_text(f"""providers:
  healthy:
    kind: openai
    base_url: http://127.0.0.1:{healthy}/v1
  faulty:
    kind: openai
    base_url: http://127.0.0.1:{faulty}/v1
    circuit_breaker: {{ failures: 5, cooldown: 2s }}
""")
    (conf / "models.yaml").write_text("""models:
  - name: soak
    deployments:
      - provider: faulty
        model: mock-small
      - provider: healthy
        model: mock-small
""")
    cache_yaml = "cache:\n  enabled: true\n  similarity_threshold: {}\n  ttl: " + args.ttl + "\n"
    (conf / "cache.yaml").write_text(cache_yaml.format(0.95))
    for p in (healthy, faulty):
        wait_ready(p, "/health")
    gw = spawn([f"{args.bin}/smartllm", "serve", "--config", str(conf)], "gateway")
    wait_ready(admin, "/readyz")

    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=worker, args=(port, stats, stop, i), daemon=True) for i in range(args.workers)]
    cuts = []
    threads += [threading.Thread(target=slow_client, args=(port, stop, cuts), daemon=True)
                for _ in range(args.slow_clients)]
    for t in threads:
        t.start()
    rows = []
    started = time.time()
    end = started + args.minutes * 60
    next_reload, next_hup, reloads, hups = started + 10, started + 15, 0, 0
    stats.take()
    try:
        while time.time() < end:
            time.sleep(args.window)
            now = time.time()
            if now >= next_reload:
                reloads += 1
                tmp = conf / ".cache.yaml.tmp"
                tmp.write_text(cache_yaml.format(0.95 if reloads % 2 == 0 else 0.96))
                os.replace(tmp, conf / "cache.yaml")
                next_reload += 10
            if now >= next_hup:
                gw.send_signal(signal.SIGHUP)
                hups += 1
                next_hup += 15
            ok, failed, lat, kinds = stats.take()
            rss, fds = proc_stats(gw.pid)
            vectors = int(metric(admin, "smartllm_cache_index_vectors"))
            rocks = metric(admin, 'smartllm_store_memory_bytes{kind="block_cache"}') / 2**20
            heap = metric(admin, 'smartllm_heap_bytes{kind="resident"}') / 2**20
            total = ok + failed
            row = {"t": round(now - started), "requests": total, "rps": total / args.window,
                   "success": ok / total if total else 1.0, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
                   "rss": rss, "fds": fds, "failed": failed, "vectors": vectors, "rocks": rocks, "heap": heap}
            rows.append(row)
            print(f"t={row['t']:>5}s rps={row['rps']:7.0f} ok={row['success'] * 100:7.3f}% "
                  f"p50={row['p50']:6.2f}ms p99={row['p99']:7.2f}ms rss={rss:6.0f}MiB rocksdb={rocks:5.0f}MiB heap={heap:5.0f}MiB fds={fds} vectors={vectors}",
                  file=sys.stderr, flush=True)
            if gw.poll() is not None:
                raise RuntimeError("the gateway exited during the soak")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=35)
        header_cuts = int(metric(admin, 'smartllm_client_timeouts_total{phase="header"}'))
        reloads_ok = 0
        try:
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
            c.request("GET", "/metrics")
            for line in c.getresponse().read().decode().splitlines():
                if line.startswith('smartllm_config_reloads_total{') and 'result="ok"' in line:
                    reloads_ok += int(float(line.rsplit(" ", 1)[1]))
        except OSError:
            pass
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    total = sum(r["requests"] for r in rows)
    failed = sum(r["failed"] for r in rows)
    first, last = rows[min(1, len(rows) - 1)], rows[-1]
    lines = [
        f"# Soak, {args.minutes:g} minutes ({stamp})", "",
        f"`bench/soak.py --minutes {args.minutes:g} --workers {args.workers}`: {args.workers} keep-alive clients; "
        "35% repeated questions (cache hits), 35% unique questions (misses), 30% streamed; one model over a healthy "
        f"mock-llm and one failing 30% of requests; cache TTL {args.ttl}; {args.slow_clients} slowloris connections "
        "trickling request heads; a config rewrite every 10 s and SIGHUP every 15 s.", "",
        f"- requests: {total:,}, failed: {failed} (success {100 * (total - failed) / max(total, 1):.3f}%)",
        f"- reloads applied: {reloads_ok} ({reloads} rewrites, {hups} SIGHUP)",
        f"- RSS: {first['rss']:.0f} MiB at t={first['t']} s, {last['rss']:.0f} MiB at the end; "
        f"max {max(r['rss'] for r in rows):.0f} MiB",
        f"- open fds: {first['fds']} at t={first['t']} s, {last['fds']} at the end; max {max(r['fds'] for r in rows)}",
        f"- cached vectors: {last['vectors']:,} at the end; max {max(r['vectors'] for r in rows):,}",
        f"- slowloris connections cut by the header deadline: {header_cuts} "
        f"(median {pct(sorted(cuts), 0.5):.1f} s, max {max(cuts, default=0):.1f} s after opening)",
        "", "| t (s) | req/s | success % | p50 ms | p99 ms | RSS MiB | jemalloc MiB | RocksDB MiB | fds | vectors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    step = max(1, len(rows) // 40)
    for r in rows[::step]:
        lines.append(f"| {r['t']} | {r['rps']:.0f} | {100 * r['success']:.3f} | {r['p50']:.2f} | {r['p99']:.2f} "
                     f"| {r['rss']:.0f} | {r['heap']:.0f} | {r['rocks']:.0f} | {r['fds']} | {r['vectors']} |")
    lines += ["", f"![soak](soak-{stamp}.png)", ""]
    (out / f"soak-{stamp}.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ts = [r["t"] for r in rows]
        fig, ax = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
        ax[0][0].plot(ts, [100 * r["success"] for r in rows])
        ax[0][0].set_ylabel("success %")
        ax[0][1].plot(ts, [r["p50"] for r in rows], label="p50")
        ax[0][1].plot(ts, [r["p99"] for r in rows], label="p99")
        ax[0][1].set_ylabel("latency ms")
        ax[0][1].legend()
        ax[1][0].plot(ts, [r["rss"] for r in rows], label="RSS MiB")
        ax[1][0].plot(ts, [r["heap"] for r in rows], label="jemalloc resident MiB (all allocations)")
        ax[1][0].plot(ts, [r["rocks"] for r in rows], label="RocksDB cache + memtables MiB")
        ax[1][0].plot(ts, [r["vectors"] / 100 for r in rows], label="cached vectors / 100")
        ax[1][0].set_ylabel("gateway memory")
        ax[1][0].legend()
        ax[1][1].plot(ts, [r["fds"] for r in rows])
        ax[1][1].set_ylabel("gateway open fds")
        for a in ax[1]:
            a.set_xlabel("seconds")
        for a in ax.flat:
            a.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"soak-{stamp}.png", dpi=100)
    except ImportError:
        print("matplotlib not found: no plot (run bench/compare once, or pip install matplotlib)", file=sys.stderr)
    print(f"wrote {out / f'soak-{stamp}.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
