"""More small real ONNX graphs for the discovery, data and CLI tests (built with onnx.helper).

Complements tests/graphs.py; every builder returns a checked ModelProto.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from graphs import init, model, rng, value


def run(m: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    """Run a model with onnxruntime on the CPU (the reference every check compares with)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def mlp(sizes=(20, 32, 24, 5), batch="N", seed=0) -> onnx.ModelProto:
    """Gemm(transB=1)-ReLU chain with plain random float32 weights (independent of graphs.mlp)."""
    r = rng(seed)
    nodes, inits = [], []
    x = "X"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (r.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        inits += [init(f"W{i}", w), init(f"b{i}", (r.standard_normal(n) * 0.1).astype(np.float32))]
        last = i == len(sizes) - 2
        y = "Y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [y], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"a{i}"]))
            x = f"a{i}"
    return model(nodes, [value("X", [batch, sizes[0]])], [value("Y", [batch, sizes[-1]])], inits)


def matmul_add(k=12, n=10, lead=("N",), other="vector", readers=1, seed=0) -> onnx.ModelProto:
    """X @ W -> H, then Add(H, other) -> Y.

    other: "vector" (constant [N]), "row" (constant [1, N]), "left" (constant [N] as the Add's
    first input), "matrix" (constant [lead[-1], N]), "input" (a second graph input [*lead, N]).
    readers=2: H is also read by a Relu (another graph output R).
    """
    r = rng(seed)
    inits = [init("W", r.standard_normal((k, n)).astype(np.float32))]
    inputs = [value("X", [*lead, k])]
    if other in ("vector", "left"):
        inits.append(init("b", r.standard_normal(n).astype(np.float32)))
    elif other == "row":
        inits.append(init("b", r.standard_normal((1, n)).astype(np.float32)))
    elif other == "matrix":
        inits.append(init("b", r.standard_normal((lead[-1], n)).astype(np.float32)))
    elif other == "input":
        inputs.append(value("b", [*lead, n]))
    add_inputs = ["b", "H"] if other == "left" else ["H", "b"]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
             helper.make_node("Add", add_inputs, ["Y"], name="add")]
    outputs = [value("Y", [*lead, n])]
    if readers == 2:
        nodes.append(helper.make_node("Relu", ["H"], ["R"], name="relu"))
        outputs.append(value("R", [*lead, n]))
    return model(nodes, inputs, outputs, inits)


def matmul_scalar_add(k=12, seed=0) -> onnx.ModelProto:
    """X [N, K] @ W [K, 1] + a scalar constant (shape []): N = 1, so the scalar has N elements."""
    r = rng(seed)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
             helper.make_node("Add", ["H", "b"], ["Y"], name="add")]
    return model(nodes, [value("X", ["N", k])], [value("Y", ["N", 1])],
                 [init("W", r.standard_normal((k, 1)).astype(np.float32)), init("b", np.float32(0.5))])


def two_input_matmul(m=6, k=8, n=5) -> onnx.ModelProto:
    """A [N, M, K] @ B [N, K, S]: no constant operand (attention-style)."""
    node = helper.make_node("MatMul", ["A", "B"], ["Y"], name="attn")
    return model([node], [value("A", ["N", m, k]), value("B", ["N", k, n])], [value("Y", ["N", m, n])])


def gemm_runtime_weight(k=12, n=10) -> onnx.ModelProto:
    node = helper.make_node("Gemm", ["X", "B"], ["Y"], name="fc")
    return model([node], [value("X", ["N", k]), value("B", [k, n])], [value("Y", ["N", n])])


def layer_and_attention(k=12, n=10, m=6, s=5, seed=0) -> onnx.ModelProto:
    """One Gemm layer X [N, K] -> [N, N_out], plus a non-layer MatMul A [N, M, K] @ B [N, K, S]."""
    r = rng(seed)
    nodes = [helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="fc"),
             helper.make_node("MatMul", ["A", "B"], ["Z"], name="attn")]
    return model(nodes, [value("X", ["N", k]), value("A", ["N", m, k]), value("B", ["N", k, s])],
                 [value("Y", ["N", n]), value("Z", ["N", m, s])],
                 [init("W", r.standard_normal((k, n)).astype(np.float32)),
                  init("C", r.standard_normal(n).astype(np.float32))])


def shared_weight(k=12, n=10, via_identity=False, seed=0) -> onnx.ModelProto:
    """Two MatMuls read the same weight (directly, or one of them through an Identity)."""
    r = rng(seed)
    nodes = []
    second = "W"
    if via_identity:
        nodes.append(helper.make_node("Identity", ["W"], ["W1"]))
        second = "W1"
    nodes += [helper.make_node("MatMul", ["X", "W"], ["Y1"], name="mm1"),
              helper.make_node("MatMul", ["X", second], ["Y2"], name="mm2")]
    return model(nodes, [value("X", ["N", k])], [value("Y1", ["N", n]), value("Y2", ["N", n])],
                 [init("W", r.standard_normal((k, n)).astype(np.float32))])


def if_model(k=12, n=10, main_reads_w=False, seed=0) -> onnx.ModelProto:
    """An If whose branches each hold a MatMul with an outer-scope constant weight.

    main_reads_w: the main graph's MatMul "mm_main" reads W too (a weight shared with the body).
    """
    r = rng(seed)
    w = r.standard_normal((k, n)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["t"], name="mm_then")], "then", [],
                               [value("t", ["N", n])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["X", "V"], ["e"], name="mm_else")], "else", [],
                               [value("e", ["N", n])])
    nodes = [helper.make_node("If", ["cond"], ["Y"], name="ifnode", then_branch=then_g, else_branch=else_g)]
    outputs = [value("Y", ["N", n])]
    if main_reads_w:
        nodes.insert(0, helper.make_node("MatMul", ["X", "W"], ["Z"], name="mm_main"))
        outputs.append(value("Z", ["N", n]))
    return model(nodes, [value("X", ["N", k]), value("cond", [], np.bool_)], outputs,
                 [init("W", w), init("V", (2 * w).astype(np.float32))])


def loop_model(k=12, n=10, seed=0) -> onnx.ModelProto:
    """A Loop whose body holds a MatMul with an outer-scope constant weight."""
    w = rng(seed).standard_normal((k, n)).astype(np.float32)
    body = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["t"], name="mm_body"),
                              helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                             [value("i", [], np.int64), value("cond_in", [], np.bool_)],
                             [value("cond_out", [], np.bool_), value("t", ["N", n])])
    nodes = [helper.make_node("Loop", ["trip", ""], ["Ys"], name="loop", body=body)]
    return model(nodes, [value("X", ["N", k]), value("trip", [], np.int64)], [value("Ys", ["T", "N", n])],
                 [init("W", w)])


def nested_if_model(k=12, n=10, seed=0) -> onnx.ModelProto:
    """If(outer) -> then: If(inner) -> then: MatMul(X, W); all other branches Identity(X @ ... none)."""
    w = rng(seed).standard_normal((k, n)).astype(np.float32)
    inner_then = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["it"], name="mm_deep")], "it", [],
                                   [value("it", ["N", n])])
    inner_else = helper.make_graph([helper.make_node("Identity", ["Z"], ["ie"])], "ie", [], [value("ie", ["N", n])])
    outer_then = helper.make_graph([helper.make_node("If", ["cond"], ["ot"], name="inner", then_branch=inner_then,
                                                     else_branch=inner_else)], "ot", [], [value("ot", ["N", n])])
    outer_else = helper.make_graph([helper.make_node("Identity", ["Z"], ["oe"])], "oe", [], [value("oe", ["N", n])])
    nodes = [helper.make_node("If", ["cond"], ["Y"], name="outer", then_branch=outer_then, else_branch=outer_else)]
    return model(nodes, [value("X", ["N", k]), value("Z", ["N", n]), value("cond", [], np.bool_)],
                 [value("Y", ["N", n])], [init("W", w)])


def dequantized(op="MatMul", k=12, n=10, seed=0) -> onnx.ModelProto:
    """An int8 weight through DequantizeLinear into a MatMul or Gemm."""
    r = rng(seed)
    wq = r.integers(-100, 100, (k, n)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]),
             helper.make_node(op, ["X", "W"], ["Y"], name="qmm")]
    return model(nodes, [value("X", ["N", k])], [value("Y", ["N", n])],
                 [init("Wq", wq), init("s", np.float32(0.05)), init("z", np.int8(0))])


def matmul_integer(k=12, n=10, seed=0) -> onnx.ModelProto:
    r = rng(seed)
    node = helper.make_node("MatMulInteger", ["X", "W"], ["Y"], name="mmi")
    return model([node], [value("X", ["N", k], np.uint8)], [value("Y", ["N", n], np.int32)],
                 [init("W", r.integers(0, 255, (k, n)).astype(np.uint8))])


def conv_integer(cin=3, cout=4, seed=0) -> onnx.ModelProto:
    r = rng(seed)
    node = helper.make_node("ConvInteger", ["X", "W"], ["Y"], name="convi", kernel_shape=[3, 3])
    return model([node], [value("X", ["N", cin, 8, 8], np.uint8)], [value("Y", ["N", cout, 6, 6], np.int32)],
                 [init("W", r.integers(0, 255, (cout, cin, 3, 3)).astype(np.uint8))])


def relu_only() -> onnx.ModelProto:
    return model([helper.make_node("Relu", ["X"], ["Y"], name="relu")], [value("X", ["N", 8])],
                 [value("Y", ["N", 8])])


def symbolic_model(dims=("N", "S", 16)) -> onnx.ModelProto:
    return model([helper.make_node("Relu", ["X"], ["Y"], name="relu")], [value("X", list(dims))],
                 [value("Y", list(dims))])


def gather_model(vocab=50, dim=8, seq=6, n=4, via_cast=False, seed=0) -> onnx.ModelProto:
    """ids [N, seq] (int64, or int32 cast to int64) -> Gather(table [vocab, dim]) -> MatMul."""
    r = rng(seed)
    nodes = []
    ids = "ids"
    if via_cast:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids64"], to=onnx.TensorProto.INT64))
        ids = "ids64"
    nodes += [helper.make_node("Gather", ["table", ids], ["E"], name="embed", axis=0),
              helper.make_node("MatMul", ["E", "W"], ["Y"], name="proj")]
    dtype = np.int32 if via_cast else np.int64
    return model(nodes, [value("ids", ["N", seq], dtype)], [value("Y", ["N", seq, n])],
                 [init("table", r.standard_normal((vocab, dim)).astype(np.float32)),
                  init("W", r.standard_normal((dim, n)).astype(np.float32))])


def int_input_no_gather() -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "W"], ["Y"], name="mm")]
    return model(nodes, [value("ids", ["N", 6], np.int64)], [value("Y", ["N", 3])],
                 [init("W", np.ones((6, 3), np.float32))])


def fixed_batch(batch=4, k=12, n=10, seed=0) -> onnx.ModelProto:
    """A MatMul whose input has a fixed batch dim."""
    r = rng(seed)
    node = helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")
    return model([node], [value("X", [batch, k])], [value("Y", [batch, n])],
                 [init("W", r.standard_normal((k, n)).astype(np.float32))])


def with_state(k=12) -> onnx.ModelProto:
    """Two inputs: X [N, K] and a fixed-shape state S [2, K] (no sample dim), Y = X @ (S^T S)."""
    nodes = [helper.make_node("Transpose", ["S"], ["St"], perm=[1, 0]),
             helper.make_node("MatMul", ["X", "St"], ["P"], name="proj"),
             helper.make_node("MatMul", ["P", "S"], ["Y"], name="back")]
    return model(nodes, [value("X", ["N", k]), value("S", [2, k])], [value("Y", ["N", k])])


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


__all__ = ["run", "mlp", "matmul_add", "matmul_scalar_add", "two_input_matmul", "gemm_runtime_weight",
           "layer_and_attention", "shared_weight", "if_model", "dequantized", "matmul_integer",
           "conv_integer", "loop_model", "nested_if_model", "relu_only", "symbolic_model", "gather_model", "int_input_no_gather",
           "fixed_batch", "with_state", "save"]
