"""The four rewrite passes on small real ONNX graphs, run with onnxruntime (CPU).

Everything a pass claims is checked against something computed here on its own:
  * full rank: the rewritten model computes what the original does (onnxruntime vs onnxruntime);
  * truncated rank: it computes x @ W_approx, W_approx contracted here from the same factors
    (A @ B, an einsum over the TT cores, a single reference Conv with the kernel rebuilt here);
  * cost(): params = float initializer elements under `<layer>/<method>/`, FLOPs = 2 x MACs of
    each MatMul/Conv node at shapes from onnx shape inference, and both below the original's;
  * every output passes the full checker, keeps the interface (names, dtypes, symbolic batch)
    and runs at batch 1 and 1000; new names carry the `<layer>/<method>/` prefix and the
    replaced weights are gone.
"""
from __future__ import annotations

import copy
import itertools
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper, shape_inference

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graphs  # noqa: E402

from denseflex_onnx.calibrate import LayerStats  # noqa: E402
from denseflex_onnx.errors import UserError  # noqa: E402
from denseflex_onnx.layers import find_layers  # noqa: E402
from denseflex_onnx.loading import load  # noqa: E402
from denseflex_onnx.passes import PASSES  # noqa: E402
from denseflex_onnx.passes import tt as tt_pass  # noqa: E402
from denseflex_onnx.plan import Choice, Plan, parse_spec  # noqa: E402
from denseflex_onnx.rewrite import rewrite_model  # noqa: E402

FP32_TOL, FP16_TOL = 1e-5, 5e-3
LOAD_BATCH = 3            # the concrete batch the layer is discovered (and costed) at
BATCHES = (1, 1000)       # every rewritten model runs at these
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}
PROPERTY = settings(deadline=None, derandomize=True, max_examples=30, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------- helpers

def tol(dtype) -> float:
    return FP16_TOL if np.dtype(dtype) == np.float16 else FP32_TOL


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / denom) if denom > 0 else float(np.linalg.norm(actual))


def input_info(model):
    return model.graph.input[0]


def input_dtype(model):
    return helper.tensor_dtype_to_np_dtype(input_info(model).type.tensor_type.elem_type)


def input_shape(model, batch: int) -> tuple[int, ...]:
    """The model input's shape with every symbolic dim set to `batch`."""
    dims = input_info(model).type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)


def random_input(model, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(input_shape(model, batch)).astype(input_dtype(model))


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model, x) -> np.ndarray:
    return session(model).run(None, {input_info(model).name: x})[0]


def discover(model):
    """Save, load at batch LOAD_BATCH and find the graph's one layer."""
    shapes = {input_info(model).name: input_shape(model, LOAD_BATCH)}
    with tempfile.TemporaryDirectory() as folder:
        loaded = load(graphs.save(model, Path(folder) / "m.onnx"), shapes)
    found = find_layers(loaded)
    assert len(found.layers) == 1, found.skipped
    return loaded, found.layers[0]


def rewrite(loaded, layer, method: str, config: dict, factors=None):
    module = PASSES[method]
    assert module.applies(layer) is None, module.applies(layer)
    if factors is None:
        factors = module.factorize(layer, config)
    plan = Plan({layer.name: Choice(method, config)})
    out = rewrite_model(loaded.proto, {layer.name: layer}, plan, {layer.name: factors})
    return out, factors


def full_config(layer, method: str) -> dict:
    if method in ("svd", "conv_svd"):
        return {"rank": PASSES[method].full_rank(layer)}
    if method == "conv_tt":
        return {"ranks": list(PASSES[method].max_ranks(layer))}
    k, n = layer.weight.shape
    d = 3 if tt_pass.factorizations(k, 3) and tt_pass.factorizations(n, 3) else 2
    ins, outs = tt_pass.factorizations(k, d)[0], tt_pass.factorizations(n, d)[0]
    return {"in_modes": list(ins), "out_modes": list(outs), "ranks": tt_pass.max_bonds(ins, outs)}


def check_valid(original, out):
    """Full checker; interface kept exactly (names, dtypes, symbolic dims); runs at batch 1 and 1000."""
    onnx.checker.check_model(out, full_check=True)
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in original.graph.input]
    assert [o.SerializeToString() for o in out.graph.output] == [o.SerializeToString() for o in original.graph.output]
    assert list(out.opset_import) == list(original.opset_import)
    sess = session(out)
    for batch in BATCHES:
        x = random_input(original, batch, seed=batch)
        y = sess.run(None, {input_info(original).name: x})[0]
        assert y.dtype == input_dtype(original)
        assert np.all(np.isfinite(y))


def check_names(original, out, layer, method: str, replaced: tuple[str, ...], others=()):
    """`others`: prefixes of other layers rewritten in the same model."""
    prefix = f"{layer.name}/{method}/"
    old_nodes = {n.name for n in original.graph.node}
    old_inits = {i.name for i in original.graph.initializer}
    new_nodes = [n.name for n in out.graph.node if n.name not in old_nodes and not n.name.startswith(tuple(others))]
    new_inits = [i.name for i in out.graph.initializer
                 if i.name not in old_inits and not i.name.startswith(tuple(others))]
    assert new_nodes and new_inits
    assert all(name.startswith(prefix) for name in new_nodes), new_nodes
    assert all(name.startswith(prefix) for name in new_inits), new_inits
    inits = {i.name for i in out.graph.initializer}
    assert not inits & set(replaced), inits & set(replaced)
    assert layer.name not in {n.name for n in out.graph.node}
    # nothing is left reading the old weight (a Constant, Identity, Cast or Transpose chain)
    assert all(not n.name.startswith(prefix) for n in out.graph.node if n.op_type == "Constant")
    produced = {o for n in out.graph.node for o in n.output}
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    assert produced <= used, produced - used


def concrete(model, batch: int) -> onnx.ModelProto:
    fixed = copy.deepcopy(model)
    for info in fixed.graph.input:
        for d, v in zip(info.type.tensor_type.shape.dim, input_shape(model, batch)):
            d.Clear()
            d.dim_value = v
    for info in fixed.graph.output:
        info.type.tensor_type.ClearField("shape")
    return fixed


def graph_cost(model, prefix: str = "", batch: int = LOAD_BATCH) -> tuple[int, int]:
    """Float initializer elements and 2 x MACs of MatMul/Gemm/Conv nodes whose names start with
    `prefix`, at shapes from onnx shape inference with the symbolic batch set to `batch`."""
    inferred = shape_inference.infer_shapes(concrete(model, batch), strict_mode=True, data_prop=True)
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), info
        shapes[info.name] = [d.dim_value for d in dims]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    params = sum(math.prod(t.dims) for t in inferred.graph.initializer
                 if t.name.startswith(prefix) and t.data_type in FLOAT_TYPES)
    flops = 0
    for node in inferred.graph.node:
        if not node.name.startswith(prefix):
            continue
        out = shapes[node.output[0]]
        if node.op_type == "MatMul":
            flops += 2 * math.prod(out) * shapes[node.input[0]][-1]
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = shapes[node.input[0]]
            flops += 2 * math.prod(out) * (a[0] if trans_a else a[1])
        elif node.op_type == "Conv":
            w = shapes[node.input[1]]
            flops += 2 * math.prod(out) * w[1] * math.prod(w[2:])
    return params, flops


# ---------------------------------------------- independent references: weights from factors

def tt_contract(cores) -> np.ndarray:
    """The K x N matrix of TT-matrix cores [r_{t-1}, k_t, n_t, r_t], by one einsum."""
    d = len(cores)
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ")
    bonds = [next(letters) for _ in range(d + 1)]
    ins = [next(letters) for _ in range(d)]
    outs = [next(letters) for _ in range(d)]
    terms = [bonds[t] + ins[t] + outs[t] + bonds[t + 1] for t in range(d)]
    expr = ",".join(terms) + "->" + bonds[0] + "".join(ins) + "".join(outs) + bonds[d]
    full = np.einsum(expr, *[np.asarray(c, np.float64) for c in cores])
    return full.reshape(math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores))


def matrix_from_factors(layer, method: str, factors) -> np.ndarray:
    """W_approx in layer.weight's layout, computed here."""
    f = [np.asarray(a, np.float64) for a in factors]
    if method == "svd":
        # right: x @ A @ B; left: B @ (A @ x)
        return f[0] @ f[1] if layer.side == "right" else f[1] @ f[0]
    if method == "tt":
        return tt_contract(f)
    if method == "conv_svd":
        first, second = f
        return np.einsum("or,r...->o...", second.reshape(second.shape[0], second.shape[1]), first)
    first, middle, last = f
    return np.einsum("os,sr...,ri->oi...", last.reshape(last.shape[:2]), middle, first.reshape(first.shape[:2]))


def node_of(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def attr(node, name, default=None):
    found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return found[0] if found else default


def inits_of(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def numpy_reference(original, w, x) -> np.ndarray:
    """What a graph of graphs.gemm/matmul/matmul_left computes with its layer's weight
    (as Layer.weight lays it out, alpha folded) replaced by w; float64."""
    x = np.asarray(x, np.float64)
    inits = inits_of(original)
    ops = [n.op_type for n in original.graph.node]
    if "Gemm" in ops:
        gemm = node_of(original, "Gemm")
        xa = x.T if attr(gemm, "transA", 0) else x
        y = xa @ w
        if len(gemm.input) > 2:
            y = y + attr(gemm, "beta", 1.0) * inits[gemm.input[2]].astype(np.float64)
        return y
    mm = node_of(original, "MatMul")
    if mm.input[0] != input_info(original).name:          # constant on the left
        return w @ x
    y = x @ w
    if "Add" in ops:
        y = y + inits[node_of(original, "Add").input[1]].astype(np.float64)
    return y


def conv_reference(original, kernel, x) -> np.ndarray:
    """One float32 Conv with the original's attributes (auto_pad included), bias and this kernel."""
    conv = node_of(original, "Conv")
    inits = inits_of(original)
    new_inits = [numpy_helper.from_array(np.asarray(kernel, np.float32), "K")]
    inputs = ["x", "K"]
    if len(conv.input) > 2:
        new_inits.append(numpy_helper.from_array(inits[conv.input[2]].astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"])
    node.attribute.extend(conv.attribute)
    graph = helper.make_graph([node], "reference", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], new_inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    m.ir_version = 8
    return session(m).run(None, {"x": np.asarray(x, np.float32)})[0]


def reference(original, layer, method, factors, x) -> np.ndarray:
    w = matrix_from_factors(layer, method, factors)
    if layer.op == "Conv":
        return conv_reference(original, w, x)
    return numpy_reference(original, w, x)


# -------------------------------------------------------------------- the op variants tested

def gemm_cases():
    for ta, tb, (alpha, beta), bias in itertools.product((0, 1), (0, 1), ((1.0, 1.0), (0.5, 2.0)),
                                                         ("vector", "row", "scalar", None)):
        yield (f"gemm-tA{ta}-tB{tb}-a{alpha}-b{beta}-{bias}",
               lambda ta=ta, tb=tb, alpha=alpha, beta=beta, bias=bias:
               graphs.gemm(24, 16, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta, bias=bias))
    yield "gemm-fp16", lambda: graphs.gemm(24, 16, trans_b=1, dtype=np.float16)
    yield "gemm-fp16-tA-alpha", lambda: graphs.gemm(24, 16, trans_a=1, alpha=0.5, beta=2.0, bias="row",
                                                    dtype=np.float16)


def matmul_cases():
    for lead, bias in itertools.product((("N",), ("N", 3), ("N", 2, 3)), (False, True)):
        yield f"matmul-{len(lead) + 1}d-bias{int(bias)}", lambda lead=lead, bias=bias: graphs.matmul(24, 16, lead, bias)
    for via in ("Constant", "Identity", "Cast", "Transpose"):
        yield f"matmul-via-{via}", lambda via=via: graphs.matmul(24, 16, ("N", 3), bias=True, weight_via=via)
    yield "matmul-fp16", lambda: graphs.matmul(24, 16, ("N",), dtype=np.float16)
    yield "matmul-fp16-3d-bias", lambda: graphs.matmul(24, 16, ("N", 3), bias=True, dtype=np.float16)


def left_cases():
    yield "left-2d", lambda: graphs.matmul_left(16, 24, 7, lead=())
    yield "left-3d", lambda: graphs.matmul_left(16, 24, 7)
    yield "left-4d", lambda: graphs.matmul_left(16, 24, 5, lead=("N", 2))


def conv_cases():
    c = graphs.conv
    yield "conv2d", lambda: c()
    yield "conv2d-nobias", lambda: c(bias=False)
    yield "conv2d-strides", lambda: c(strides=(2, 1), spatial=(10, 9))
    yield "conv2d-pads", lambda: c(pads=(1, 0, 2, 1))
    yield "conv2d-dilations", lambda: c(dilations=(2, 1), spatial=(11, 9))
    yield "conv2d-all", lambda: c(kernel=(3, 2), strides=(2, 2), pads=(1, 1, 0, 1), dilations=(1, 2), spatial=(11, 10))
    for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        yield f"conv2d-{mode}", lambda mode=mode: c(auto_pad=mode, strides=(2, 1), spatial=(10, 8), kernel=(3, 2))
    yield "conv2d-rect", lambda: c(cin=5, cout=12, kernel=(1, 3))
    yield "conv1d", lambda: c(kernel=(3,), spatial=(12,))
    yield "conv1d-all", lambda: c(kernel=(4,), spatial=(15,), strides=(2,), pads=(2, 1), dilations=(2,))
    yield "conv1d-SAME_LOWER", lambda: c(kernel=(2,), spatial=(11,), strides=(2,), auto_pad="SAME_LOWER")
    yield "conv1d-SAME_UPPER", lambda: c(kernel=(4,), spatial=(9,), auto_pad="SAME_UPPER", bias=False)
    yield "conv2d-fp16", lambda: c(dtype=np.float16, pads=(1, 1, 1, 1))
    yield "conv1d-fp16", lambda: c(kernel=(3,), spatial=(12,), dtype=np.float16, strides=(2,))


def cases(method):
    if method in ("svd", "tt"):
        found = [*gemm_cases(), *matmul_cases()] + ([*left_cases()] if method == "svd" else [])
    else:
        found = [*conv_cases()]
        if method == "conv_svd":
            found.append(("conv2d-1x1", lambda: graphs.conv(kernel=(1, 1))))
    return [pytest.param(method, build, id=f"{method}-{name}") for name, build in found]


# the per-layer passes (prune takes a layer pair: tests/test_prune.py)
LAYER_PASSES = [m for m in PASSES if getattr(PASSES[m], "TARGET", "layer") == "layer"]
ALL_CASES = [p for m in LAYER_PASSES for p in cases(m)]


# --------------------------------------------------------------------------------- 1, 4, 6

@pytest.mark.parametrize(("method", "build"), ALL_CASES)
def test_full_rank_is_exact(method, build):
    original = build()
    loaded, layer = discover(original)
    out, factors = rewrite(loaded, layer, method, full_config(layer, method))
    check_valid(original, out)
    replaced = tuple(n for n in ("W", "W0", "C", "b", "B") if n in inits_of(original))
    check_names(original, out, layer, method, replaced)
    np.testing.assert_allclose(PASSES[method].reconstruct(layer, factors), layer.weight.astype(np.float64),
                               rtol=0, atol=tol(layer.dtype) * 10 * np.abs(layer.weight).max())
    for batch in BATCHES:
        x = random_input(original, batch, seed=batch + 7)
        expected = run(original, x)
        assert rel_err(run(out, x), expected) <= tol(layer.dtype)


@pytest.mark.parametrize(("method", "build"), ALL_CASES)
def test_truncated_rank_computes_the_factors(method, build):
    """Outputs are x @ W_approx with W_approx contracted here from the factors written."""
    original = build()
    loaded, layer = discover(original)
    config = parse_spec(layer, "tt:0.5" if method == "tt" else f"{method}:0.5").config
    out, factors = rewrite(loaded, layer, method, config)
    x = random_input(original, 64, seed=3)
    assert rel_err(run(out, x), reference(original, layer, method, factors, x)) <= tol(layer.dtype)
    # the pass's own reconstruct agrees with the contraction done here
    np.testing.assert_allclose(PASSES[method].reconstruct(layer, factors),
                               matrix_from_factors(layer, method, factors), rtol=1e-9, atol=1e-9)


def test_references_reproduce_the_originals():
    """The numpy and Conv references of this file are right: with the layer's own weight
    they give what onnxruntime computes for the original model."""
    for _, build in [*gemm_cases(), *matmul_cases(), *left_cases(), *conv_cases()]:
        original = build()
        _, layer = discover(original)
        x = random_input(original, 5, seed=1)
        w = layer.weight.astype(np.float64)
        got = conv_reference(original, w, x) if layer.op == "Conv" else numpy_reference(original, w, x)
        assert rel_err(got, run(original, x)) <= tol(layer.dtype)


def test_tt_and_conv_tt_refuse_what_they_cannot_take():
    _, left = discover(graphs.matmul_left(16, 24, 7))
    assert PASSES["tt"].applies(left)
    _, prime = discover(graphs.matmul(13, 16))
    assert PASSES["tt"].applies(prime)
    _, one_by_one = discover(graphs.conv(kernel=(1, 1)))
    assert PASSES["conv_tt"].applies(one_by_one)
    assert PASSES["conv_svd"].applies(one_by_one) is None
    _, fc = discover(graphs.gemm())
    _, conv = discover(graphs.conv())
    for method in ("conv_svd", "conv_tt"):
        assert PASSES[method].applies(fc)
    for method in ("svd", "tt"):
        assert PASSES[method].applies(conv)


def test_truncated_svd_is_the_optimal_rank_r_approximation():
    """Plain SVD truncation error is the Eckart-Young optimum for both SVD passes."""
    for method, build, matrix in (("svd", lambda: graphs.gemm(24, 16, trans_b=1, alpha=0.5), lambda w: w),
                                  ("conv_svd", graphs.conv, lambda w: w.reshape(w.shape[0], -1))):
        _, layer = discover(build())
        w = layer.weight.astype(np.float64)
        s = np.linalg.svd(matrix(w), compute_uv=False)
        for rank in (1, 3, 7):
            factors = PASSES[method].factorize(layer, {"rank": rank})
            approx = matrix_from_factors(layer, method, factors)
            assert np.linalg.norm(matrix(w) - matrix(approx)) == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-4)


# ----------------------------------------------------------------------------------------- 3

COST_CASES = [
    ("svd", lambda: graphs.gemm(48, 40, trans_b=1), "svd:0.25"),
    ("svd", lambda: graphs.gemm(48, 40, trans_a=1, alpha=2.0, bias="scalar"), "svd:8"),
    ("svd", lambda: graphs.matmul(48, 40, ("N", 5), bias=True), "svd:0.1"),
    ("svd", lambda: graphs.matmul_left(40, 48, 9, lead=("N", 2)), "svd:6"),
    # TT saves FLOPs only on bigger layers at low ranks (on small ones it costs more: not tested here)
    ("tt", lambda: graphs.gemm(96, 64, trans_b=1), "tt:4x4x6,4x4x4:2"),
    ("tt", lambda: graphs.matmul(96, 64, ("N", 5), bias=True), "tt:0.1"),
    ("tt", lambda: graphs.gemm(128, 128, trans_a=1, alpha=0.5, bias="row"), "tt:8x16,8x16:4"),
    ("tt", lambda: graphs.matmul(64, 64, ("N", 2, 3)), "tt:4x4x4,4x4x4:2x3"),
    ("conv_svd", lambda: graphs.conv(16, 32, spatial=(12, 12)), "conv_svd:0.25"),
    ("conv_svd", lambda: graphs.conv(16, 32, kernel=(3,), spatial=(20,), strides=(2,), auto_pad="SAME_UPPER"), "conv_svd:4"),
    ("conv_tt", lambda: graphs.conv(16, 32, spatial=(12, 12)), "conv_tt:0.25"),
    ("conv_tt", lambda: graphs.conv(16, 32, spatial=(13, 12), strides=(2, 2), pads=(1, 1, 1, 1)), "conv_tt:4x8"),
    ("conv_tt", lambda: graphs.conv(16, 32, kernel=(5,), spatial=(20,), dilations=(2,), bias=False), "conv_tt:0.5"),
]


@pytest.mark.parametrize(("method", "build", "spec"), COST_CASES,
                         ids=[f"{m}-{s}-{i}" for i, (m, _, s) in enumerate(COST_CASES)])
def test_cost_matches_the_written_graph(method, build, spec):
    original = build()
    loaded, layer = discover(original)
    choice = parse_spec(layer, spec)
    assert choice.method == method
    out, _ = rewrite(loaded, layer, method, choice.config)
    params, flops = graph_cost(out, f"{layer.name}/{method}/")
    assert (params, flops) == PASSES[method].cost(layer, choice.config)
    dense_params, dense_flops = graph_cost(original)
    assert dense_flops == layer.flops
    # a scalar Gemm C is one element in the file, Layer.params counts it broadcast over N
    assert dense_params == layer.params or has_scalar_bias(original)
    assert params < dense_params and flops < dense_flops
    # the whole model: what is not the layer is unchanged
    assert graph_cost(out) == (params, flops)


def has_scalar_bias(model) -> bool:
    return any(len(t.dims) == 0 for t in model.graph.initializer)


# -------------------------------------------------------------------- 5: property-based tests

def check_rewrite(original, layer, loaded, method, config):
    """Every property of a truncated rewrite at once."""
    out, factors = rewrite(loaded, layer, method, config)
    check_valid(original, out)
    check_names(original, out, layer, method, tuple(n for n in ("W", "W0") if n in inits_of(original)))
    x = random_input(original, 6, seed=11)
    assert rel_err(run(out, x), reference(original, layer, method, factors, x)) <= tol(layer.dtype)
    np.testing.assert_allclose(PASSES[method].reconstruct(layer, factors),
                               matrix_from_factors(layer, method, factors), rtol=1e-9, atol=1e-9)
    assert graph_cost(out, f"{layer.name}/{method}/") == PASSES[method].cost(layer, config)
    text = PASSES[method].spec(config)
    assert parse_spec(layer, text).config == config
    return out, factors


@st.composite
def dense_layers(draw, k, n, allow_left=False):
    """A Gemm (any attributes), a MatMul (2-D..4-D, maybe a bias, maybe a weight chain) or a left MatMul."""
    kinds = ["gemm", "matmul"] + (["left"] if allow_left else [])
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 1000))
    if kind == "gemm":
        return graphs.gemm(k, n, trans_a=draw(st.sampled_from([0, 1])), trans_b=draw(st.sampled_from([0, 1])),
                           alpha=draw(st.sampled_from([1.0, 0.5, -2.0])), beta=draw(st.sampled_from([1.0, 0.25])),
                           bias=draw(st.sampled_from(["vector", "row", "scalar", None])), seed=seed)
    lead = ("N", *draw(st.lists(st.integers(1, 3), max_size=2)))
    if kind == "left":
        return graphs.matmul_left(n, k, draw(st.integers(1, 5)), lead=lead, seed=seed)
    return graphs.matmul(k, n, lead, bias=draw(st.booleans()),
                         weight_via=draw(st.sampled_from([None, "Constant", "Identity", "Cast", "Transpose"])),
                         seed=seed)


@PROPERTY
@given(st.data())
def test_svd_property(data):
    k, n = data.draw(st.integers(2, 20)), data.draw(st.integers(2, 20))
    original = data.draw(dense_layers(k, n, allow_left=True))
    loaded, layer = discover(original)
    rank = data.draw(st.integers(1, min(k, n)))
    _, factors = check_rewrite(original, layer, loaded, "svd", {"rank": rank})
    w = layer.weight.astype(np.float64)
    error = np.linalg.norm(w - matrix_from_factors(layer, "svd", factors))
    assert error == pytest.approx(math.sqrt(tail(w, rank)), rel=1e-3, abs=1e-5 * np.linalg.norm(w))


@st.composite
def tt_shapes(draw):
    d = draw(st.integers(2, 3))
    ins = draw(st.lists(st.integers(2, 4), min_size=d, max_size=d))
    outs = draw(st.lists(st.integers(2, 4), min_size=d, max_size=d))
    return ins, outs


def tail(matrix, rank) -> float:
    """Squared Frobenius error of the best rank-`rank` approximation (Eckart-Young)."""
    sv = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sum(sv[rank:] ** 2))


def tt_svd_bound(w, ins, outs, ranks) -> float:
    """Oseledets (2011): TT-SVD error^2 <= sum over bonds of the best rank-r_t error^2 of the t-th
    unfolding of W reshaped to (k1 n1)(k2 n2)...(kd nd); computed here from W alone."""
    d = len(ins)
    tensor = np.asarray(w, np.float64).reshape(*ins, *outs)
    tensor = tensor.transpose([i for t in range(d) for i in (t, d + t)]).reshape([k * n for k, n in zip(ins, outs)])
    sizes = tensor.shape
    return math.sqrt(sum(tail(tensor.reshape(math.prod(sizes[:t + 1]), -1), r) for t, r in enumerate(ranks)))


@PROPERTY
@given(st.data())
def test_tt_property(data):
    ins, outs = data.draw(tt_shapes())
    caps = tt_pass.max_bonds(ins, outs)
    ranks = [data.draw(st.integers(1, c)) for c in caps]
    # keep r_t <= r_{t-1} * k_t * n_t, what the TT-SVD can reach; bonds beyond it are
    # accepted by parse_spec but not built: test_tt_cost_of_unreachable_ranks
    sizes = [k * n for k, n in zip(ins, outs)]
    for t in range(1, len(ranks)):
        ranks[t] = min(ranks[t], ranks[t - 1] * sizes[t])
    original = data.draw(dense_layers(math.prod(ins), math.prod(outs)))
    loaded, layer = discover(original)
    config = {"in_modes": ins, "out_modes": outs, "ranks": ranks}
    out, factors = check_rewrite(original, layer, loaded, "tt", config)
    assert [c.shape for c in factors] == [(r0, k, n, r1) for r0, k, n, r1 in zip([1, *ranks], ins, outs, [*ranks, 1])]
    w = layer.weight.astype(np.float64)
    error = np.linalg.norm(w - tt_contract(factors))
    assert error <= tt_svd_bound(w, ins, outs, ranks) * (1 + 1e-4) + 1e-5 * np.linalg.norm(w)
    if ranks == caps:        # full bonds: exact
        x = random_input(original, 4, seed=5)
        assert rel_err(run(out, x), run(original, x)) <= FP32_TOL


@PROPERTY
@given(st.integers(4, 5000), st.integers(2, 4))
def test_tt_factorizations(n, d):
    found = tt_pass.factorizations(n, d)
    assert len(set(found)) == len(found)
    for fs in found:
        assert len(fs) == d and math.prod(fs) == n and min(fs) >= 2 and list(fs) == sorted(fs)
    # complete: every ascending factorization into factors >= 2 is listed
    def brute(rest, parts, smallest):
        if parts == 1:
            return [(rest,)] if rest >= smallest else []
        return [(f, *t) for f in range(smallest, rest + 1) if rest % f == 0 for t in brute(rest // f, parts - 1, f)]
    assert set(found) == set(brute(n, d, 2))
    balance = [max(fs) / min(fs) for fs in found]
    assert balance == sorted(balance)


@PROPERTY
@given(tt_shapes())
def test_tt_max_bonds(shape):
    ins, outs = shape
    sizes = [k * n for k, n in zip(ins, outs)]
    caps = tt_pass.max_bonds(ins, outs)
    assert len(caps) == len(ins) - 1
    for t, c in enumerate(caps):
        assert c == min(math.prod(sizes[:t + 1]), math.prod(sizes[t + 1:]))
    # at the maximum bonds the TT-SVD is exact
    w = np.random.default_rng(0).standard_normal((math.prod(ins), math.prod(outs)))
    cores = tt_pass.factorize(_FakeLayer(w), {"in_modes": ins, "out_modes": outs, "ranks": caps})
    np.testing.assert_allclose(tt_contract(cores), w, atol=1e-9)
    np.testing.assert_allclose(tt_pass.reconstruct_cores(cores), w, atol=1e-9)


class _FakeLayer:
    """Only what tt.factorize reads of a layer: its weight (float64, so exactness is checkable)."""

    def __init__(self, weight):
        self.weight = weight
        self.dtype = weight.dtype


@st.composite
def conv_layers(draw, kernel_min=1):
    nd = draw(st.integers(1, 2))
    cin, cout = draw(st.integers(1, 8)), draw(st.integers(2, 12))
    kernel = tuple(draw(st.integers(kernel_min, 3)) for _ in range(nd))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    auto_pad = draw(st.sampled_from([None, None, "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):      # onnxruntime runs SAME only without dilation
        dilations = (1,) * nd
    pads = None if auto_pad else tuple(draw(st.integers(0, 2)) for _ in range(2 * nd))
    spans = [dl * (k - 1) + 1 for dl, k in zip(dilations, kernel)]
    spatial = tuple(draw(st.integers(s, s + 6)) for s in spans)
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float32, np.float16]))
    return graphs.conv(cin, cout, kernel, spatial, strides, pads, dilations, auto_pad, bias=draw(st.booleans()),
                       dtype=dtype, seed=draw(st.integers(0, 1000)))


@PROPERTY
@given(st.data())
def test_conv_svd_property(data):
    original = data.draw(conv_layers())
    loaded, layer = discover(original)
    if PASSES["conv_svd"].applies(layer) is not None:
        assert PASSES["conv_svd"].full_rank(layer) < 2
        return
    rank = data.draw(st.integers(1, PASSES["conv_svd"].full_rank(layer)))
    _, factors = check_rewrite(original, layer, loaded, "conv_svd", {"rank": rank})
    w = layer.weight.astype(np.float64).reshape(layer.weight.shape[0], -1)
    error = np.linalg.norm(w - matrix_from_factors(layer, "conv_svd", factors).reshape(w.shape))
    scale = 3e-3 if layer.dtype == np.float16 else 1e-5
    assert error == pytest.approx(math.sqrt(tail(w, rank)), rel=scale * 100, abs=scale * np.linalg.norm(w))


@PROPERTY
@given(st.data())
def test_conv_tt_property(data):
    original = data.draw(conv_layers(kernel_min=2))
    loaded, layer = discover(original)
    caps = PASSES["conv_tt"].max_ranks(layer)
    r1 = data.draw(st.integers(1, caps[0]))
    kk = math.prod(layer.weight.shape[2:])
    # r2 beyond r1 * kh * kw is not reachable by the TT-SVD: tested on its own below
    r2 = data.draw(st.integers(1, min(caps[1], r1 * kk)))
    _, factors = check_rewrite(original, layer, loaded, "conv_tt", {"ranks": [r1, r2]})
    # a 3-core TT of the kernel as (Cin, kh*kw, Cout): the TT-SVD bound, computed from W here
    cout, cin = layer.weight.shape[:2]
    w = layer.weight.astype(np.float64)
    tensor = w.reshape(cout, cin, kk).transpose(1, 2, 0)
    bound = math.sqrt(tail(tensor.reshape(cin, -1), r1) + tail(tensor.reshape(cin * kk, -1), r2))
    error = np.linalg.norm(w - matrix_from_factors(layer, "conv_tt", factors))
    scale = 3e-3 if layer.dtype == np.float16 else 1e-5
    assert error <= bound * (1 + 1e-4) + scale * np.linalg.norm(w)


# ------------------------------------------------- ranks the spec accepts but cannot be built

def test_tt_unreachable_ranks_are_refused_and_reachable_ones_cost_exactly():
    """tt:2x2x4,2x2x4:1x16: bond 2 can be at most 1*2*2 = 4 after bond 1 = 1, so the spec is
    refused with the reachable ranks named; those ranks build exactly what cost() says."""
    loaded, layer = discover(graphs.matmul(16, 16))
    with pytest.raises(UserError, match="1x4"):
        parse_spec(layer, "tt:2x2x4,2x2x4:1x16")
    config = parse_spec(layer, "tt:2x2x4,2x2x4:1x4").config
    out, factors = rewrite(loaded, layer, "tt", config)
    assert [c.shape[-1] for c in factors[:-1]] == [1, 4]
    assert graph_cost(out, "mm/tt/") == PASSES["tt"].cost(layer, config)


def test_conv_tt_unreachable_ranks_are_refused_and_fractions_clamped():
    """conv_tt:1x18 on Conv(2->64, 3x3): r2 <= r1 * 9 = 9."""
    loaded, layer = discover(graphs.conv(2, 64, spatial=(8, 8)))
    with pytest.raises(UserError, match="1x9"):
        parse_spec(layer, "conv_tt:1x18")
    config = parse_spec(layer, "conv_tt:1x9").config
    out, factors = rewrite(loaded, layer, "conv_tt", config)
    assert [factors[0].shape[0], factors[1].shape[0]] == [1, 9]
    assert graph_cost(out, "conv/conv_tt/") == PASSES["conv_tt"].cost(layer, config)
    for candidate in PASSES["conv_tt"].candidates(layer) + [parse_spec(layer, "conv_tt:0.5").config]:
        r1, r2 = candidate["ranks"]
        assert r2 <= r1 * 9


# -------------------------------------------------------------------------- specs and errors

@pytest.mark.parametrize(("build", "spec"), [
    (graphs.gemm, "svd:11"), (graphs.gemm, "svd:0"), (graphs.gemm, "svd:1.5"), (graphs.gemm, "svd:abc"),
    (graphs.gemm, "tt:5x2,2x5:2"), (graphs.gemm, "tt:3x4,2x5:7"), (graphs.gemm, "tt:3x4,2x5"),
    (graphs.gemm, "tt:2x2x3,2x5:1"), (graphs.gemm, "conv_svd:2"), (graphs.conv, "svd:2"),
    (graphs.conv, "conv_svd:17"), (graphs.conv, "conv_tt:9x16"), (graphs.conv, "conv_tt:2x3x4"),
    (lambda: graphs.conv(kernel=(1, 1)), "conv_tt:2x2"), (graphs.gemm, "nope:3"), (graphs.gemm, "svd:"),
])
def test_bad_specs_are_user_errors(build, spec):
    _, layer = discover(build())
    with pytest.raises(UserError):
        parse_spec(layer, spec)


def test_spec_fractions_and_round_trip():
    _, fc = discover(graphs.gemm(24, 16))
    assert parse_spec(fc, "svd:0.25").config == {"rank": 4}
    assert parse_spec(fc, "svd:16").config == {"rank": 16}
    tt = parse_spec(fc, "tt:0.5").config
    assert math.prod(tt["in_modes"]) == 24 and math.prod(tt["out_modes"]) == 16 and len(tt["in_modes"]) == 3
    assert tt["ranks"] == [max(1, round(0.5 * c)) for c in tt_pass.max_bonds(tt["in_modes"], tt["out_modes"])]
    assert parse_spec(fc, "tt:4x6,4x4:3").config == {"in_modes": [4, 6], "out_modes": [4, 4], "ranks": [3]}
    _, conv = discover(graphs.conv(8, 16))
    assert parse_spec(conv, "conv_svd:0.5").config == {"rank": 8}
    assert parse_spec(conv, "conv_tt:0.5").config == {"ranks": [4, 8]}
    assert parse_spec(conv, "conv_tt:3x5").config == {"ranks": [3, 5]}
    for layer, method in ((fc, "svd"), (fc, "tt"), (conv, "conv_svd"), (conv, "conv_tt")):
        for config in PASSES[method].candidates(layer):
            assert parse_spec(layer, PASSES[method].spec(config)).config == config


@pytest.mark.parametrize("method", LAYER_PASSES)
def test_candidates_are_valid_and_costed(method):
    _, layer = discover(graphs.conv(16, 32, spatial=(10, 10)) if method.startswith("conv")
                        else graphs.matmul(48, 64, ("N", 4), bias=True))
    configs = PASSES[method].candidates(layer)
    assert configs
    for config in configs:
        params, flops = PASSES[method].cost(layer, config)
        assert 0 < params and 0 < flops
        if method in ("svd", "conv_svd", "conv_tt"):
            assert params < layer.params
    # one candidate of each, built: cost() matches the graph
    loaded, layer = discover(graphs.conv(16, 32, spatial=(10, 10)) if method.startswith("conv")
                             else graphs.matmul(48, 64, ("N", 4), bias=True))
    for config in configs[:: max(1, len(configs) // 3)]:
        out, _ = rewrite(loaded, layer, method, config)
        assert graph_cost(out, f"{layer.name}/{method}/") == PASSES[method].cost(layer, config)


def test_decomposition_serves_every_rank():
    """One decomposition passed in gives the same factors as factorizing from scratch."""
    for method, build in (("svd", lambda: graphs.gemm(24, 16, trans_b=1)), ("conv_svd", graphs.conv)):
        _, layer = discover(build())
        module = PASSES[method]
        d = module.decompose(layer)
        for rank in (1, 4, module.full_rank(layer)):
            fresh = module.factorize(layer, {"rank": rank})
            cached = module.factorize(layer, {"rank": rank}, decomposition=d)
            for a, b in zip(fresh, cached):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_several_layers_rewritten_at_once():
    """rewrite_model with a plan over several layers of an MLP: each chain in place, the rest kept."""
    original = graphs.mlp((24, 32, 20, 6))
    with tempfile.TemporaryDirectory() as folder:
        loaded = load(graphs.save(original, Path(folder) / "m.onnx"), {"X": (LOAD_BATCH, 24)})
    layers = {l.name: l for l in find_layers(loaded).layers}
    plan = Plan({"fc0": parse_spec(layers["fc0"], "svd:0.5"), "fc1": parse_spec(layers["fc1"], "tt:4x8,4x5:4")})
    out = rewrite_model(loaded.proto, layers, plan)
    check_valid(original, out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Relu") == 2 and ops.count("Gemm") == 1
    for name, method in (("fc0", "svd"), ("fc1", "tt")):
        others = [p for p in ("fc0/svd/", "fc1/tt/") if not p.startswith(name)]
        check_names(original, out, layers[name], method, (f"W{name[-1]}", f"b{name[-1]}"), others)
    keys = {p.key: p.value for p in out.metadata_props}
    assert keys["denseflex_onnx.plan_sha256"] == plan.sha256()
    assert "denseflex_onnx.version" in keys
    # the output equals the MLP recomputed in numpy with the factor weights (no factors given: fresh)
    x = random_input(original, 50)
    w0 = matrix_from_factors(layers["fc0"], "svd", PASSES["svd"].factorize(layers["fc0"], plan.layers["fc0"].config))
    w1 = matrix_from_factors(layers["fc1"], "tt", PASSES["tt"].factorize(layers["fc1"], plan.layers["fc1"].config))
    inits = inits_of(original)
    h = np.maximum(x.astype(np.float64) @ w0 + inits["b0"], 0)
    h = np.maximum(h @ w1 + inits["b1"], 0)
    y = h @ inits["W2"].T.astype(np.float64) + inits["b2"]
    assert rel_err(run(out, x), y) <= FP32_TOL


# ----------------------------------------------------------- symbolic dims other than the batch

def discover_at(model, shape):
    with tempfile.TemporaryDirectory() as folder:
        loaded = load(graphs.save(model, Path(folder) / "m.onnx"), {"X": shape})
    return loaded, find_layers(loaded).layers[0]


@pytest.mark.parametrize("method", ["svd", "tt"])
def test_matmul_with_symbolic_sequence_runs_at_any_length(method):
    """Discovered at [2, 5, K]; the output keeps [N, S, K] and is exact at other S."""
    original = graphs.matmul(24, 16, ("N", "S"), bias=True)
    loaded, layer = discover_at(original, (2, 5, 24))
    out, _ = rewrite(loaded, layer, method, full_config(layer, method))
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].SerializeToString() == original.graph.input[0].SerializeToString()
    for shape in ((1, 1, 24), (3, 17, 24)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        assert rel_err(run(out, x), run(original, x)) <= FP32_TOL


@pytest.mark.parametrize("method", ["conv_svd", "conv_tt"])
@pytest.mark.parametrize("pad", [{"pads": (1, 0, 1, 2)}, {"auto_pad": "VALID"}, {"auto_pad": "SAME_UPPER"}],
                         ids=["pads", "VALID", "SAME_UPPER"])
def test_conv_with_symbolic_spatial_dims_runs_at_the_discovery_size(method, pad):
    original = graphs.conv(8, 16, spatial=("H", "W"), strides=(2, 2), **pad)
    loaded, layer = discover_at(original, (1, 8, 10, 10))
    out, _ = rewrite(loaded, layer, method, full_config(layer, method))
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 8, 10, 10)).astype(np.float32)
    assert rel_err(run(out, x), run(original, x)) <= FP32_TOL


@pytest.mark.parametrize("method", ["conv_svd", "conv_tt"])
@pytest.mark.parametrize("pad", [{"pads": (1, 0, 1, 2)}, {"auto_pad": "VALID"}, {"auto_pad": "SAME_UPPER"},
                                 {"auto_pad": "SAME_LOWER"}], ids=["pads", "VALID", "SAME_UPPER", "SAME_LOWER"])
def test_conv_with_symbolic_spatial_dims_runs_at_other_sizes(method, pad):
    """CLI.md: the output keeps the original's symbolic dims, so it must compute the same at
    any H, W. With auto_pad SAME and stride 2 the pads depend on the size: the rewrite bakes
    the pads of the discovery size (10: begin 0, end 1) into the chain, which is wrong at 11
    (SAME needs 1 and 1): the output is 5x5 where the original's is 6x6."""
    original = graphs.conv(8, 16, spatial=("H", "W"), strides=(2, 2), **pad)
    loaded, layer = discover_at(original, (1, 8, 10, 10))
    out, _ = rewrite(loaded, layer, method, full_config(layer, method))
    x = np.random.default_rng(0).standard_normal((2, 8, 11, 11)).astype(np.float32)
    expected = run(original, x)
    got = run(out, x)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= FP32_TOL


# ------------------------------------------------------------------ data-aware SVD (stats given)

@PROPERTY
@given(st.data())
def test_data_aware_svd_error_is_exact(data):
    """For plain, scaled and whitened SVD (svd and conv_svd): the decomposition's relative_error(r)
    is the output error ||X (W - W_r)|| / ||X W|| measured here on the calibration rows X, and the
    whitened truncation reaches the optimum for that error (the tail of the SVD of X W)."""
    method = data.draw(st.sampled_from(["svd", "conv_svd"]))
    seed = data.draw(st.integers(0, 1000))
    if method == "svd":
        _, layer = discover(graphs.matmul(data.draw(st.integers(2, 16)), data.draw(st.integers(2, 16)), seed=seed))
        w = layer.weight.astype(np.float64)
    else:
        _, layer = discover(graphs.conv(data.draw(st.integers(1, 4)), data.draw(st.integers(2, 10)),
                                        (data.draw(st.integers(1, 3)),) * 2, (6, 6), seed=seed))
        w = layer.weight.astype(np.float64).reshape(layer.weight.shape[0], -1).T
    module = PASSES[method]
    if module.applies(layer) is not None:
        return
    k = w.shape[0]
    r = np.random.default_rng(seed)
    x = r.standard_normal((k + data.draw(st.integers(3, 40)), k)) @ r.standard_normal((k, k)) * r.uniform(0.1, 3, k)
    stats = LayerStats(x.T @ x, x.sum(0), np.abs(x).sum(0), len(x))
    mode = data.draw(st.sampled_from(["plain", "scaled", "whitened"]))
    d = module.decompose(layer, stats, None, mode)
    rank = data.draw(st.integers(1, module.full_rank(layer)))
    factors = module.factorize(layer, {"rank": rank}, stats, d, mode)
    approx = matrix_from_factors(layer, method, factors)
    approx = approx if method == "svd" else approx.reshape(approx.shape[0], -1).T
    reference_norm = np.linalg.norm(x @ w)
    measured = np.linalg.norm(x @ (w - approx)) / reference_norm
    assert d.relative_error(rank) == pytest.approx(measured, abs=1e-4)
    if mode == "whitened":
        assert measured == pytest.approx(math.sqrt(tail(x @ w, rank)) / reference_norm, rel=1e-3, abs=1e-4)
    for a, b in zip(factors, module.factorize(layer, {"rank": rank}, stats, None, mode)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


# -------------------------------------------------------------------------- the model's opset

@pytest.mark.parametrize("opset", [9, 11, 13, 17])
@pytest.mark.parametrize("method", LAYER_PASSES)
def test_rewrite_is_valid_in_the_models_opset(method, opset):
    """The rewrite keeps the model's opset, so its nodes must exist in that opset. FAILS for tt
    at opset 9 on a 3-D activation: the chain's Slice takes starts/ends as inputs (Slice-10),
    which Slice-1 (opsets 1..9) does not."""
    original = graphs.conv() if method.startswith("conv") else graphs.matmul(24, 16, ("N", 3), bias=True)
    original.opset_import[0].version = opset
    onnx.checker.check_model(original, full_check=True)
    loaded, layer = discover(original)
    out, _ = rewrite(loaded, layer, method, full_config(layer, method))
    assert out.opset_import[0].version == opset
    check_valid(original, out)
    x = random_input(original, 4)
    assert rel_err(run(out, x), run(original, x)) <= FP32_TOL
