#!/usr/bin/env python3
"""SmartLLM Router next to nginx, LiteLLM and Portkey, in one run.

Started by bench/compare (which installs the peers). Everything listens on
loopback: one mock-llm, and in front of it nginx (plain reverse proxy), the
LiteLLM proxy (one worker), the Portkey gateway (Node), and SmartLLM with its
cache off and on. The same load generator (oha) drives each target in turn,
interleaved per scenario, at fixed concurrency levels and fixed request rates,
non-streamed and streamed. The targets run pinned to CPU 0; oha and mock-llm
share CPU 1, so a target's figures are its own core's worth of work.

Writes bench/results/REPORT.md, results.json and PNG plots.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-bench-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS = ["nginx", "litellm", "portkey"]
LABEL = {
    "direct": "direct to mock",
    "nginx": "nginx",
    "litellm": "LiteLLM",
    "portkey": "Portkey",
    "smartllm": "SmartLLM (cache off)",
    "smartllm-cache": "SmartLLM (cache on)",
    "smartllm-cache-fp32": "SmartLLM (cache on, fp32 embedding model)",
}


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def body(prompt, stream=False, model="mock-small"):
    b = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        b["stream"] = True
    return json.dumps(b, separators=(",", ":"))


PROMPT = "What is the capital of France? Answer in one sentence."


# ------------------------------------------------------------------ processes


def proc_tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return total / CLK_TCK


def rss_mib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Target:
    def __init__(self, name, url, headers, proc, work):
        self.name, self.url, self.headers, self.proc, self.work = name, url, headers, proc, work
        self.peak_rss = 0.0

    def pids(self):
        return proc_tree(self.proc.pid)


def wait_http(url, timeout, headers=(), data=None):
    import urllib.request

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, data=data.encode() if data else None, headers=dict(headers))
            if data:
                req.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, dict(r.headers), r.read()
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
            time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def spawn(cmd, work, name, cpu, env=None):
    logf = open(work / f"{name}.log", "w")
    full = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_all(args, work):
    mock_port = free_port()
    mock = spawn([f"{args.bin}/mock-llm", "--listen", f"127.0.0.1:{mock_port}", "--threads", "1"], work, "mock", 1)
    upstream = f"http://127.0.0.1:{mock_port}"
    wait_http(f"{upstream}/health", 10)
    targets = {"direct": Target("direct", f"{upstream}/v1/chat/completions", [], mock, work)}

    if "nginx" in args.targets:
        port = free_port()
        (work / "nginx").mkdir()
        (work / "nginx/nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx/nginx.pid;
error_log {work}/nginx/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx;
    proxy_temp_path {work}/nginx;
    upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
        p = spawn(["nginx", "-c", f"{work}/nginx/nginx.conf", "-p", f"{work}/nginx"], work, "nginx", 0)
        targets["nginx"] = Target("nginx", f"http://127.0.0.1:{port}/v1/chat/completions", [], p, work)

    if "litellm" in args.targets:
        port = free_port()
        (work / "litellm.yaml").write_text(f"""model_list:
  - model_name: mock-small
    litellm_params:
      model: openai/mock-small
      api_base: {upstream}/v1
      api_key: sk-bench
litellm_settings:
  drop_params: true
""")
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MASTER_KEY=MASTER_KEY)
        p = spawn([args.litellm, "--config", str(work / "litellm.yaml"), "--host", "127.0.0.1",
                   "--port", str(port), "--num_workers", "1"], work, "litellm", 0, env)
        targets["litellm"] = Target("litellm", f"http://127.0.0.1:{port}/v1/chat/completions",
                                    [("Authorization", f"Bearer {MASTER_KEY}")], p, work)

    if "portkey" in args.targets:
        port = free_port()
        env = dict(os.environ, NODE_ENV="production")
        p = spawn(["node", args.portkey, f"--port={port}", "--headless"], work, "portkey", 0, env)
        targets["portkey"] = Target("portkey", f"http://127.0.0.1:{port}/v1/chat/completions", [
            ("x-portkey-provider", "openai"), ("x-portkey-custom-host", f"{upstream}/v1"),
            ("Authorization", "Bearer sk-bench")], p, work)

    # smartllm-cache-fp32: the cache-on instance with the embedding model
    # computed in fp32 (model.onnx), the baseline of the cache paths.
    for name, cache in (("smartllm", False), ("smartllm-cache", True), ("smartllm-cache-fp32", True)):
        if name not in args.targets:
            continue
        port, admin = free_port(), free_port()
        conf = work / name / "conf"
        conf.mkdir(parents=True)
        (conf / "smartllm.yaml").write_text(f"""server:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
  threads: 1
data_dir: {work / name / 'data'}
embedder:
  assets_dir: {os.environ.get('SMARTLLM_ASSETS_DIR', Path.home() / '.cache/smartllm-assets')}
  model: {'model.onnx' if name.endswith('fp32') else 'model.int8.onnx'}
  threads: 1
  cache_entries: 0  # no recent-embeddings cache: a repeated paraphrase pays the model every time
logging:
  level: warn
  access_log: false
demo:
  mode: off
""")
        (conf / "providers.yaml").write_text(f"providers:\n  mock:\n    kind: openai\n    base_url: {upstream}/v1\n")
        (conf / "models.yaml").write_text(
            "models:\n"
            "  - name: mock-small\n    pricing: { input: 0.15, output: 0.60 }\n"
            "    profile: { quality: { chat: 0.8, code: 0.7 }, latency: 300ms }\n"
            "    deployments:\n      - provider: mock\n"
            "  - name: mock-large\n    pricing: { input: 2.50, output: 10.00 }\n"
            "    profile: { quality: { chat: 0.9, code: 0.9 }, latency: 800ms }\n"
            "    deployments:\n      - provider: mock\n")
        # `auto` as shipped: the prompt's embedding classifies the task.
        (conf / "routes.yaml").write_text(
            "routes:\n  auto:\n    candidates: [mock-small, mock-large]\n"
            "classifier:\n  examples: tasks.tsv\n  k: 7\n")
        shutil.copy(ROOT / "conf" / "tasks.tsv", conf / "tasks.tsv")
        (conf / "cache.yaml").write_text(f"cache:\n  enabled: {'true' if cache else 'false'}\n  similarity_threshold: 0.95\n")
        p = spawn([f"{args.bin}/smartllm", "serve", "--config", str(conf)], work, name, 0)
        t = Target(name, f"http://127.0.0.1:{port}/v1/chat/completions", [], p, work)
        t.admin = f"http://127.0.0.1:{admin}"
        targets[name] = t

    for t in targets.values():
        st, _, _ = wait_http(t.url, 120, t.headers, body(PROMPT))
        st2, _, raw = wait_http(t.url, 30, t.headers, body(PROMPT, stream=True))
        if st != 200 or st2 != 200 or b"data:" not in raw:
            raise RuntimeError(f"{t.name}: plain {st}, stream {st2}: {raw[:200]!r}")
        log(f"{LABEL[t.name]} ready at {t.url}")
    return targets


def stop_all(targets):
    for t in targets.values():
        try:
            os.killpg(t.proc.pid, signal.SIGTERM)
            os.killpg(t.proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    for t in targets.values():
        try:
            t.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(t.proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------ load


class Quiet:
    """While one target is measured, the other gateways are stopped (SIGSTOP):
    they share CPU 0, and their idle background work (health checks, timers,
    Python and Node housekeeping) would otherwise land in its latency tail."""

    def __init__(self, targets, measured):
        self.others = [t for t in targets.values() if t.name not in ("direct", measured.name)]

    def __enter__(self):
        for t in self.others:
            os.killpg(t.proc.pid, signal.SIGSTOP)

    def __exit__(self, *exc):
        for t in self.others:
            os.killpg(t.proc.pid, signal.SIGCONT)


def oha(args, t, *, duration, conns, rate=None, data=None, lines=None, extra_headers=()):
    cmd = ["taskset", "-c", "1", args.oha, "--no-tui", "-z", f"{duration}s", "-w", "-c", str(conns),
           "-m", "POST", "-T", "application/json", "--output-format", "json", "-t", "30s"]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    if lines:
        cmd += ["-Z", str(lines)]
    else:
        cmd += ["-d", data]
    for k, v in list(t.headers) + list(extra_headers):
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(t.url)
    pids = t.pids()
    cpu0 = cpu_seconds(pids)
    stop = threading.Event()
    peak = [0.0]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(pids))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = subprocess.run(cmd, capture_output=True, text=True)
    stop.set()
    th.join()
    cpu = cpu_seconds(pids) - cpu0
    t.peak_rss = max(t.peak_rss, peak[0])
    if out.returncode != 0:
        raise RuntimeError(f"oha failed on {t.name}: {out.stderr[-500:]}")
    d = json.loads(out.stdout)
    codes = {int(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
    ok = codes.get(200, 0)
    errors = sum(v for k, v in codes.items() if k != 200) + sum(d.get("errorDistribution", {}).values())
    secs = d["summary"]["total"]
    lp = d["latencyPercentiles"]
    ms = lambda k: (lp.get(k) or 0) * 1000  # noqa: E731
    return {
        "rps": ok / secs if secs else 0,
        "ok": ok,
        "errors": errors,
        "error_kinds": {**{str(k): v for k, v in codes.items() if k != 200}, **d.get("errorDistribution", {})},
        "p50": ms("p50"), "p99": ms("p99"), "p999": ms("p99.9"),
        "cpu_per_1k": cpu / ok * 1000 if ok else None,
        "rss_mib": peak[0],
    }


# ------------------------------------------------------------------ profile


def profile_smartllm(args, t, work):
    """perf record on the gateway while it runs at its max concurrency."""
    if not shutil.which("perf"):
        return None
    data = work / "perf.data"
    conns = max(args.concurrency)
    rec = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", str(data), "-p", str(t.proc.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    oha(args, t, duration=args.duration, conns=conns, data=body(PROMPT))
    rec.send_signal(signal.SIGINT)
    rec.wait(timeout=30)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
                          "--percent-limit", "1.5", "-g", "none"], capture_output=True, text=True)
    rows = []
    for line in rep.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line.split()[0]:
            continue
        parts = line.split(None, 2)
        if len(parts) == 3:
            rows.append((parts[0], parts[1], parts[2]))
    dsos = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso",
                           "-g", "none"], capture_output=True, text=True)
    by_dso = []
    for line in dsos.stdout.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line.split()[0].endswith("%"):
            by_dso.append(tuple(line.split(None, 1)))
    return {"symbols": rows[:25], "dsos": by_dso[:10], "conns": conns}


# ------------------------------------------------------------------ report


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def versions(args):
    def run(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"

    litellm_py = str(Path(args.litellm).parent / "python")
    # Only the targets being measured need to be installed (--targets nginx,smartllm runs without the peers).
    pk_json = Path(args.portkey).parent.parent / "package.json"
    pk = json.loads(pk_json.read_text())["version"] if "portkey" in args.targets and pk_json.is_file() else "-"
    return {
        "smartllm": run([f"{args.bin}/smartllm", "--version"]) + " (git " + run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) + ")",
        "nginx": run(["nginx", "-v"]),
        "LiteLLM": run([litellm_py, "-c", "import importlib.metadata as m; print(m.version('litellm'))"]),
        "Portkey gateway": pk + " (patched: bind 127.0.0.1, streaming header copy)",
        "node": run(["node", "--version"]),
        "oha": run([args.oha, "--version"]),
        "kernel": platform.release(),
    }


def machine():
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / 1024 / 1024
    except (OSError, StopIteration):
        mem = 0
    osr = "?"
    try:
        osr = next(l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, {osr}"


def plots(res, out, rates):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for mode in ("plain", "stream"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, pct in zip(axes, ("p50", "p99")):
            for name in res["targets"]:
                xs, ys = [], []
                for r in rates:
                    m = res["rate"].get(f"{mode}/{r}/{name}")
                    if m and not m.get("skipped"):
                        xs.append(r)
                        ys.append(max(m[pct], 1e-3))
                if xs:
                    ax.plot(xs, ys, marker="o", label=LABEL[name])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("offered load (requests/s)")
            ax.set_ylabel(f"{pct} latency (ms)")
            ax.set_title(f"{pct}, {'streamed' if mode == 'stream' else 'non-streamed'} chat completions")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        f = f"latency-vs-load-{mode}.png"
        fig.savefig(out / f, dpi=110)
        plt.close(fig)
        files.append(f)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in res["targets"]:
        xs, ys = [], []
        for c in res["concurrency"]:
            m = res["conc"].get(f"plain/{c}/{name}")
            if m:
                xs.append(c)
                ys.append(max(m["rps"], 1))
        ax.plot(xs, ys, marker="o", label=LABEL[name])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests/s (non-streamed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput-vs-concurrency.png", dpi=110)
    plt.close(fig)
    files.append("throughput-vs-concurrency.png")
    return files


def report(res, out, files):
    L = []
    w = L.append
    w("# SmartLLM Router next to nginx, LiteLLM and Portkey\n")
    w(f"Generated by `{res['command']}` on {res['date']}.\n")
    w(f"- Machine: {res['machine']}.")
    for k, v in res["versions"].items():
        w(f"- {k}: {v}")
    w(f"- Load: oha, {res['duration']} s per run, {res['rounds']} round(s), targets interleaved within each scenario; "
      "fixed rates use `-q` with latency correction (no coordinated omission).")
    w("- Placement: every target pinned to CPU 0 with one worker (nginx `worker_processes 1`, LiteLLM "
      "`--num_workers 1`, Portkey one Node process, SmartLLM `server.threads: 1`); oha and mock-llm "
      "(one thread, 0 ms latency) share CPU 1. While a target is measured the other gateways are stopped (SIGSTOP), "
      "so their idle background work does not land in its latency tail. nginx and SmartLLM access logs off; "
      "LiteLLM and Portkey at their defaults.")
    w("- Request: `POST /v1/chat/completions`, one short user message (~90 bytes); streamed runs add "
      "`\"stream\": true` and time the whole stream. LiteLLM gets its master key; Portkey `x-portkey-provider: openai` "
      "with `x-portkey-custom-host` pointing at the mock.\n")

    conc, rate = res["conc"], res["rate"]
    names = res["targets"]
    for mode in ("plain", "stream"):
        w(f"## Throughput, {'streamed' if mode == 'stream' else 'non-streamed'} (requests/s at fixed concurrency)\n")
        w("| target | " + " | ".join(f"c={c}" for c in res["concurrency"]) + " | errors |")
        w("|---|" + "---|" * (len(res["concurrency"]) + 1))
        for n in names:
            ms = [conc.get(f"{mode}/{c}/{n}") for c in res["concurrency"]]
            errs = sum(m["errors"] for m in ms if m)
            w(f"| {LABEL[n]} | " + " | ".join(fmt(m["rps"], 0) if m else "-" for m in ms) + f" | {errs} |")
        w("")
        w("SmartLLM (cache off) max RPS as a multiple of each peer's:\n")
        w("| vs | " + " | ".join(f"c={c}" for c in res["concurrency"]) + " |")
        w("|---|" + "---|" * len(res["concurrency"]))
        for p in [x for x in PEERS + ["direct"] if x in names]:
            row = []
            for c in res["concurrency"]:
                a, b = conc.get(f"{mode}/{c}/smartllm"), conc.get(f"{mode}/{c}/{p}")
                row.append(f"{a['rps'] / b['rps']:.2f}x" if a and b and b["rps"] else "-")
            w(f"| {LABEL[p]} | " + " | ".join(row) + " |")
        w("")

    for mode in ("plain", "stream"):
        w(f"## Added latency over direct-to-mock, {'streamed' if mode == 'stream' else 'non-streamed'}, fixed rates (ms)\n")
        w("Each cell: p50 / p99 / p99.9 of the target minus the same percentile measured direct to the mock at "
          "the same rate. `sat.`: the rate is above 85% of what the target sustained at any concurrency, so it was not offered.\n")
        w("| target | " + " | ".join(f"{r}/s" for r in res["rates"]) + " |")
        w("|---|" + "---|" * len(res["rates"]))
        for n in names:
            if n == "direct":
                cells = []
                for r in res["rates"]:
                    m = rate.get(f"{mode}/{r}/direct")
                    cells.append("sat." if not m or m.get("skipped") else f"{m['p50']:.3f} / {m['p99']:.3f} / {m['p999']:.3f} (absolute)")
                w(f"| {LABEL[n]} | " + " | ".join(cells) + " |")
                continue
            cells = []
            for r in res["rates"]:
                m, d = rate.get(f"{mode}/{r}/{n}"), rate.get(f"{mode}/{r}/direct")
                if not m or m.get("skipped"):
                    cells.append("sat.")
                elif not d or d.get("skipped"):
                    cells.append(f"{m['p50']:.3f} / {m['p99']:.3f} / {m['p999']:.3f} (absolute)")
                else:
                    cells.append(f"{m['p50'] - d['p50']:+.3f} / {m['p99'] - d['p99']:+.3f} / {m['p999'] - d['p999']:+.3f}"
                                 + (f" ({m['errors']} err)" if m["errors"] else ""))
            w(f"| {LABEL[n]} | " + " | ".join(cells) + " |")
        w("")

    cmax = max(res["concurrency"])
    w(f"## Cost of a request (non-streamed, c={cmax})\n")
    w("| target | CPU seconds per 1,000 requests | vs SmartLLM | peak RSS (MiB, whole run) |")
    w("|---|---|---|---|")
    base = (conc.get(f"plain/{cmax}/smartllm") or {}).get("cpu_per_1k")
    for n in names:
        m = conc.get(f"plain/{cmax}/{n}")
        cpu = m["cpu_per_1k"] if m else None
        ratio = f"{cpu / base:.1f}x" if cpu and base else "-"
        w(f"| {LABEL[n]}{' (the mock itself)' if n == 'direct' else ''} | {fmt(cpu, 3)} | {ratio} | {fmt(res['rss'].get(n), 0)} |")
    w("")

    if res.get("cache"):
        w("## SmartLLM cache paths\n")
        w("Against the cache-on instance: `bypass` sends `Cache-Control: no-store` (straight to the mock), "
          "`exact` repeats a stored question, `semantic` sends a stored question's paraphrase (embedding + FAISS "
          "search + guard; the recent-embeddings cache is off, so it runs the model every time), `miss` sends a unique question each time (exact lookup, embedding, search, upstream, insert); "
          "`miss-auto` the same on the `auto` route (the embedding also classifies the task), `miss-60tok` and "
          "`miss-250tok` unique questions of about 60 and 250 tokens (synthetic texts).\n")
        base = res.get("cache_fp32", {})
        if base:
            w("The last column compares with a second cache-on instance whose embedding model computes in fp32 "
              "(`model.onnx`), measured in the same run.\n")
        w("| path | c | req/s | p50 ms | p99 ms | p99.9 ms | p50 vs bypass | req/s vs fp32 model |")
        w("|---|---|---|---|---|---|---|---|")
        for c in res["cache_conns"]:
            by = res["cache"].get(f"bypass/{c}")
            for path in ("bypass", "exact", "semantic", "miss", "miss-auto", "miss-60tok", "miss-250tok"):
                m = res["cache"].get(f"{path}/{c}")
                if not m:
                    continue
                ratio = f"{m['p50'] / by['p50']:.2f}x" if by and by["p50"] else "-"
                b = base.get(f"{path}/{c}")
                vs = f"{m['rps'] / b['rps']:.2f}x ({fmt(b['rps'], 0)})" if b and b["rps"] else "-"
                w(f"| {path} | {c} | {fmt(m['rps'], 0)} | {m['p50']:.3f} | {m['p99']:.3f} | {m['p999']:.3f} | {ratio} | {vs} |")
        w("")

    w("## Goals\n")
    w("| goal | measured | met |")
    w("|---|---|---|")
    for g in res["goals"]:
        w(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |")
    w("")
    if res.get("profile"):
        pr = res["profile"]
        w(f"## Profile: SmartLLM (cache off) at c={pr['conns']}, non-streamed\n")
        w("`perf record -F 499 -g` on the gateway process during a run; self time by shared object, then the "
          "hottest symbols.\n")
        w("| share | object |")
        w("|---|---|")
        for share, dso in pr["dsos"]:
            w(f"| {share} | {dso} |")
        w("")
        w("| share | object | symbol |")
        w("|---|---|---|")
        for share, dso, sym in pr["symbols"]:
            w(f"| {share} | {dso} | `{sym[:110]}` |")
        w("")
    if res.get("notes"):
        w("## Reading\n")
        for n in res["notes"]:
            w(f"- {n}")
        w("")
    w("## Plots\n")
    for f in files:
        w(f"![{f}]({f})\n")
    (out / "REPORT.md").write_text("\n".join(L) + "\n")


def goals(res):
    conc, rate = res["conc"], res["rate"]
    cmax = max(res["concurrency"])
    out = []
    m, d = rate.get("plain/2000/smartllm"), rate.get("plain/2000/direct")
    if m and d and not m.get("skipped") and not d.get("skipped"):
        added = m["p99"] - d["p99"]
        out.append({"goal": "added p99 <= 1 ms at 2,000 RPS, cache off", "measured": f"{added:+.3f} ms", "met": added <= 1.0})
    else:
        out.append({"goal": "added p99 <= 1 ms at 2,000 RPS, cache off", "measured": "2,000 RPS not offered", "met": False})

    def best(name):
        return max((conc[k]["rps"] for k in conc if k.startswith("plain/") and k.endswith(f"/{name}")), default=0)

    s = best("smartllm")
    for peer, want in (("nginx", 0.8), ("portkey", 10), ("litellm", 40)):
        b = best(peer)
        if b:
            out.append({"goal": f"max RPS >= {want}x {LABEL[peer]}'s", "measured": f"{s:,.0f} vs {b:,.0f} = {s / b:.2f}x",
                        "met": s / b >= want})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--oha", required=True)
    ap.add_argument("--litellm", required=True)
    ap.add_argument("--portkey", required=True)
    ap.add_argument("--command", default="bench/compare")
    ap.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median is kept (default 1)")
    ap.add_argument("--concurrency", default="1,16,64", help="fixed concurrency levels")
    ap.add_argument("--rates", default="50,250,1000,2000,4000,8000", help="fixed request rates")
    ap.add_argument("--targets", default="nginx,litellm,portkey,smartllm,smartllm-cache")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.rates = [int(x) for x in args.rates.split(",")]
    args.targets = args.targets.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="smartllm-compare-"))
    res = {
        "command": args.command, "date": datetime.date.today().isoformat(), "machine": machine(),
        "versions": versions(args), "duration": args.duration, "rounds": args.rounds,
        "concurrency": args.concurrency, "rates": args.rates, "conc": {}, "rate": {}, "rss": {}, "notes": [],
    }
    targets = start_all(args, work)
    try:
        names = list(targets)
        res["targets"] = names
        for t in targets.values():  # warm up: connection pools, JIT, caches
            for stream in (False, True):
                oha(args, t, duration=1.5, conns=16, data=body(PROMPT, stream))

        def median_run(t, **kw):
            with Quiet(targets, t):
                runs = sorted((oha(args, t, **kw) for _ in range(args.rounds)), key=lambda m: m["rps"])
            return runs[len(runs) // 2]

        for mode in ("plain", "stream"):
            for c in args.concurrency:
                for n in names:
                    m = median_run(targets[n], duration=args.duration, conns=c, data=body(PROMPT, mode == "stream"))
                    res["conc"][f"{mode}/{c}/{n}"] = m
                    log(f"{mode} c={c} {LABEL[n]}: {m['rps']:,.0f} req/s, p50 {m['p50']:.3f} ms, p99 {m['p99']:.3f} ms, errors {m['errors']}")
        for mode in ("plain", "stream"):
            cap = {n: max(res["conc"][f"{mode}/{c}/{n}"]["rps"] for c in args.concurrency) for n in names}
            for r in args.rates:
                for n in names:
                    key = f"{mode}/{r}/{n}"
                    if r > 0.85 * cap[n]:
                        res["rate"][key] = {"skipped": True}
                        continue
                    m = median_run(targets[n], duration=args.duration, conns=max(args.concurrency), rate=r,
                                   data=body(PROMPT, mode == "stream"))
                    res["rate"][key] = m
                    log(f"{mode} {r}/s {LABEL[n]}: p50 {m['p50']:.3f} p99 {m['p99']:.3f} p99.9 {m['p999']:.3f} ms, errors {m['errors']}")

        for cname, ckey in (("smartllm-cache", "cache"), ("smartllm-cache-fp32", "cache_fp32")):
            if cname not in targets:
                continue
            t = targets[cname]
            res[ckey], res["cache_conns"] = {}, [1, 16]
            stored = [f"How do I reset my password on account {i}?" for i in range(1)]
            wait_http(t.url, 10, (), body(stored[0]))
            time.sleep(0.5)
            _, h, _ = wait_http(t.url, 10, (), body("What is the way to reset my password on account 0?"))
            if h.get("x-smartllm-cache") != "hit-semantic":
                res["notes"].append(f"{cname}: the paraphrase was answered as `{h.get('x-smartllm-cache')}`, not a semantic hit")
            def miss_lines(name, words, model="mock-small"):
                # Unique questions of about `words` words (~1.3 tokens each), synthetic.
                vocab = ("route cache cost tenant budget latency model answer question invoice contract "
                         "summary python function database index server request token price").split()
                path = work / f"{name}.jsonl"
                with open(path, "w") as f:
                    for i in range(200_000):
                        filler = " ".join(vocab[(i * 7 + k * 13) % len(vocab)] for k in range(max(0, words - 8)))
                        f.write(body(f"Unique question {i} about topic {i * 7919 % 100003}? {filler}", model=model) + "\n")
                return path
            scenarios = (
                ("bypass", {"data": body(PROMPT), "extra_headers": [("Cache-Control", "no-store")]}),
                ("exact", {"data": body(stored[0])}),
                ("semantic", {"data": body("What is the way to reset my password on account 0?")}),
                ("miss", {"lines": miss_lines("miss", 8)}),
                ("miss-auto", {"lines": miss_lines("miss-auto", 8, model="auto")}),
                ("miss-60tok", {"lines": miss_lines("miss-60", 45)}),
                ("miss-250tok", {"lines": miss_lines("miss-250", 190)}),
            )
            for c in res["cache_conns"]:
                for path, kw in scenarios:
                    with Quiet(targets, t):
                        m = oha(args, t, duration=args.duration, conns=c, **kw)
                    res[ckey][f"{path}/{c}"] = m
                    log(f"{cname} {path} c={c}: {m['rps']:,.0f} req/s, p50 {m['p50']:.3f} ms, p99 {m['p99']:.3f} ms, errors {m['errors']}")

        res["rss"] = {n: t.peak_rss for n, t in targets.items()}
        res["goals"] = goals(res)
        if not args.no_profile and "smartllm" in targets:
            log("profiling SmartLLM with perf")
            with Quiet(targets, targets["smartllm"]):
                res["profile"] = profile_smartllm(args, targets["smartllm"], work)
    finally:
        stop_all(targets)
    files = plots(res, out, args.rates)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    report(res, out, files)
    log(f"wrote {out / 'REPORT.md'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
