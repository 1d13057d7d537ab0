#!/usr/bin/env bash
# Bounded fuzzing of the request parser, the SSE parser, the config loader
# and the admin API's query strings.
#   fuzz/run.sh [seconds-per-target] [target ...]
# Installs cargo-fuzz (crates.io) when missing and runs each target with
# libFuzzer, starting from fuzz/seeds/<target> and a corpus kept in
# fuzz/corpus/<target> (gitignored). A crash is copied to
# fuzz/regressions/<target>/, where `make test` replays it from then on
# (tests/fuzz_regressions.rs), and the script exits non-zero.
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them for this build only.
set -euo pipefail
cd "$(dirname "$0")"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(request_parser sse_parser config_loader admin_query)
CARGO_FUZZ_VERSION=0.13.2
TOOLS="${SMARTLLM_TOOLS_DIR:-$HOME/.cache/smartllm-tools}"
export PATH="$TOOLS/bin:$PATH"
if [[ "$(cargo fuzz --version 2>/dev/null || true)" != *"$CARGO_FUZZ_VERSION"* ]]; then
    echo "== cargo install cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    CARGO_TARGET_DIR="$HOME/.cache/smartllm-tools-target" \
        cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$TOOLS"
fi
export RUSTC_BOOTSTRAP=1
# The fuzz build has its own target dir (instrumented, a different profile).
export CARGO_TARGET_DIR="$HOME/.cache/smartllm-fuzz-target"
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== fuzzing $t for ${SECS}s" >&2
    if cargo fuzz run --release --sanitizer none "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$SECS" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$t/" 2>"artifacts/$t.log"; then
        grep -E "^Done|stat::number_of_executed_units" "artifacts/$t.log" | tail -1 >&2 || true
    else
        status=1
        tail -30 "artifacts/$t.log" >&2
        for f in artifacts/"$t"/crash-* artifacts/"$t"/timeout-* artifacts/"$t"/oom-*; do
            [ -e "$f" ] || continue
            cp "$f" "regressions/$t/"
            echo "!! $t: $f copied to fuzz/regressions/$t/ (fix it; make test replays it)" >&2
        done
    fi
done
exit $status
