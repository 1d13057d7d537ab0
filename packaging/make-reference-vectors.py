"""Reference sentence embeddings for the embedder's conformance test.

Runs an fp32-compute model file of the assets with the onnxruntime Python
package (and the same tokenizer.json with the tokenizers package), mean-pools
last_hidden_state over the attention mask and L2-normalises, then writes
crates/smartllm-embed/testdata/reference.json (model.onnx, all-MiniLM-L6-v2)
or, with --l3, reference-l3.json (paraphrase-l3.onnx, paraphrase-MiniLM-L3-v2,
the default model's reference). Run once; the output is committed.

  python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install onnxruntime==1.31.1 tokenizers numpy
  /tmp/refvenv/bin/python packaging/make-reference-vectors.py [--l3] [ASSETS_DIR]
"""
import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

args = sys.argv[1:]
L3 = "--l3" in args
args = [a for a in args if a != "--l3"]
assets = args[0] if args else os.environ.get("SMARTLLM_ASSETS_DIR", os.path.expanduser("~/.cache/smartllm-assets"))
MODEL, OUT = ("paraphrase-l3.onnx", "reference-l3.json") if L3 else ("model.onnx", "reference.json")
MAX_SEQ_LEN = 128
SENTENCES = [
    "How do I reset my password?",
    "What is the way to reset my password?",
    "The stock market fell sharply today.",
    "Explain the difference between a process and a thread.",
    "Translate 'good morning' into Spanish.",
    "A",
    "Rust's borrow checker prevents data races at compile time, which makes concurrent programs safer.",
    "¿Dónde está la biblioteca?",
    "def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)",
    " ".join(["long"] * 300),
]

tok = Tokenizer.from_file(os.path.join(assets, "tokenizer.json"))
tok.enable_truncation(MAX_SEQ_LEN)
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
sess = ort.InferenceSession(os.path.join(assets, MODEL), opts, providers=["CPUExecutionProvider"])

vectors = []
for s in SENTENCES:
    enc = tok.encode(s)
    ids = np.array([enc.ids], dtype=np.int64)
    mask = np.array([enc.attention_mask], dtype=np.int64)
    types = np.array([enc.type_ids], dtype=np.int64)
    (hidden,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    v = pooled[0] / max(np.linalg.norm(pooled[0]), 1e-12)
    vectors.append([round(float(x), 7) for x in v])

out = {
    "model": MODEL,
    "model_sha256": hashlib.sha256(open(os.path.join(assets, MODEL), "rb").read()).hexdigest(),
    "onnxruntime": ort.__version__,
    "max_seq_len": MAX_SEQ_LEN,
    "sentences": SENTENCES,
    "vectors": vectors,
}
path = os.path.join(os.path.dirname(__file__), "..", "crates", "smartllm-embed", "testdata", OUT)
with open(path, "w") as f:
    json.dump(out, f)
print(f"wrote {len(vectors)} reference vectors to {os.path.normpath(path)}")
