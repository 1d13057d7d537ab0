#!/usr/bin/env bash
# Build the .deb or .rpm of SmartLLM Router: `packaging/build-package.sh deb|rpm`
# (make deb / make rpm). Installs cargo-deb / cargo-generate-rpm when missing,
# stages the stripped release binary, ONNX Runtime, the model assets (verified
# by fetch-assets.sh) and the shipped conf/ (ONNX Runtime's path made absolute:
# /usr/lib/smartllm; demo mode off), then packages. Output:
# $CARGO_TARGET_DIR/packages/.
set -euo pipefail
kind=${1:?usage: build-package.sh deb|rpm}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
: "${CARGO_TARGET_DIR:=$HOME/.cache/smartllm-target}"
: "${SMARTLLM_ASSETS_DIR:=$HOME/.cache/smartllm-assets}"
export CARGO_TARGET_DIR SMARTLLM_ASSETS_DIR
out="$CARGO_TARGET_DIR/packages"
mkdir -p "$out"
# One build at a time: packaging/stage and the packages in $out are fixed paths.
exec 9>"$out/.build.lock"
flock 9

tool() { # name version
    if ! command -v "$1" >/dev/null || ! "$1" --version 2>/dev/null | grep -q "$2"; then
        echo "installing $1 $2"
        CARGO_TARGET_DIR="$HOME/.cache/smartllm-tools-target" cargo install --locked --quiet "$1@$2"
    fi
}

packaging/fetch-assets.sh "$SMARTLLM_ASSETS_DIR" >/dev/null
cargo build --release --locked --workspace --bins
stage=packaging/stage
rm -rf "$stage"
mkdir -p "$stage/lib" "$stage/share" "$stage/etc/smartllm"
strip --strip-unneeded -o "$stage/smartllm" "$CARGO_TARGET_DIR/release/smartllm"
cp "$SMARTLLM_ASSETS_DIR/libonnxruntime.so.1.31.1" "$stage/lib/"
# paraphrase-l3.onnx: the default model's fp32 twin, what embedder.device:
# cuda runs (int8 MatMuls have no CUDA kernels; smartllm_embed::cuda_model).
cp "$SMARTLLM_ASSETS_DIR/paraphrase-l3.int8.onnx" "$SMARTLLM_ASSETS_DIR/paraphrase-l3.onnx" \
    "$SMARTLLM_ASSETS_DIR/model.onnx" "$SMARTLLM_ASSETS_DIR/model.int8.onnx" \
    "$SMARTLLM_ASSETS_DIR/tokenizer.json" "$stage/share/"
cp conf/*.yaml conf/*.tsv conf/*.json "$stage/etc/smartllm/"
sed -i 's|^  onnxruntime: libonnxruntime.so.1.31.1|  onnxruntime: /usr/lib/smartllm/libonnxruntime.so.1.31.1|' "$stage/etc/smartllm/smartllm.yaml"
grep -q '^  onnxruntime: /usr/lib/smartllm/' "$stage/etc/smartllm/smartllm.yaml" \
    || { echo "conf/smartllm.yaml: embedder.onnxruntime not found to rewrite" >&2; exit 1; }
# Demo mode off: a packaged gateway that starts before its provider keys are
# readable must not send prompts to the demo upstream (127.0.0.1:8000).
sed -i '/^demo:/,/^[^ ]/s|^  mode: auto |  mode: off  |' "$stage/etc/smartllm/smartllm.yaml"
grep -q '^  mode: off ' "$stage/etc/smartllm/smartllm.yaml" \
    || { echo "conf/smartllm.yaml: demo.mode: auto not found to rewrite" >&2; exit 1; }

case "$kind" in
deb)
    tool cargo-deb 3.8.0
    cargo deb -p smartllm --no-build --no-strip --output "$out/" >/dev/null
    ls -1 "$out"/smartllm_*.deb | tail -1
    ;;
rpm)
    tool cargo-generate-rpm 0.21.1
    cargo generate-rpm -p crates/smartllm --output "$out/" >/dev/null
    ls -1 "$out"/smartllm-*.rpm | tail -1
    ;;
*)
    echo "usage: build-package.sh deb|rpm" >&2
    exit 2
    ;;
esac
