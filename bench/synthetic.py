"""Synthetic BERT-shaped encoders for the search-cost issue's scale curve.

The search-cost benchmark needs transformers bigger than MiniLM-L6 (6 blocks, hidden 384) to see
how the tool's search time and memory grow with the model: here BERT-base-shaped encoders (hidden
768, FFN 3072, 12 heads) at 12 and 24 blocks. Timing and memory do not depend on the weights'
values, so random weights serve, and no download is needed.

Each block is a HuggingFace BERT layer as torch.onnx.export writes it (opset 17): Q, K, V as MatMul
+ bias Add, Reshape/Transpose to heads, Q K^T, Div by sqrt(head dim), Softmax, times V, Transpose
and Reshape back, the output projection, residual Add, LayerNormalization; then the FFN MatMul +
bias Add, the Erf GELU (Div sqrt 2, Erf, Add 1, Mul, Mul 0.5), MatMul + bias Add, residual Add,
LayerNormalization. Node names follow the HF export (`/encoder/layer.3/attention/self/query/MatMul`),
so the 6 weight MatMuls per block (query, key, value, attention output, intermediate, output) are
the layers `denseflex-onnx inspect` lists, and each block's FFN (intermediate -> output, through the
GELU) is a pair. The input `x` [1, seq, hidden] is the embeddings, already summed (no Gather, no
vocabulary); the output `y` [1, hidden] is the mean over the sequence of the last hidden state.

    python bench/synthetic.py --blocks 12 -o /tmp/bert12.onnx --data /tmp/bert12.npz --samples 64
    python bench/synthetic.py --blocks 24 -o /tmp/bert24.onnx [--hidden 768 --ffn 3072 --heads 12 --seq 64]
    denseflex-onnx optimize /tmp/bert12.onnx --data /tmp/bert12.npz ...

From Python: `encoder(blocks, ...)` returns the onnx.ModelProto, `calibration(n, ...)` the arrays
for --data.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def encoder(blocks: int, hidden: int = 768, ffn: int = 3072, heads: int = 12, seq: int = 64,
            seed: int = 0) -> onnx.ModelProto:
    """A BERT-shaped encoder of `blocks` layers with random weights: x [1, seq, hidden] -> y [1, hidden]."""
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, not {blocks}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    d = hidden // heads
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(name: str, shape: tuple[int, ...]) -> str:
        return init(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def bias(name: str, n: int) -> str:
        return init(name, (rng.standard_normal(n) * 0.01).astype(np.float32))

    def node(op: str, name: str, inputs: list[str], **attrs) -> str:
        out = name + "_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # constants shared by every block (the exporter folds them the same way); weights are per block
    heads_shape = init("shape_heads", np.array([1, seq, heads, d], dtype=np.int64))
    merged_shape = init("shape_merged", np.array([1, seq, hidden], dtype=np.int64))
    scale = init("attention_scale", np.array(math.sqrt(d), dtype=np.float32))
    sqrt2 = init("gelu_sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))
    one = init("gelu_one", np.array(1.0, dtype=np.float32))
    half = init("gelu_half", np.array(0.5, dtype=np.float32))

    def linear(prefix: str, param: str, x: str, k: int, n: int) -> str:
        """MatMul(x, W[k, n]) + bias, as the exporter writes nn.Linear."""
        h = node("MatMul", f"{prefix}/MatMul", [x, weight(f"{param}.weight", (k, n))])
        return node("Add", f"{prefix}/Add", [bias(f"{param}.bias", n), h])

    def layer_norm(prefix: str, param: str, x: str) -> str:
        gamma = init(f"{param}.weight", (1.0 + rng.standard_normal(hidden) * 0.02).astype(np.float32))
        beta = bias(f"{param}.bias", hidden)
        return node("LayerNormalization", f"{prefix}/LayerNormalization", [x, gamma, beta],
                    axis=-1, epsilon=1e-12)

    x = "x"
    for i in range(blocks):
        p, w = f"/encoder/layer.{i}", f"encoder.layer.{i}"
        a = f"{p}/attention/self"
        q = linear(f"{a}/query", f"{w}.attention.self.query", x, hidden, hidden)
        k = linear(f"{a}/key", f"{w}.attention.self.key", x, hidden, hidden)
        v = linear(f"{a}/value", f"{w}.attention.self.value", x, hidden, hidden)
        k = node("Reshape", f"{a}/Reshape", [k, heads_shape])
        k = node("Transpose", f"{a}/Transpose", [k], perm=[0, 2, 3, 1])        # [1, heads, d, seq]
        v = node("Reshape", f"{a}/Reshape_1", [v, heads_shape])
        v = node("Transpose", f"{a}/Transpose_1", [v], perm=[0, 2, 1, 3])      # [1, heads, seq, d]
        q = node("Reshape", f"{a}/Reshape_2", [q, heads_shape])
        q = node("Transpose", f"{a}/Transpose_2", [q], perm=[0, 2, 1, 3])      # [1, heads, seq, d]
        s = node("MatMul", f"{a}/MatMul", [q, k])                              # [1, heads, seq, seq]
        s = node("Div", f"{a}/Div", [s, scale])
        s = node("Softmax", f"{a}/Softmax", [s], axis=-1)
        c = node("MatMul", f"{a}/MatMul_1", [s, v])                            # [1, heads, seq, d]
        c = node("Transpose", f"{a}/Transpose_3", [c], perm=[0, 2, 1, 3])      # [1, seq, heads, d]
        c = node("Reshape", f"{a}/Reshape_3", [c, merged_shape])               # [1, seq, hidden]
        o = f"{p}/attention/output"
        h = linear(f"{o}/dense", f"{w}.attention.output.dense", c, hidden, hidden)
        h = node("Add", f"{o}/Add", [h, x])
        h = layer_norm(f"{o}/LayerNorm", f"{w}.attention.output.LayerNorm", h)
        f = linear(f"{p}/intermediate/dense", f"{w}.intermediate.dense", h, hidden, ffn)
        g = f"{p}/intermediate/intermediate_act_fn"
        e = node("Div", f"{g}/Div", [f, sqrt2])
        e = node("Erf", f"{g}/Erf", [e])
        e = node("Add", f"{g}/Add", [e, one])
        e = node("Mul", f"{g}/Mul", [f, e])
        e = node("Mul", f"{g}/Mul_1", [e, half])
        out = linear(f"{p}/output/dense", f"{w}.output.dense", e, ffn, hidden)
        out = node("Add", f"{p}/output/Add", [out, h])
        x = layer_norm(f"{p}/output/LayerNorm", f"{w}.output.LayerNorm", out)
    nodes.append(helper.make_node("ReduceMean", [x], ["y"], name="/pooler/ReduceMean", axes=[1], keepdims=0))

    graph = helper.make_graph(
        nodes, f"bert_synthetic_{blocks}x{hidden}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="denseflex-onnx bench/synthetic.py")
    model.ir_version = IR_VERSION
    return model


def calibration(n: int, seq: int = 64, hidden: int = 768, seed: int = 1) -> dict[str, np.ndarray]:
    """Random normal inputs for --data: {"x": float32 [n, seq, hidden]}.

    Layout: the sample axis takes the place of the input's batch dim. The tool's loader
    (denseflex_onnx/data.py `load_data`; CLI.md "Data") wants one array per input, named after it,
    dim 0 = samples and the remaining dims equal to the input's own ([seq, hidden] after the declared
    batch of 1); an array of exactly [1, seq, hidden] would be one sample, not an input fed whole,
    since the input's dim 0 is 1. `feeds` then runs the fixed batch of 1 in chunks x[i:i+1], each
    [1, seq, hidden] as declared.
    """
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, seq, hidden)).astype(np.float32)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a BERT-shaped encoder with random weights "
                                             "(and optionally random calibration data).")
    ap.add_argument("--blocks", type=int, required=True, help="encoder layers (12: BERT-base, 24: BERT-large depth)")
    ap.add_argument("-o", "--out", required=True, type=Path, help="the .onnx to write")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="the weights' seed")
    ap.add_argument("--data", type=Path, help="also write an .npz of random inputs for --data")
    ap.add_argument("--samples", type=int, default=64, help="samples in --data (default 64)")
    args = ap.parse_args(argv)
    model = encoder(args.blocks, args.hidden, args.ffn, args.heads, args.seq, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    print(f"{args.out}: {args.blocks} blocks, hidden {args.hidden}, ffn {args.ffn}, heads {args.heads}, "
          f"seq {args.seq}, {params:,} parameters")
    if args.data:
        args.data.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.data, **calibration(args.samples, args.seq, args.hidden))
        print(f"{args.data}: x [{args.samples}, {args.seq}, {args.hidden}]")


if __name__ == "__main__":
    main()
