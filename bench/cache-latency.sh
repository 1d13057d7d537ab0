#!/usr/bin/env bash
# Cache latency through the gateway, in one run: exact hits, semantic hits and
# misses (unique prompts: lookup + embedding + upstream + insert), against a
# 0-latency mock, with wrk on one connection; plus the same request with the
# cache bypassed as the baseline. Two gateways run side by side (one at a
# time): the shipped default (the cache verifier on) and the same with
# `verifier: false`, so the verifier's cost is a ratio within the run.
#   bench/cache-latency.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR="${1:-5}"
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/smartllm-target}/release"
ASSETS="${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}"
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 1; }
WORK="$(mktemp -d)"
MOCK_PORT=18100
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN/mock-llm" --listen 127.0.0.1:$MOCK_PORT --threads 1 >/dev/null 2>&1 & PIDS+=($!)
body() { printf '{"model":"mock-small","messages":[{"role":"user","content":"%s"}]}' "$1"; }

start() { # name port admin_port verifier(true|false)
    local dir="$WORK/$1"
    mkdir -p "$dir/conf"
    cat > "$dir/conf/smartllm.yaml" <<YAML
server: { listen: 127.0.0.1:$2, admin_listen: 127.0.0.1:$3, threads: 1 }
data_dir: $dir/data
embedder: { assets_dir: $ASSETS }
logging: { level: warn, access_log: false }
demo: { mode: off }
YAML
    printf 'providers:\n  mock:\n    kind: openai\n    base_url: http://127.0.0.1:%s/v1\n' $MOCK_PORT > "$dir/conf/providers.yaml"
    printf 'models:\n  - name: mock-small\n    deployments:\n      - provider: mock\n' > "$dir/conf/models.yaml"
    printf 'cache:\n  enabled: true\n  similarity_threshold: 0.95\n  verifier: %s\n' "$4" > "$dir/conf/cache.yaml"
    "$BIN/smartllm" serve --config "$dir/conf" 2>"$dir/gw.log" & PIDS+=($!)
    for _ in $(seq 100); do curl -fs "127.0.0.1:$3/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    local url="http://127.0.0.1:$2/v1/chat/completions"
    # Seed the entry the hits will find.
    curl -fs "$url" -H 'content-type: application/json' -d "$(body 'How do I reset my password?')" >/dev/null
    for _ in $(seq 50); do
        [ "$(curl -s -o /dev/null -w '%header{x-smartllm-cache}' "$url" -H 'content-type: application/json' -d "$(body 'How do I reset my password?')")" = hit-exact ] && break
        sleep 0.1
    done
    local got
    got="$(curl -s -o /dev/null -w '%header{x-smartllm-cache}' "$url" -H 'content-type: application/json' -d "$(body 'What is the way to reset my password?')")"
    [ "$got" = hit-semantic ] || { echo "$1: the paraphrase was a $got, not a semantic hit" >&2; exit 1; }
    # Entries for the new-paraphrase path: one question per account.
    local lua="$WORK/seed-$1.lua"
    cat > "$lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
    n = n + 1
    if n > SEEDS then n = 1 end
    local body = string.format('{"model":"mock-small","messages":[{"role":"user","content":"How do I reset the password of account %d?"}]}', n)
    return wrk.format(nil, nil, nil, body)
end
LUA
    sed -i "s/SEEDS/$SEEDS/" "$lua"
    wrk -t1 -c1 -d"$SEED_SECONDS"s -s "$lua" "$url" >/dev/null
    sleep 1
    got="$(curl -s -o /dev/null -w '%header{x-smartllm-cache}' "$url" -H 'content-type: application/json' -d "$(body "What is the way to reset the password of account $SEEDS?")")"
    [ "$got" = hit-semantic ] || { echo "$1: account $SEEDS was not seeded ($got); raise SEED_SECONDS" >&2; exit 1; }
}

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
# A new paraphrase every request (of a different stored question): no recent
# embedding and no kept verdict. SEEDS entries cover DUR seconds at ~500/s.
SEEDS=$((DUR * 600))
SEED_SECONDS=$((SEEDS / 300 + 2))
cat > "$WORK/semantic-new.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
    n = n + 1
    if n > $SEEDS then n = 1 end
    local body = string.format('{"model":"mock-small","messages":[{"role":"user","content":"What is the way to reset the password of account %d?"}]}', n)
    return wrk.format(nil, nil, nil, body)
end
LUA
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

run() { # port script
    wrk -t1 -c1 -d"${DUR}s" --latency -s "$WORK/$2.lua" "http://127.0.0.1:$1/v1/chat/completions" | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
        /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 } /Non-2xx/ { bad = $NF }
        END { if (bad > 0) { print "non-2xx responses: " bad > "/dev/stderr"; exit 1 } printf "%.3f %.3f %s\n", p50, p99, rps }'
}
start verifier 18180 19190 true
start plain 18181 19191 false
PATHS="bypass exact semantic semantic-new miss"
declare -A R
# Alternate the two gateways path by path, so load on the machine hits both alike.
for s in $PATHS; do
    R[verifier/$s]="$(run 18180 "$s")"
    R[plain/$s]="$(run 18181 "$s")"
done
base50=$(echo "${R[verifier/bypass]}" | cut -d' ' -f1)
OUT="bench/results/cache-latency-$(date +%Y%m%d-%H%M%S).md"
{
    echo "# Cache latency through the gateway ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1); wrk, 1 connection, ${DUR}s per path; mock-llm at 0 ms; smartllm 1 proxy thread, 1 embedder thread; threshold 0.95."
    echo
    echo "| path | p50 ms | p99 ms | req/s | p50 vs bypass | without the verifier: p50 ms | req/s | verifier / without (p50) |"
    echo "|---|---|---|---|---|---|---|---|"
    for s in $PATHS; do
        read -r p50 p99 rps <<< "${R[verifier/$s]}"
        read -r q50 _ qps <<< "${R[plain/$s]}"
        case $s in
            bypass) name="cache bypassed (upstream)";;
            exact) name="exact hit";;
            semantic) name="semantic hit, the same paraphrase again (recent embedding, kept verdict)";;
            semantic-new) name="semantic hit, a new paraphrase each time (embed + search + verify)";;
            miss) name="miss (embed + search + upstream + insert)";;
        esac
        echo "| $name | $p50 | $p99 | $rps | $(awk "BEGIN{printf \"%.2fx\", $p50/$base50}") | $q50 | $qps | $(awk "BEGIN{printf \"%.2fx\", $p50/$q50}") |"
    done
} | tee "$OUT"
echo "(written to $OUT)"
