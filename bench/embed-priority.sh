#!/usr/bin/env bash
# Do requests that need no embedding wait behind those that do? One gateway
# pinned to CPU 0 (cache on, one embedder thread, recent-embeddings cache
# off), mock-llm and oha on CPU 1: cache-bypassing requests (c=16) and novel
# prompts that each need an embedding (c=16), first alone, then together.
# Compare the bypass rate together with alone; run it once per embedder
# priority (crates/smartllm-embed WORKER_NICE) to compare them.
#   bench/embed-priority.sh [seconds-per-run]   (needs oha: bench/compare installs it)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-5}"
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/smartllm-target}/release"
ASSETS="${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}"
OHA="${OHA:-$HOME/.cache/smartllm-bench/oha/bin/oha}"
[ -x "$OHA" ] || { echo "oha not found at $OHA (bench/compare installs it)" >&2; exit 1; }
WORK="$(mktemp -d)"
MOCK_PORT=18201; GW_PORT=18280; ADMIN_PORT=19290
cleanup() { kill "${GW_PID:-}" "${MOCK_PID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

mkdir -p "$WORK/conf"
cat > "$WORK/conf/smartllm.yaml" <<YAML
server: { listen: 127.0.0.1:$GW_PORT, admin_listen: 127.0.0.1:$ADMIN_PORT, threads: 1 }
data_dir: $WORK/data
embedder: { assets_dir: $ASSETS, threads: 1, cache_entries: 0 }
logging: { level: warn, access_log: false }
demo: { mode: off }
YAML
printf 'providers:\n  mock:\n    kind: openai\n    base_url: http://127.0.0.1:%s/v1\n' $MOCK_PORT > "$WORK/conf/providers.yaml"
printf 'models:\n  - name: mock-small\n    deployments:\n      - provider: mock\n' > "$WORK/conf/models.yaml"
printf 'cache:\n  enabled: true\n  similarity_threshold: 0.95\n' > "$WORK/conf/cache.yaml"
taskset -c 1 "$BIN/mock-llm" --listen 127.0.0.1:$MOCK_PORT --threads 1 >/dev/null 2>&1 & MOCK_PID=$!
taskset -c 0 "$BIN/smartllm" serve --config "$WORK/conf" 2>"$WORK/gw.log" & GW_PID=$!
URL=http://127.0.0.1:$GW_PORT/v1/chat/completions
P='{"model":"mock-small","messages":[{"role":"user","content":"What is the capital of France? Answer in one sentence."}]}'
for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' -d "$P" $URL || true)" = 200 ] && break
    sleep 0.3
done
python3 - "$WORK/novel.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(200_000):
        q = f"Unique question {i} about topic {i * 7919 % 100003}?"
        f.write(json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": q}]}) + "\n")
PY
summary() { python3 -c "import json,sys;d=json.load(sys.stdin);p=d['latencyPercentiles'];print('| $1 | $2 | %.0f | %.3f | %.3f |'%(d['summary']['requestsPerSec'],p['p50']*1e3,p['p99']*1e3))"; }
bypass() { taskset -c 1 "$OHA" --no-tui -z "${DUR}s" -c 16 -m POST -T application/json -H 'Cache-Control: no-store' -d "$P" --output-format json $URL | summary "$1" bypass; }
novel() { taskset -c 1 "$OHA" --no-tui -z "${DUR}s" -c 16 -m POST -T application/json -Z "$WORK/novel.jsonl" --output-format json $URL | summary "$1" "novel prompt"; }
echo "| load | path | req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|"
bypass alone
novel alone
bypass together > "$WORK/bypass.md" & B=$!
novel together
wait $B
cat "$WORK/bypass.md"
