#!/usr/bin/env python3
"""Regenerate the gateway's price catalog (crates/smartllm-config/data/prices.tsv)
from the model price list inside the MIT-licensed `litellm` wheel on PyPI.

    packaging/make-price-catalog.py [OUTPUT]   (PYTHON with pip: $SMARTLLM_PYTHON or this one)

The wheel is pinned by version and sha256 (bump both together, then commit the
regenerated file). Only models that answer chat, completion, responses or
embedding requests are kept. Prices are written in USD per 1M tokens; an empty
field means the list does not give it. Anthropic models without explicit cache
write prices get Anthropic's published multipliers: 1.25x input for a 5-minute
write, 2x input for a 1-hour write.
"""

import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

LITELLM_VERSION = "1.110.2"
WHEEL = f"litellm-{LITELLM_VERSION}-cp310-abi3-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "9d94d1c7d524b6fd10c14f9c8c6c4f0ac31705f9964ac59dcfd8337c046d8917"
MEMBER = "litellm/model_prices_and_context_window_backup.json"
MODES = {"chat", "completion", "responses", "embedding"}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "crates", "smartllm-config", "data", "prices.tsv")

COLUMNS = [
    "model", "provider", "mode", "context_window", "max_output_tokens",
    "input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "reasoning",
    "long_context_above", "long_input", "long_output", "long_cache_read",
    "long_cache_write_5m", "long_cache_write_1h", "batch_input", "batch_output",
    "audio_input", "audio_output",
]


def download(work):
    python = os.environ.get("SMARTLLM_PYTHON") or sys.executable
    subprocess.run(
        [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--abi", "abi3",
         "--platform", "manylinux_2_28_x86_64", "-d", work, f"litellm=={LITELLM_VERSION}"],
        check=True,
    )
    path = os.path.join(work, WHEEL)
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != WHEEL_SHA256:
        sys.exit(f"make-price-catalog: sha256 mismatch for {WHEEL}: expected {WHEEL_SHA256}, got {got}")
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(MEMBER))


def per_1m(v):
    """USD per token -> USD per 1M tokens, as a short decimal ('' when absent)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        return ""
    s = f"{v * 1e6:.10g}"
    return s


def long_tier(spec):
    """The lowest `*_above_Nk_tokens` threshold of the standard tier, in tokens."""
    best = None
    for k in spec:
        if not k.startswith("input_cost_per_token_above_") or not k.endswith("k_tokens"):
            continue
        n = k[len("input_cost_per_token_above_"):-len("k_tokens")]
        if n.isdigit() and (best is None or int(n) < best):
            best = int(n)
    return best


def row(name, spec):
    provider = str(spec.get("litellm_provider", ""))
    inp, out = spec.get("input_cost_per_token"), spec.get("output_cost_per_token")
    if not isinstance(inp, (int, float)) and not isinstance(out, (int, float)):
        return None
    anthropic = provider == "anthropic" or "claude" in name
    w5 = spec.get("cache_creation_input_token_cost")
    w1 = spec.get("cache_creation_input_token_cost_above_1hr")
    if anthropic and isinstance(inp, (int, float)):
        w5 = w5 if isinstance(w5, (int, float)) else inp * 1.25
        w1 = w1 if isinstance(w1, (int, float)) else inp * 2.0
    tier = long_tier(spec)
    long = ["", "", "", "", "", ""]
    if tier is not None:
        sfx = f"_above_{tier}k_tokens"
        lw5 = spec.get("cache_creation_input_token_cost" + sfx)
        lw1 = spec.get("cache_creation_input_token_cost_above_1hr" + sfx)
        linp = spec.get("input_cost_per_token" + sfx)
        if anthropic and isinstance(linp, (int, float)):
            lw5 = lw5 if isinstance(lw5, (int, float)) else linp * 1.25
            lw1 = lw1 if isinstance(lw1, (int, float)) else linp * 2.0
        long = [
            str(tier * 1000), per_1m(linp), per_1m(spec.get("output_cost_per_token" + sfx)),
            per_1m(spec.get("cache_read_input_token_cost" + sfx)), per_1m(lw5), per_1m(lw1),
        ]

    def count(k):
        v = spec.get(k)
        return str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else ""

    fields = [
        name, provider, spec.get("mode", ""), count("max_input_tokens"), count("max_output_tokens"),
        per_1m(inp), per_1m(out), per_1m(spec.get("cache_read_input_token_cost")), per_1m(w5), per_1m(w1),
        per_1m(spec.get("output_cost_per_reasoning_token")), *long,
        per_1m(spec.get("input_cost_per_token_batches")), per_1m(spec.get("output_cost_per_token_batches")),
        per_1m(spec.get("input_cost_per_audio_token")), per_1m(spec.get("output_cost_per_audio_token")),
    ]
    if any("\t" in f or "\n" in f for f in fields):
        return None
    return fields


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    with tempfile.TemporaryDirectory() as work:
        prices = download(work)
    rows = []
    for name, spec in sorted(prices.items()):
        if name == "sample_spec" or not isinstance(spec, dict) or spec.get("mode") not in MODES:
            continue
        r = row(name, spec)
        if r:
            rows.append(r)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".part", "w", encoding="utf-8") as f:
        f.write(f"# SmartLLM Router price catalog, generated {today} by packaging/make-price-catalog.py\n")
        f.write(f"# source: {MEMBER} in the litellm=={LITELLM_VERSION} wheel (MIT license), sha256 {WHEEL_SHA256}\n")
        f.write("# prices: USD per 1M tokens; empty: not in the list; long_*: prompts above long_context_above tokens\n")
        f.write(f"# date: {today}\n# version: litellm=={LITELLM_VERSION}\n")
        f.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    os.replace(out + ".part", out)
    print(f"make-price-catalog: {len(rows)} models -> {out}")


if __name__ == "__main__":
    main()
