#!/usr/bin/env bash
# Gateway overhead: the same wrk load against mock-llm directly and through
# smartllm, interleaved in one run, reported as added latency and an RPS ratio.
#   bench/gateway-overhead.sh [seconds-per-run] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-5}"
ROUNDS="${2:-2}"
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/smartllm-target}/release"
ASSETS="${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}"
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }

WORK="$(mktemp -d)"
MOCK_PORT=18000; GW_PORT=18080; ADMIN_PORT=19090
cleanup() { kill "${GW_PID:-}" "${MOCK_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN/mock-llm" --listen 127.0.0.1:$MOCK_PORT --threads 1 >/dev/null 2>&1 & MOCK_PID=$!
mkdir -p "$WORK/conf"
cat > "$WORK/conf/smartllm.yaml" <<YAML
server:
  listen: 127.0.0.1:$GW_PORT
  admin_listen: 127.0.0.1:$ADMIN_PORT
  threads: 1
data_dir: $WORK/data
embedder:
  assets_dir: $ASSETS
logging:
  level: warn
  access_log: false
demo:
  mode: off
YAML
cat > "$WORK/conf/providers.yaml" <<YAML
providers:
  mock:
    kind: openai
    base_url: http://127.0.0.1:$MOCK_PORT/v1
YAML
cat > "$WORK/conf/models.yaml" <<YAML
models:
  - name: mock-small
    deployments:
      - provider: mock
YAML
"$BIN/smartllm" serve --config "$WORK/conf" 2>"$WORK/gw.log" & GW_PID=$!
for _ in $(seq 100); do curl -fs "127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock-small","messages":[{"role":"user","content":"What is the capital of France?"}]}'
LUA

# wrk --latency output -> "rps p50_ms p99_ms"
run() { # url connections threads
    wrk -t"$3" -c"$2" -d"${DUR}s" --latency -s "$WORK/post.lua" "$1" | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
        /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 } /Non-2xx/ { bad = $NF }
        END { if (bad > 0) { print "non-2xx responses: " bad > "/dev/stderr"; exit 1 } printf "%s %.3f %.3f\n", rps, p50, p99 }'
}

declare -a D_LAT G_LAT D_MAX G_MAX
for r in $(seq "$ROUNDS"); do
    D_LAT+=("$(run "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" 1 1)")
    G_LAT+=("$(run "http://127.0.0.1:$GW_PORT/v1/chat/completions" 1 1)")
    D_MAX+=("$(run "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" 64 2)")
    G_MAX+=("$(run "http://127.0.0.1:$GW_PORT/v1/chat/completions" 64 2)")
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
col() { local i=$1; shift; for x in "$@"; do echo "$x" | cut -d' ' -f"$i"; done | median; }

d50=$(col 2 "${D_LAT[@]}"); g50=$(col 2 "${G_LAT[@]}")
d99=$(col 3 "${D_LAT[@]}"); g99=$(col 3 "${G_LAT[@]}")
drps=$(col 1 "${D_MAX[@]}"); grps=$(col 1 "${G_MAX[@]}")
CPU="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
OUT="bench/results/gateway-overhead-$(date +%Y%m%d-%H%M%S).md"
{
    echo "# Gateway overhead ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Machine: $(nproc) cores, $CPU; load generator wrk; mock-llm (1 thread, 0 ms latency); smartllm (1 proxy thread, cache off)."
    echo "Command: bench/gateway-overhead.sh $DUR $ROUNDS (medians of $ROUNDS interleaved rounds of ${DUR}s)"
    echo
    echo "| measure | direct to mock | through smartllm | gateway effect |"
    echo "|---|---|---|---|"
    echo "| p50 latency, 1 connection (ms) | $d50 | $g50 | +$(awk "BEGIN{printf \"%.3f\", $g50-$d50}") ms |"
    echo "| p99 latency, 1 connection (ms) | $d99 | $g99 | +$(awk "BEGIN{printf \"%.3f\", $g99-$d99}") ms |"
    echo "| max RPS, 64 connections | $drps | $grps | ratio $(awk "BEGIN{printf \"%.2f\", $grps/$drps}") |"
} | tee "$OUT"
echo "(written to $OUT)"
