#!/usr/bin/env bash
# Cache latency through the gateway, in one run: exact hits, semantic hits and
# misses (unique prompts: lookup + embedding + upstream + insert), against a
# 0-latency mock, with wrk on one connection; plus the same request with the
# cache bypassed as the baseline.
#   bench/cache-latency.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-5}"
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/smartllm-target}/release"
ASSETS="${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}"
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }
WORK="$(mktemp -d)"
MOCK_PORT=18100; GW_PORT=18180; ADMIN_PORT=19190
cleanup() { kill "${GW_PID:-}" "${MOCK_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN/mock-llm" --listen 127.0.0.1:$MOCK_PORT --threads 1 >/dev/null 2>&1 & MOCK_PID=$!
mkdir -p "$WORK/conf"
cat > "$WORK/conf/smartllm.yaml" <<YAML
server: { listen: 127.0.0.1:$GW_PORT, admin_listen: 127.0.0.1:$ADMIN_PORT, threads: 1 }
data_dir: $WORK/data
embedder: { assets_dir: $ASSETS }
logging: { level: warn, access_log: false }
demo: { mode: off }
YAML
printf 'providers:\n  mock:\n    kind: openai\n    base_url: http://127.0.0.1:%s/v1\n' $MOCK_PORT > "$WORK/conf/providers.yaml"
printf 'models:\n  - name: mock-small\n    deployments:\n      - provider: mock\n' > "$WORK/conf/models.yaml"
printf 'cache:\n  enabled: true\n  similarity_threshold: 0.95\n' > "$WORK/conf/cache.yaml"
"$BIN/smartllm" serve --config "$WORK/conf" 2>"$WORK/gw.log" & GW_PID=$!
for _ in $(seq 100); do curl -fs "127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

URL="http://127.0.0.1:$GW_PORT/v1/chat/completions"
body() { printf '{"model":"mock-small","messages":[{"role":"user","content":"%s"}]}' "$1"; }
# Seed the entry the hits will find.
curl -fs "$URL" -H 'content-type: application/json' -d "$(body 'How do I reset my password?')" >/dev/null
for _ in $(seq 50); do
    [ "$(curl -s -o /dev/null -w '%header{x-smartllm-cache}' "$URL" -H 'content-type: application/json' -d "$(body 'How do I reset my password?')")" = hit-exact ] && break
    sleep 0.1
done

lua() { # name body extra-header
    cat > "$WORK/$1.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
$3
wrk.body = '$2'
LUA
}
lua exact "$(body 'How do I reset my password?')" ""
lua semantic "$(body 'What is the way to reset my password?')" ""
lua bypass "$(body 'How do I reset my password?')" 'wrk.headers["Cache-Control"] = "no-store"'
cat > "$WORK/miss.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
    n = n + 1
    local body = string.format('{"model":"mock-small","messages":[{"role":"user","content":"Unique question %d about topic %d?"}]}', n, math.random(1, 1000000))
    return wrk.format(nil, nil, nil, body)
end
LUA

run() { # script
    wrk -t1 -c1 -d"${DUR}s" --latency -s "$WORK/$1.lua" "$URL" | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
        /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 } /Non-2xx/ { bad = $NF }
        END { if (bad > 0) { print "non-2xx responses: " bad > "/dev/stderr"; exit 1 } printf "%.3f %.3f %s\n", p50, p99, rps }'
}
declare -A R
for s in bypass exact semantic miss; do R[$s]="$(run $s)"; done
base50=$(echo "${R[bypass]}" | cut -d' ' -f1)
OUT="bench/results/cache-latency-$(date +%Y%m%d-%H%M%S).md"
{
    echo "# Cache latency through the gateway ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1); wrk, 1 connection, ${DUR}s per path; mock-llm at 0 ms; smartllm 1 proxy thread, 1 embedder thread."
    echo
    echo "| path | p50 ms | p99 ms | req/s | p50 vs bypass |"
    echo "|---|---|---|---|---|"
    for s in bypass exact semantic miss; do
        read -r p50 p99 rps <<< "${R[$s]}"
        case $s in bypass) name="cache bypassed (upstream)";; exact) name="exact hit";; semantic) name="semantic hit (embed + search)";; miss) name="miss (embed + search + upstream + insert)";; esac
        echo "| $name | $p50 | $p99 | $rps | $(awk "BEGIN{printf \"%.2fx\", $p50/$base50}") |"
    done
} | tee "$OUT"
echo "(written to $OUT)"
