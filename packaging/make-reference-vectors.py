"""Reference sentence embeddings for the embedder's conformance test.

Runs the same int8 all-MiniLM-L6-v2 model file with the onnxruntime Python
package (and the same tokenizer.json with the tokenizers package), mean-pools
last_hidden_state over the attention mask and L2-normalises, then writes
crates/smartllm-embed/testdata/reference.json. Run once; the output is committed.

  python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install onnxruntime==1.31.1 tokenizers numpy
  /tmp/refvenv/bin/python packaging/make-reference-vectors.py [ASSETS_DIR]
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

assets = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SMARTLLM_ASSETS_DIR", os.path.expanduser("~/.cache/smartllm-assets"))
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
sess = ort.InferenceSession(os.path.join(assets, "model.onnx"), opts, providers=["CPUExecutionProvider"])

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
    "model_sha256": "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
    "onnxruntime": ort.__version__,
    "max_seq_len": MAX_SEQ_LEN,
    "sentences": SENTENCES,
    "vectors": vectors,
}
path = os.path.join(os.path.dirname(__file__), "..", "crates", "smartllm-embed", "testdata", "reference.json")
with open(path, "w") as f:
    json.dump(out, f)
print(f"wrote {len(vectors)} reference vectors to {os.path.normpath(path)}")
