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
    "smartllm-cache-2core": "SmartLLM (cache on, both cores)",
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
    import ssl
    import urllib.request

    ctx = ssl._create_unverified_context() if url.startswith("https:") else None  # the bench's self-signed cert

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, data=data.encode() if data else None, headers=dict(headers))
            if data:
                req.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                return r.status, dict(r.headers), r.read()
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
            time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


def spawn(cmd, work, name, cpu, env=None):
    """`cpu`: a CPU number or a taskset list such as "0,1"."""
    logf = open(work / f"{name}.log", "w")
    full = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def smartllm_conf(work, name, port, admin, upstream, *, cache=False, model_file="paraphrase-l3.int8.onnx",
                  server_extra="", providers_extra="", models_extra="", sized=False):
    """A gateway config directory: one thread (or, `sized`, the thread counts
    left to their defaults, sized from the machine), access log off, the mock
    as provider `mock` serving mock-small and mock-large, `auto` as shipped.
    Returns the directory."""
    conf = work / name / "conf"
    conf.mkdir(parents=True)
    threads = "" if sized else "  threads: 1\n"
    (conf / "smartllm.yaml").write_text(f"""server:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
{threads}{server_extra}data_dir: {work / name / 'data'}
embedder:
  assets_dir: {os.environ.get('SMARTLLM_ASSETS_DIR', Path.home() / '.cache/smartllm-assets')}
  model: {model_file}
{threads}  cache_entries: 0  # no recent-embeddings cache: a repeated paraphrase pays the model every time
logging:
  level: warn
  access_log: false
demo:
  mode: off
""")
    (conf / "providers.yaml").write_text(f"providers:\n  mock:\n    kind: openai\n    base_url: {upstream}/v1\n"
                                         + providers_extra)
    (conf / "models.yaml").write_text(
        "models:\n"
        "  - name: mock-small\n    pricing: { input: 0.15, output: 0.60 }\n"
        "    profile: { quality: { chat: 0.8, code: 0.7 }, latency: 300ms }\n"
        "    deployments:\n      - provider: mock\n"
        "  - name: mock-large\n    pricing: { input: 2.50, output: 10.00 }\n"
        "    profile: { quality: { chat: 0.9, code: 0.9 }, latency: 800ms }\n"
        "    deployments:\n      - provider: mock\n" + models_extra)
    # `auto` as shipped: the prompt's embedding classifies the task.
    (conf / "routes.yaml").write_text(
        "routes:\n  auto:\n    candidates: [mock-small, mock-large]\n"
        "classifier:\n  examples: tasks.tsv\n  k: 7\n")
    shutil.copy(ROOT / "conf" / "tasks.tsv", conf / "tasks.tsv")
    (conf / "cache.yaml").write_text(f"cache:\n  enabled: {'true' if cache else 'false'}\n  similarity_threshold: 0.95\n")
    return conf


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
            # The upstream group by name: `proxy_pass {upstream}` (the address) would bypass it and its
            # keep-alive pool, opening a new connection to the mock for every request.
            proxy_pass http://mock;
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
    # computed in fp32 (model.onnx, or --baseline-model), the baseline of the
    # cache paths. smartllm-cache-2core: the cache-on instance on both CPUs
    # with its thread counts sized from the machine, as `make run` starts it
    # (oha and the mock stay on CPU 1, so it shares that one with them).
    for name, cache in (("smartllm", False), ("smartllm-cache", True), ("smartllm-cache-fp32", True),
                        ("smartllm-cache-2core", True)):
        if name not in args.targets:
            continue
        port, admin = free_port(), free_port()
        sized = name.endswith("2core")
        conf = smartllm_conf(work, name, port, admin, upstream, cache=cache, sized=sized,
                             model_file=args.baseline_model if name.endswith("fp32") else "paraphrase-l3.int8.onnx")
        p = spawn([f"{args.bin}/smartllm", "serve", "--config", str(conf)], work, name, "0,1" if sized else 0)
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
        # By process: several targets (a gateway's endpoints) may share one.
        seen = {measured.proc.pid}
        self.others = []
        for t in targets.values():
            if t.name != "direct" and t.proc.pid not in seen:
                seen.add(t.proc.pid)
                self.others.append(t)

    def __enter__(self):
        for t in self.others:
            os.killpg(t.proc.pid, signal.SIGSTOP)

    def __exit__(self, *exc):
        for t in self.others:
            os.killpg(t.proc.pid, signal.SIGCONT)


def oha(args, t, *, duration, conns, rate=None, data=None, lines=None, body_file=None, extra_headers=(),
        url=None, flags=()):
    cmd = ["taskset", "-c", "1", args.oha, "--no-tui", "-z", f"{duration}s", "-w", "-c", str(conns),
           "-m", "POST", "-T", "application/json", "--output-format", "json", "-t", "30s", *flags]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    if lines:
        cmd += ["-Z", str(lines)]
    elif body_file:
        cmd += ["-D", str(body_file)]
    else:
        cmd += ["-d", data]
    for k, v in list(t.headers) + list(extra_headers):
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url or t.url)
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
        "cpu_util": cpu / secs if secs else None,  # the target's share of one core (CPU 0)
        "rss_mib": peak[0],
    }


# ------------------------------------------------------------------ profile


def profile_smartllm(args, t, work, conns=None, **load):
    """perf record on the gateway while it runs at its max concurrency (by default a short chat request)."""
    if not shutil.which("perf"):
        return None
    data = work / "perf.data"
    conns = conns or max(args.concurrency)
    rec = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", str(data), "-p", str(t.proc.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    oha(args, t, duration=args.duration, conns=conns, **(load or {"data": body(PROMPT)}))
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
    w("- Placement: every target pinned to CPU 0 with one worker"
      + (" (but `SmartLLM (cache on, both cores)`, on CPUs 0 and 1 with its thread counts sized from the machine)"
         if res.get("cache_2core") else "")
      + " (nginx `worker_processes 1`, LiteLLM "
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
            bm = res.get("baseline_model", "model.onnx")
            w("The last column compares with a second cache-on instance whose embedding model is "
              + ("the fp32 one (`model.onnx`)" if bm == "model.onnx" else f"`{bm}`")
              + ", measured in the same run.\n")
        both = res.get("cache_2core", {})
        if both:
            w("The last three columns are a third cache-on instance on **both** CPUs, its thread counts sized "
              "from the machine (two proxy threads, two embedder threads), as `make run` starts it; oha and "
              "the mock still run on CPU 1, beside it. Same run.\n")
        w("| path | c | req/s | p50 ms | p99 ms | p99.9 ms | p50 vs bypass | req/s vs baseline model"
          + (" | both cores: req/s | p50 ms | p99 ms |" if both else " |"))
        w("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if both else ""))
        for c in res["cache_conns"]:
            by = res["cache"].get(f"bypass/{c}")
            for path in ("bypass", "exact", "semantic", "miss", "miss-auto", "miss-60tok", "miss-250tok"):
                m = res["cache"].get(f"{path}/{c}")
                if not m:
                    continue
                ratio = f"{m['p50'] / by['p50']:.2f}x" if by and by["p50"] else "-"
                b = base.get(f"{path}/{c}")
                vs = f"{m['rps'] / b['rps']:.2f}x ({fmt(b['rps'], 0)})" if b and b["rps"] else "-"
                row = f"| {path} | {c} | {fmt(m['rps'], 0)} | {m['p50']:.3f} | {m['p99']:.3f} | {m['p999']:.3f} | {ratio} | {vs} |"
                if both:
                    x = both.get(f"{path}/{c}")
                    row += f" {fmt(x['rps'], 0)} | {x['p50']:.3f} | {x['p99']:.3f} |" if x else " - | - | - |"
                w(row)
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
    elif any(k.endswith("/smartllm") for k in conc):
        out.append({"goal": "added p99 <= 1 ms at 2,000 RPS, cache off", "measured": "2,000 RPS not offered", "met": False})

    def best(name):
        return max((conc[k]["rps"] for k in conc if k.startswith("plain/") and k.endswith(f"/{name}")), default=0)

    s = best("smartllm")
    for peer, want in (("nginx", 0.8), ("portkey", 10), ("litellm", 40)):
        b = best(peer)
        if b:
            out.append({"goal": f"max RPS >= {want}x {LABEL[peer]}'s", "measured": f"{s:,.0f} vs {b:,.0f} = {s / b:.2f}x",
                        "met": s / b >= want})

    # Issue #22's goals for the cache paths, for each cache-on instance measured.
    for key, where in (("cache", "one core"), ("cache_2core", "both cores")):
        c = res.get(key) or {}

        def row(goal, path, conns, want_rps=None, max_p50=None, max_p99=None):
            m = c.get(f"{path}/{conns}")
            if not m:
                return
            met = ((want_rps is None or m["rps"] >= want_rps) and (max_p50 is None or m["p50"] <= max_p50)
                   and (max_p99 is None or m["p99"] <= max_p99))
            out.append({"goal": f"{goal} ({where})",
                        "measured": f"{m['rps']:,.0f} req/s, p50 {m['p50']:.2f} ms, p99 {m['p99']:.2f} ms", "met": met})

        row("semantic hit p50 <= 1.5 ms at c=1", "semantic", 1, max_p50=1.5)
        row("semantic hit >= 1,500 req/s at c=16", "semantic", 16, want_rps=1500)
        row("novel prompts on `auto` >= 1,500 req/s at c=16, p99 <= 20 ms", "miss-auto", 16, want_rps=1500, max_p99=20)
        row("novel ~60-token prompts >= 1,000 req/s at c=16", "miss-60tok", 16, want_rps=1000)
    return out


# ------------------------------------------------------------------ front door (issue #17)
#
# `--suite frontdoor`: the gateway's other client APIs, TLS + HTTP/2 and large
# request bodies, each as ratios against a baseline measured in the same run
# (interleaved per round): Chat Completions through the same gateway, plaintext
# HTTP/1.1 through the same server, and nginx in front of the same mock.

ANTHROPIC_VERSION = "2023-06-01"
FD_SIZES = (1024, 16 * 1024, 256 * 1024)
COMPILERS = {"rustc", "cargo", "cc1plus", "cc1", "ld", "ld.lld", "collect2"}


def compilers_running():
    """Names of compiler processes now running on the machine (other engineers' builds)."""
    seen = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    c = f.read().strip()
            except OSError:
                continue
            if c in COMPILERS:
                seen.add(c)
    return sorted(seen)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_quiet(limit):
    """Wait up to `limit` seconds until no compiler has run for 10 s (two looks, so the gap between two
    cargo steps does not count); returns the seconds waited and what still ran."""
    t0, quiet_since = time.time(), None
    while True:
        busy = compilers_running()
        now = time.time()
        quiet_since = (quiet_since or now) if not busy else None
        if (quiet_since and now - quiet_since >= 10) or now - t0 >= limit:
            return now - t0, busy
        if busy:
            log(f"waiting for compilers to finish: {', '.join(busy)} (load {loadavg()})")
        time.sleep(5 if not busy else 10)


def messages_body(prompt, stream=False, model="mock-small"):
    b = {"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        b["stream"] = True
    return json.dumps(b, separators=(",", ":"))


def responses_body(prompt, stream=False, model="mock-small"):
    b = {"model": model, "input": prompt}
    if stream:
        b["stream"] = True
    return json.dumps(b, separators=(",", ":"))


def sized_body(size):
    """A non-streamed chat request of exactly `size` bytes whose one user message is an
    agent-style prompt: prose, a file excerpt with quotes, tabs and newlines (escaped in JSON)."""
    lines = [
        "You are a coding agent working in a Rust repository. Read the files below and fix the failing test.\n",
        "--- src/lib.rs ---\n",
        "pub fn parse(input: &str) -> Result<Config, Error> {\n",
        "\tlet v: serde_json::Value = serde_json::from_str(input).map_err(|e| Error::Json(e.to_string()))?;\n",
        "\tif v[\"name\"].is_null() { return Err(Error::Missing(\"name\")); }\n",
        "\tOk(Config { name: v[\"name\"].as_str().unwrap_or_default().to_owned(), ..Default::default() })\n",
        "}\n",
        "The test `parse_rejects_empty` fails with: assertion `left == right` failed (left: \"\", right: \"name\").\n",
        "Explain the cause in two sentences, then give the smallest patch as a unified diff.\n",
    ]
    parts, i = [], 0
    while len(body("".join(parts))) < size:
        parts.append(lines[i % len(lines)])
        i += 1
    while len(body("".join(parts))) > size - 1:
        parts.pop()
    p = "".join(parts)
    p += "." * (size - len(body(p)))
    out = body(p)
    assert len(out) == size, (len(out), size)
    return out


def nginx_conf(work, name, port, mock_port, tls=None):
    d = work / name
    d.mkdir()
    listen = f"listen 127.0.0.1:{port} backlog=4096" + (" ssl http2" if tls else "") + ";"
    ssl = (f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}; ssl_protocols TLSv1.2 TLSv1.3;"
           if tls else "")
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d};
    proxy_temp_path {d};
    # Bodies up to 1 MiB are buffered in memory (the stock 16k would write 256 KiB bodies to a temp file),
    # and a keep-alive connection is not closed after 1,000 requests (a fresh TLS handshake each time).
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 256; }}
    server {{
        {listen}
        {ssl}
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    return d / "nginx.conf"


def start_frontdoor(args, work):
    mock_port = free_port()
    mock = spawn([f"{args.bin}/mock-llm", "--listen", f"127.0.0.1:{mock_port}", "--threads", "1"], work, "mock", 1)
    upstream = f"http://127.0.0.1:{mock_port}"
    wait_http(f"{upstream}/health", 10)
    targets = {"direct": Target("direct", f"{upstream}/v1/chat/completions", [], mock, work)}
    targets["direct"].base = upstream

    # A self-signed ECDSA P-256 certificate, made now (the same pair for nginx and the gateway).
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)

    for name, tls in (("nginx", None), ("nginx-tls", (cert, key))):
        port = free_port()
        conf = nginx_conf(work, name, port, mock_port, tls)
        p = spawn(["nginx", "-c", str(conf), "-p", str(conf.parent)], work, name, 0)
        base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        targets[name] = Target(name, f"{base}/v1/chat/completions", [], p, work)
        targets[name].base = base

    providers = (f"  claude:\n    kind: anthropic\n    base_url: {upstream}/v1\n"
                 f"  mock-responses:\n    kind: openai\n    base_url: {upstream}/v1\n    responses: true\n")
    models = ("  - name: mock-claude\n    pricing: { input: 3.00, output: 15.00 }\n"
              "    deployments:\n      - provider: claude\n"
              "  - name: mock-resp\n    pricing: { input: 0.15, output: 0.60 }\n"
              "    deployments:\n      - provider: mock-responses\n")
    for name, tls in (("smartllm", False), ("smartllm-tls", True)):
        port, admin = free_port(), free_port()
        extra = f"  tls:\n    cert_file: {cert}\n    key_file: {key}\n" if tls else ""
        conf = smartllm_conf(work, name, port, admin, upstream, server_extra=extra,
                             providers_extra=providers, models_extra=models)
        p = spawn([f"{args.bin}/smartllm", "serve", "--config", str(conf)], work, name, 0)
        base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        targets[name] = Target(name, f"{base}/v1/chat/completions", [], p, work)
        targets[name].base = base
        targets[name].admin = f"http://127.0.0.1:{admin}"
    for t in targets.values():
        wait_http(t.url, 120, t.headers, body(PROMPT))
        log(f"{t.name} ready at {t.base}")
    return targets, cert, key


def frontdoor_points(args, work):
    """Every measured point: (group, key) -> how oha drives it. Keys are group/what/mode."""
    c = args.fd_concurrency
    pts = []

    def add(group, key, target, path, data=None, headers=(), flags=(), conns=c, body_file=None, expect=None):
        pts.append({"group": group, "key": key, "target": target, "path": path, "data": data, "headers": list(headers),
                    "flags": list(flags), "conns": conns, "body_file": body_file, "expect": expect})

    av = [("anthropic-version", ANTHROPIC_VERSION)]
    for mode in ("plain", "stream"):
        st = mode == "stream"
        # (a) the three client APIs through the gateway (plaintext HTTP/1.1, cache off), and nginx with the same request.
        apis = (
            ("chat", "/v1/chat/completions", body(PROMPT, st), (), "data: [DONE]"),
            ("messages", "/v1/messages", messages_body(PROMPT, st), av, "message_stop"),
            ("responses", "/v1/responses", responses_body(PROMPT, st), (), "response.completed"),
            ("messages-pt", "/v1/messages", messages_body(PROMPT, st, "mock-claude"), av, "message_stop"),
            ("responses-pt", "/v1/responses", responses_body(PROMPT, st, "mock-resp"), (), "response.completed"),
        )
        for what, path, data, hdr, marker in apis:
            add("api", f"api/gw-{what}/{mode}", "smartllm", path, data, hdr, expect=marker if st else None)
        for what, path, data, hdr, marker in apis[:3]:
            add("api", f"api/nginx-{what}/{mode}", "nginx", path, data, hdr, expect=marker if st else None)
        # (b) TLS and HTTP/2 against plaintext HTTP/1.1, the gateway and nginx.
        for srv in ("nginx", "gw"):
            tgt = "nginx" if srv == "nginx" else "smartllm"
            data = body(PROMPT, st)
            exp = "data: [DONE]" if st else None
            add("tls", f"tls/{srv}-h1/{mode}", tgt, "/v1/chat/completions", data, expect=exp)
            add("tls", f"tls/{srv}-tls-h1/{mode}", tgt + "-tls", "/v1/chat/completions", data, flags=["--insecure"], expect=exp)
            add("tls", f"tls/{srv}-tls-h2/{mode}", tgt + "-tls", "/v1/chat/completions", data,
                flags=["--insecure", "--http2", "-p", "1"], expect=exp)
            add("tls", f"tls/{srv}-tls-h2mux/{mode}", tgt + "-tls", "/v1/chat/completions", data,
                flags=["--insecure", "--http2", "-p", str(c)], conns=1, expect=exp)
    # (c) request bodies of 1 KiB, 16 KiB and 256 KiB (non-streamed chat), direct, nginx and the gateway.
    for size in FD_SIZES:
        f = work / f"body-{size}.json"
        f.write_text(sized_body(size))
        for srv, tgt in (("direct", "direct"), ("nginx", "nginx"), ("gw", "smartllm")):
            add("body", f"body/{srv}-{size // 1024}k/plain", tgt, "/v1/chat/completions", body_file=f)
    return pts


def check_frontdoor(targets, pts):
    """Each point answers 200 (streams end with their API's last event), h2 is negotiated where asked,
    and the gateway sends each model's requests to the API the provider speaks (the mock's /_mock/last)."""
    import urllib.request

    checks = []
    mock = targets["direct"].base
    for pt in pts:
        t = targets[pt["target"]]
        url = t.base + pt["path"]
        data = pt["data"] if pt["data"] is not None else Path(pt["body_file"]).read_text()
        st, _, raw = wait_http(url, 30, pt["headers"], data)
        if st != 200 or (pt["expect"] and pt["expect"].encode() not in raw):
            raise RuntimeError(f"{pt['key']}: status {st}, {raw[:300]!r}")
        if "--http2" in pt["flags"]:
            r = subprocess.run(["curl", "-sk", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                                "-H", "content-type: application/json", "--data-binary", data, url],
                               capture_output=True, text=True, timeout=30)
            if r.stdout.strip() != "2 200":
                raise RuntimeError(f"{pt['key']}: curl --http2 gave {r.stdout!r} {r.stderr[-200:]!r}")
    for model, path, want in (("mock-small", "/v1/messages", "/v1/chat/completions"),
                              ("mock-claude", "/v1/messages", "/v1/messages"),
                              ("mock-small", "/v1/responses", "/v1/chat/completions"),
                              ("mock-resp", "/v1/responses", "/v1/responses")):
        data = messages_body(PROMPT, model=model) if path == "/v1/messages" else responses_body(PROMPT, model=model)
        hdr = [("anthropic-version", ANTHROPIC_VERSION)] if path == "/v1/messages" else []
        wait_http(targets["smartllm"].base + path, 10, hdr, data)
        with urllib.request.urlopen(f"{mock}/_mock/last", timeout=5) as r:
            got = json.loads(r.read())["path"]
        if got != want:
            raise RuntimeError(f"{path} on {model} reached the mock at {got}, not {want}")
        checks.append(f"`{path}` on `{model}` reaches the mock at `{got}`")
    checks.append("every point answered 200 before it was measured (streams ending with their API's last event)")
    checks.append("the `--http2` points negotiated HTTP/2 (curl --http2 against the same URL)")
    for name in ("nginx-tls", "smartllm-tls"):
        port = targets[name].base.rsplit(":", 1)[1]
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", "h2,http/1.1"],
                           input="", capture_output=True, text=True, errors="replace", timeout=30)
        # (errors="replace": after the handshake the server's first HTTP/2 frames may show as raw bytes.)
        info = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in r.stdout.splitlines() if ":" in l)}
        new = next((l for l in r.stdout.splitlines() if l.startswith("New, ")), "")  # New, TLSv1.3, Cipher is X
        if ", Cipher is " in new:
            info["Protocol"], info["Cipher"] = new[5:].split(", Cipher is ", 1)
        checks.append(f"{name}: {info.get('Protocol', '?')}, {info.get('Cipher', '?')}, "
                      f"ALPN {info.get('ALPN protocol', '?')} (openssl s_client offering h2 and http/1.1)")
    return checks


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def run_frontdoor(args, out):
    work = Path(tempfile.mkdtemp(prefix="smartllm-frontdoor-"))
    res = {
        "suite": "frontdoor", "command": args.command, "date": datetime.date.today().isoformat(),
        "machine": machine(), "duration": args.duration, "rounds": args.rounds, "concurrency": args.fd_concurrency,
        "versions": {k: v for k, v in versions(args).items() if k in ("smartllm", "nginx", "oha", "kernel")},
        "points": {}, "rounds_rps": {},
    }
    def binary(path):
        import hashlib
        st = Path(path).stat()
        return (f"built {datetime.datetime.fromtimestamp(st.st_mtime):%Y-%m-%d %H:%M:%S}, sha256 "
                f"{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]}")
    res["versions"]["openssl"] = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    waited, busy = wait_quiet(args.wait_quiet)
    res["quiet_wait_s"], res["compilers_at_start"] = round(waited), busy
    res["load_start"] = loadavg()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "crates"],
                           capture_output=True, text=True).stdout.strip()
    res["versions"]["smartllm binary"] = binary(f"{args.bin}/smartllm") + (
        "; the checkout had uncommitted changes under crates/" if dirty else "")
    res["versions"]["mock-llm binary"] = binary(f"{args.bin}/mock-llm")
    log(f"load at start {res['load_start']}; compilers running: {busy or 'none'}")
    targets, _, _ = start_frontdoor(args, work)
    busy_points = set()
    try:
        pts = frontdoor_points(args, work)
        res["checks"] = check_frontdoor(targets, pts)
        for c in res["checks"]:
            log(c)

        def run_point(pt, duration):
            t = targets[pt["target"]]
            kw = {"body_file": pt["body_file"]} if pt["body_file"] else {"data": pt["data"]}
            with Quiet(targets, t):
                return oha(args, t, duration=duration, conns=pt["conns"], url=t.base + pt["path"],
                           extra_headers=pt["headers"], flags=pt["flags"], **kw)

        for group in args.groups.split(","):
            gpts = [p for p in pts if p["group"] == group]
            for pt in gpts:  # warm up: pools, TLS sessions, allocator
                run_point(pt, 1)
            runs = {p["key"]: [] for p in gpts}
            for rnd in range(args.rounds):
                for pt in gpts:
                    before = compilers_running()
                    m = run_point(pt, args.duration)
                    after = compilers_running()
                    if before or after:
                        busy_points.add(pt["key"])
                    m["compilers"] = sorted(set(before) | set(after))
                    runs[pt["key"]].append(m)
                    log(f"round {rnd + 1} {pt['key']}: {m['rps']:,.0f} req/s, p50 {m['p50']:.3f} ms, "
                        f"p99 {m['p99']:.3f} ms, target CPU {m['cpu_util'] or 0:.2f}, errors {m['errors']}"
                        + (f" [compiler running: {', '.join(m['compilers'])}]" if m["compilers"] else ""))
            for k, ms in runs.items():
                best = sorted(ms, key=lambda m: m["rps"])[len(ms) // 2]
                best = dict(best, errors=sum(m["errors"] for m in ms))
                res["points"][k] = best
                res["rounds_rps"][k] = [m["rps"] for m in ms]
        if not args.no_profile:
            # Where the gateway's CPU goes with the largest bodies, and on translated Responses.
            res["profiles"] = []
            for key in (f"body/gw-{FD_SIZES[-1] // 1024}k/plain", "api/gw-responses/plain"):
                pt = next(p for p in pts if p["key"] == key)
                t = targets["smartllm"]
                log(f"profiling the gateway with perf on {key}")
                kw = {"body_file": pt["body_file"]} if pt["body_file"] else {"data": pt["data"]}
                with Quiet(targets, t):
                    pr = profile_smartllm(args, t, work, conns=pt["conns"], url=t.base + pt["path"],
                                          extra_headers=pt["headers"], **kw)
                if pr:
                    res["profiles"].append(dict(pr, point=key))
    finally:
        stop_all(targets)
    res["load_end"] = loadavg()
    res["compilers_at_end"] = compilers_running()
    res["points_with_compiler"] = sorted(busy_points)
    stamp = datetime.date.today().strftime("%Y%m%d")
    md, js = out / f"compare-frontdoor-{stamp}.md", out / f"compare-frontdoor-{stamp}.json"
    js.write_text(json.dumps(res, indent=1, default=str))
    md.write_text(frontdoor_report(res))
    log(f"load at end {res['load_end']}; wrote {md} and {js.name}")
    shutil.rmtree(work, ignore_errors=True)


def fd_ratio(res, a, b):
    """Median over rounds of a's req/s over b's in the same round (the two ran seconds apart)."""
    ra, rb = res["rounds_rps"].get(a), res["rounds_rps"].get(b)
    if not ra or not rb:
        return None
    return median([x / y for x, y in zip(ra, rb) if y])


def frontdoor_report(res):
    P = res["points"]
    L = []
    w = L.append

    def rps(k):
        m = P.get(k)
        return fmt(m["rps"], 0) if m else "-"

    def rx(a, b):
        r = fd_ratio(res, a, b)
        return f"{r:.2f}x" if r is not None else "-"

    def lat(k):
        m = P.get(k)
        return f"{m['p50']:.3f} / {m['p99']:.3f}" if m else "-"

    def cpu(k):
        m = P.get(k)
        return f"{m['cpu_per_1k']:.3f}" if m and m["cpu_per_1k"] else "-"

    def util(k):
        m = P.get(k)
        return f"{m['cpu_util']:.2f}" if m and m["cpu_util"] is not None else "-"

    def cap(n, g):
        a, b = P.get(n), P.get(g)
        if not a or not b or not a["cpu_per_1k"] or not b["cpu_per_1k"]:
            return "-"
        return f"{a['cpu_per_1k'] / b['cpu_per_1k']:.2f}x ({1000 / b['cpu_per_1k']:,.0f} vs {1000 / a['cpu_per_1k']:,.0f})"

    c = res["concurrency"]
    w("# Front door: client APIs, TLS and HTTP/2, request body sizes (issue #17)\n")
    w(f"Generated by `{res['command']}` on {res['date']}.\n")
    w(f"- Machine: {res['machine']}.")
    for k, v in res["versions"].items():
        w(f"- {k}: {v}")
    w(f"- Load average (1/5/15 min): {res['load_start']} at the start, {res['load_end']} at the end. "
      f"Compilers running at the start: {', '.join(res['compilers_at_start']) or 'none'} "
      f"(waited {res['quiet_wait_s']} s for them); at the end: {', '.join(res['compilers_at_end']) or 'none'}; "
      f"points during which one ran: {len(res['points_with_compiler'])} of {len(P)}"
      + (f" ({', '.join(res['points_with_compiler'])})" if res["points_with_compiler"] else "") + ".")
    w(f"- Method: oha, {res['duration']} s per point, {res['rounds']} rounds; within each group every point runs once "
      "per round, so a ratio's two sides ran seconds apart. Cells are the median round; ratios are the median over "
      "rounds of the per-round ratio. Each target is pinned to CPU 0 (nginx `worker_processes 1`, SmartLLM "
      "`server.threads: 1`, cache off, access logs off), oha and mock-llm (1 thread, 0 ms latency) share CPU 1, "
      "and the other targets are stopped (SIGSTOP) while one is measured. "
      f"Fixed concurrency {c} (h2: {c} connections of one stream each; `h2 mux`: one connection carrying {c} streams).")
    w("- nginx: a plain reverse proxy with upstream keep-alive and `proxy_buffering off`; bodies up to 1 MiB "
      "buffered in memory (`client_body_buffer_size 1m`) and `keepalive_requests` / `http2_max_requests` raised "
      "so no connection is re-established during a run. TLS: the same self-signed ECDSA P-256 certificate for both, "
      "made with the openssl CLI at the start of the run; oha connects with `--insecure`.")
    w("- `cpu ms/req` is the target's CPU time (user + system, from /proc) per request; `CPU 0 busy` its CPU seconds "
      "per second of the run: near 1.00 the target's core is the limit, well below it the limit is elsewhere "
      "(oha and the mock on CPU 1).\n")
    if res.get("checks"):
        w("Checked before measuring:\n")
        for ch in res["checks"]:
            w(f"- {ch}")
        w("")

    for mode, title in (("plain", "non-streamed"), ("stream", "streamed")):
        w(f"## (a) Client APIs through the gateway, {title} (plaintext HTTP/1.1, c={c})\n")
        if mode == "plain":
            w("`translated`: model `mock-small` on an OpenAI-compatible provider, so the gateway translates the request "
              "to Chat Completions and the answer back. `passed through`: `mock-claude` on an `anthropic` provider "
              "(the mock's `/v1/messages`), `mock-resp` on an OpenAI provider with `responses: true` (the mock's "
              "`/v1/responses`). nginx sends the same request to the same mock path (for the translated rows the mock "
              "answers that API natively behind nginx).\n")
        w("| client API | upstream | gateway req/s | vs gateway Chat Completions | nginx req/s, same request | gateway vs nginx | gateway p50 / p99 ms | gateway cpu ms/req | errors |")
        w("|---|---|---|---|---|---|---|---|---|")
        rows = (("Chat Completions", "chat", "chat", "-"),
                ("Anthropic Messages", "messages", "messages", "translated to Chat Completions"),
                ("OpenAI Responses", "responses", "responses", "translated to Chat Completions"),
                ("Anthropic Messages", "messages-pt", "messages", "passed through (anthropic provider)"),
                ("OpenAI Responses", "responses-pt", "responses", "passed through (responses: true)"))
        for label, what, ng, up in rows:
            g, n = f"api/gw-{what}/{mode}", f"api/nginx-{ng}/{mode}"
            base = f"api/gw-chat/{mode}"
            errs = (P.get(g) or {}).get("errors", 0)
            w(f"| {label} | {up} | {rps(g)} | {'1.00x (baseline)' if what == 'chat' else rx(g, base)} | {rps(n)} | "
              f"{rx(g, n)} | {lat(g)} | {cpu(g)} | {errs} |")
        w("")

    for mode, title in (("plain", "non-streamed"), ("stream", "streamed")):
        w(f"## (b) TLS and HTTP/2 against plaintext HTTP/1.1, {title} (chat completions, c={c})\n")
        w("| protocol | nginx req/s | nginx vs its plaintext h1 | gateway req/s | gateway vs its plaintext h1 | gateway vs nginx | gateway p50 / p99 ms | nginx / gateway cpu ms/req | nginx / gateway CPU 0 busy | errors (nginx / gateway) |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for proto, label in (("h1", "plaintext HTTP/1.1"), ("tls-h1", "TLS, HTTP/1.1"),
                             ("tls-h2", f"TLS, h2 ({c} connections)"), ("tls-h2mux", f"TLS, h2 mux (1 connection, {c} streams)")):
            n, g = f"tls/nginx-{proto}/{mode}", f"tls/gw-{proto}/{mode}"
            nb, gb = f"tls/nginx-h1/{mode}", f"tls/gw-h1/{mode}"
            w(f"| {label} | {rps(n)} | {'1.00x' if proto == 'h1' else rx(n, nb)} | {rps(g)} | "
              f"{'1.00x' if proto == 'h1' else rx(g, gb)} | {rx(g, n)} | {lat(g)} | {cpu(n)} / {cpu(g)} | {util(n)} / {util(g)} | "
              f"{(P.get(n) or {}).get('errors', 0)} / {(P.get(g) or {}).get('errors', 0)} |")
        w("")

    w(f"## (c) Request body sizes (non-streamed chat completions, plaintext HTTP/1.1, c={c})\n")
    w("The body is one user message: an agent-style prompt (instructions and a source file with quotes, tabs and "
      "newlines), padded to the exact size.\n")
    w("`capacity` is 1,000 / (cpu ms/req): the requests/s the target's one core would serve if nothing else "
      "limited it. Where the direct-to-mock column is close to nginx's, the mock and oha (CPU 1) set the pace and "
      "the measured ratio understates the difference between the proxies; the capacity ratio does not.\n")
    w("| body | direct to mock req/s | nginx req/s | gateway req/s | gateway vs nginx | goal >= 0.8x | nginx / gateway cpu ms/req | nginx / gateway CPU 0 busy | capacity, gateway vs nginx | gateway p50 / p99 ms | errors (nginx / gateway) |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    goals = []
    for size in FD_SIZES:
        kb = size // 1024
        d, n, g = f"body/direct-{kb}k/plain", f"body/nginx-{kb}k/plain", f"body/gw-{kb}k/plain"
        r = fd_ratio(res, g, n)
        met = r is not None and r >= 0.8
        goals.append((kb, r, met))
        w(f"| {kb} KiB | {rps(d)} | {rps(n)} | {rps(g)} | {rx(g, n)} | {'yes' if met else '**no**'} | "
          f"{cpu(n)} / {cpu(g)} | {util(n)} / {util(g)} | {cap(n, g)} | {lat(g)} | "
          f"{(P.get(n) or {}).get('errors', 0)} / {(P.get(g) or {}).get('errors', 0)} |")
    w("")
    w("## Goal\n")
    w("| goal | measured | met |")
    w("|---|---|---|")
    for kb, r, met in goals:
        w(f"| gateway >= 0.8x nginx's req/s, {kb} KiB bodies | {'-' if r is None else f'{r:.2f}x'} | {'yes' if met else '**no**'} |")
    w("")
    for pr in res.get("profiles") or ([res["profile"]] if res.get("profile") else []):
        w(f"## Profile: the gateway on {pr['point']} (c={pr['conns']})\n")
        w("`perf record -F 499 -g` on the gateway process during one more run; self time by shared object, then "
          "the hottest symbols (>= 1.5%).\n")
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
    w("## Spread\n")
    w("Requests/s of every round, in order:\n")
    w("| point | rounds |")
    w("|---|---|")
    for k, v in res["rounds_rps"].items():
        w(f"| {k} | {', '.join(f'{x:,.0f}' for x in v)} |")
    w("")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--oha", required=True)
    ap.add_argument("--litellm", help="the litellm CLI (not needed with --suite frontdoor)")
    ap.add_argument("--portkey", help="Portkey's start-server.js (not needed with --suite frontdoor)")
    ap.add_argument("--command", default="bench/compare")
    ap.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median is kept (default 1)")
    ap.add_argument("--concurrency", default="1,16,64", help="fixed concurrency levels")
    ap.add_argument("--rates", default="50,250,1000,2000,4000,8000", help="fixed request rates")
    ap.add_argument("--targets", default="nginx,litellm,portkey,smartllm,smartllm-cache,smartllm-cache-2core")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--baseline-model", default="model.onnx",
                    help="the smartllm-cache-fp32 target's embedding model file (default the fp32 model.onnx; "
                         "an absolute path for an earlier int8 model)")
    ap.add_argument("--suite", default="compare", choices=["compare", "frontdoor"],
                    help="compare: the peers (REPORT.md); frontdoor: Messages / Responses next to Chat "
                         "Completions, TLS + h2 next to plaintext h1, 1/16/256 KiB bodies, against nginx "
                         "(compare-frontdoor-DATE.md and .json; uses --duration, --rounds, --fd-concurrency)")
    ap.add_argument("--fd-concurrency", type=int, default=16, help="frontdoor: connections (h2 mux: streams)")
    ap.add_argument("--render", help="frontdoor: write the report again from this JSON (no measuring)")
    ap.add_argument("--groups", default="api,tls,body",
                    help="frontdoor: the groups to measure (api: client APIs, tls: TLS and h2, body: body sizes)")
    ap.add_argument("--wait-quiet", type=float, default=900,
                    help="frontdoor: wait up to this many seconds for no compiler to run before measuring")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.rates = [int(x) for x in args.rates.split(",")]
    args.targets = args.targets.split(",")
    if args.suite == "compare" and (("litellm" in args.targets and not args.litellm)
                                    or ("portkey" in args.targets and not args.portkey)):
        ap.error("--litellm and --portkey are needed for those targets (or leave them out of --targets)")
    args.litellm, args.portkey = args.litellm or "/bin/false", args.portkey or "/bin/false"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.suite == "frontdoor":
        if not set(args.targets) <= {"nginx", "smartllm"}:
            args.targets = ["nginx", "smartllm"]  # the peers are not part of this suite
        if args.render:
            res = json.loads(Path(args.render).read_text())
            Path(args.render).with_suffix(".md").write_text(frontdoor_report(res))
            return None
        return run_frontdoor(args, out)
    work = Path(tempfile.mkdtemp(prefix="smartllm-compare-"))
    res = {
        "command": args.command, "date": datetime.date.today().isoformat(), "machine": machine(),
        "versions": versions(args), "duration": args.duration, "rounds": args.rounds,
        "baseline_model": args.baseline_model,
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

        for cname, ckey in (("smartllm-cache", "cache"), ("smartllm-cache-fp32", "cache_fp32"),
                            ("smartllm-cache-2core", "cache_2core")):
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
