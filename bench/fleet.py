#!/usr/bin/env python3
"""Fleet benchmark (issue #20): what sharing the cache through Redis buys and costs.

    python3 bench/fleet.py [--questions 200] [--repeats 4] [--out bench/results]

Starts one redis-server, one mock-llm and gateways built in
$CARGO_TARGET_DIR/release (assets from $SMARTLLM_ASSETS_DIR), on loopback:

1. Hit rate: the same workload (each of Q questions asked R times, in a
   shuffled order; the first ask of a question can only miss) sent
   round-robin to three gateways that share the cache
   (`fleet.share_cache: true`), to three that do not (the baseline a load
   balancer gives today), and to one gateway. The best possible hit rate is
   (R-1)/R.
2. Replication cost: N distinct answers stored through gateway A as fast as
   it takes them; how long until gateway B has applied all of them (entries
   applied per second), and Redis memory per entry (`INFO memory` before and
   after, with the snapshot hashes and the stream).

All figures come from this one run; the prompts are synthetic (templated
questions), labelled so in the report.
"""
import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
ASSETS = Path(os.environ.get("SMARTLLM_ASSETS_DIR", Path.home() / ".cache/smartllm-assets"))
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, log):
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    PROCS.append(p)
    return p


def http(method, url, body=None, headers=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait(f, secs=60):
    end = time.time() + secs
    while time.time() < end:
        try:
            if f():
                return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


class Redis:
    def __init__(self, tmp):
        self.port = free_port()
        spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(tmp)], tmp / "redis.log")
        assert wait(lambda: self.cmd("PING").startswith("+PONG")), "redis-server did not start"

    def cmd(self, line):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(line.encode() + b"\r\n")
            out = b""
            while True:
                chunk = s.recv(65536)
                out += chunk
                if not chunk or out.endswith(b"\r\n") and (not out.startswith(b"$") or out.count(b"\r\n") >= 2):
                    break
            return out.decode(errors="replace")

    def used_memory(self):
        info = self.cmd("INFO memory")
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RuntimeError(info)


class Gateway:
    def __init__(self, tmp, name, mock_addr, redis_url, share, prefix):
        d = tmp / name
        (d / "data").mkdir(parents=True)
        self.port, self.admin_port = free_port(), free_port()
        fleet = ""
        if redis_url:
            fleet = (f"fleet:\n  redis: {redis_url}\n  key_prefix: {prefix}\n  timeout: 300ms\n"
                     f"  share_cache: {'true' if share else 'false'}\n  share_costs: false\n")
        (d / "smartllm.yaml").write_text(
            f"server:\n  listen: 127.0.0.1:{self.port}\n  admin_listen: 127.0.0.1:{self.admin_port}\n  threads: 1\n"
            f"data_dir: {d / 'data'}\nembedder:\n  assets_dir: {ASSETS}\n  threads: 1\n"
            f"demo:\n  mode: off\nlogging:\n  access_log: false\n{fleet}")
        (d / "providers.yaml").write_text(
            f"providers:\n  mock:\n    kind: openai\n    base_url: http://{mock_addr}/v1\n")
        (d / "models.yaml").write_text(
            "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n"
            "    deployments:\n      - provider: mock\n        model: mock-small\n")
        (d / "routes.yaml").write_text("routes:\n  auto:\n    model: small\n")
        (d / "keys.yaml").write_text("require_key: false\nkeys: []\n")
        (d / "cache.key").write_text("5e" * 32)
        (d / "cache.yaml").write_text(
            "cache:\n  enabled: true\n  similarity_threshold: 0.95\n  encryption_key_file: cache.key\n")
        self.dir, self.name = d, name
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.start()

    def start(self):
        self.proc = spawn([str(TARGET / "smartllm"), "serve", "--config", str(self.dir)],
                          self.dir / "gateway.log")
        assert wait(lambda: http("GET", self.admin + "/readyz")[0] == 200, 90), f"{self.name} not ready"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def ask(self, text):
        status, headers, _ = http("POST", self.base + "/v1/chat/completions",
                                  {"model": "auto", "messages": [{"role": "user", "content": text}]},
                                  {"authorization": "Bearer sk-bench"})
        assert status == 200, status
        return {k.lower(): v for k, v in headers.items()}.get("x-smartllm-cache", "none")

    def metric(self, name, labels):
        _, _, body = http("GET", self.admin + "/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def entries(self):
        return json.loads(http("GET", self.admin + "/admin/cache/stats")[2])["stats"]["l1_entries"]


TOPICS = ["reset my password", "rotate an API key", "export my invoices", "enable two-factor login",
          "change the billing address", "delete my account", "invite a teammate", "raise my rate limit",
          "download the audit log", "cancel my subscription"]
OBJECTS = ["on the web app", "from the CLI", "for the staging project", "for team Alpha", "on Android",
           "on iOS", "through the API", "for the EU region", "on the admin console", "in the desktop client",
           "for a service account", "for project Orion", "during a trial", "after an SSO migration",
           "for read-only users", "for the nightly job", "with Terraform", "in the sandbox", "for a reseller",
           "with the Python SDK"]


def questions(n):
    out = []
    for i in range(n):
        t, o = TOPICS[i % len(TOPICS)], OBJECTS[(i // len(TOPICS)) % len(OBJECTS)]
        out.append(f"How do I {t} {o}? (case {i})")
    return out


def hit_rate(nodes, qs, repeats, seed, pause):
    rng = random.Random(seed)
    work = [q for q in qs for _ in range(repeats)]
    rng.shuffle(work)
    hits = 0
    for i, q in enumerate(work):
        if nodes[i % len(nodes)].ask(q).startswith("hit"):
            hits += 1
        if pause:
            time.sleep(pause)
    return hits / len(work)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--replicate", type=int, default=3000)
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between requests of the hit-rate runs")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is needed (apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="smartllm-fleet-"))
    try:
        redis = Redis(tmp)
        url = f"redis://127.0.0.1:{redis.port}/0"
        mock_addr = f"127.0.0.1:{free_port()}"
        spawn([str(TARGET / "mock-llm"), "--listen", mock_addr], tmp / "mock.log")
        assert wait(lambda: http("GET", f"http://{mock_addr}/health")[0] == 200)
        qs = questions(args.questions)
        best = (args.repeats - 1) / args.repeats
        rows = []
        for label, count, redis_url, share, prefix in [
            ("1 gateway", 1, None, False, "one"),
            ("3 gateways, cache not shared", 3, url, False, "apart"),
            ("3 gateways, share_cache", 3, url, True, "shared"),
        ]:
            nodes = [Gateway(tmp, f"{prefix}{i}", mock_addr, redis_url, share, prefix) for i in range(count)]
            t = time.time()
            rate = hit_rate(nodes, qs, args.repeats, 7, args.pause)
            rows.append((label, rate, time.time() - t))
            print(f"{label}: hit rate {rate:.1%} (best possible {best:.1%})", flush=True)
            for n in nodes:
                n.stop()
        # Replication cost: N answers stored through A while B is stopped;
        # B then resumes from its stream position and applies them all.
        a = Gateway(tmp, "repA", mock_addr, url, True, "rep")
        b = Gateway(tmp, "repB", mock_addr, url, True, "rep")
        b.stop()
        # B's start alone (nothing to apply), to tell it apart from applying.
        t = time.time()
        b.start()
        startup = time.time() - t
        b.stop()
        before_mem = redis.used_memory()
        texts = [f"Replication probe {i}: which setting controls the retention of log bucket {i}?"
                 for i in range(args.replicate)]
        t0 = time.time()
        lock = threading.Lock()
        todo = list(texts)

        def worker():
            while True:
                with lock:
                    if not todo:
                        return
                    q = todo.pop()
                a.ask(q)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        stored_at = time.time()
        after_mem = redis.used_memory()
        resumed = time.time()
        b.start()

        def applied_by_b():
            return b.metric("smartllm_fleet_sync_total", {"what": "cache_apply", "outcome": "stored"})

        ok = wait(lambda: applied_by_b() >= args.replicate, 300)
        applied_at = time.time()
        applied = applied_by_b()
        per_entry = (after_mem - before_mem) / max(applied, 1)
        # Answers here are ~12 words (~110 bytes of completion JSON, sealed ~400 bytes).
        report = [
            f"# Fleet: a shared cache through Redis ({time.strftime('%Y-%m-%d')})",
            "",
            "`python3 bench/fleet.py` on this machine (2 cores; every gateway, mock-llm and redis-server on it).",
            f"Workload: **synthetic** templated questions, {args.questions} distinct, each asked {args.repeats} "
            f"times in a shuffled order, round-robin over the gateways (best possible hit rate {best:.1%}).",
            "",
            "| gateways | hit rate | share of the possible | wall |",
            "|---|---|---|---|",
        ]
        for label, rate, secs in rows:
            report.append(f"| {label} | {rate:.1%} | {rate / best:.0%} | {secs:.1f} s |")
        report += [
            "",
            f"Replication: {args.replicate} distinct answers stored through gateway A (8 concurrent clients) "
            f"in {stored_at - t0:.1f} s while gateway B was stopped; restarted, B resumed from its stream "
            f"position and had applied {int(applied)} of them {applied_at - resumed:.2f} s after it was started "
            f"(its start alone takes {startup:.2f} s): "
            f"**{applied / max(applied_at - resumed - startup, 1e-3):.0f} entries applied per second** beyond the "
            f"start, with A, B and Redis on the same 2 cores{'' if ok else ' (timed out)'}.",
            f"Redis memory per entry (snapshot hash + stream entry, sealed answer + 384-float vector): "
            f"{per_entry:.0f} bytes.",
        ]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"fleet-{time.strftime('%Y%m%d')}.md"
        path.write_text("\n".join(report) + "\n")
        print("\n".join(report))
        print(f"written to {path}")
    finally:
        for p in PROCS:
            try:
                os.killpg(p.pid, 15)
            except Exception:
                pass
        time.sleep(0.5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
