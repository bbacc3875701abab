"""Fuzzed rewrites: hypothesis builds hundreds of graphs per pass (dims up to 64 including
primes, 2-4 leading dims, fp32 and fp16, op attributes, opsets 11-21); at full rank every
rewrite must pass the checker, run, and reproduce the original outputs."""
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from denseflex_onnx.layers import find_layers
from denseflex_onnx.model import LoadedModel, infer_shapes
from denseflex_onnx.passes import PASSES
from denseflex_onnx.plan import Choice, Plan
from denseflex_onnx.rewrite import rewrite_model

EXAMPLES = 500
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BOUND = {np.float32: 1e-5, np.float16: 5e-3}
dims = st.sampled_from([2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 16, 17, 24, 31, 32, 37, 48, 61, 64])
dtypes = st.sampled_from([np.float32, np.float16])
opsets = st.integers(11, 21)


def loaded(model: onnx.ModelProto, shapes: dict) -> LoadedModel:
    data = model.SerializeToString()
    return LoadedModel(path=None, proto=model, sha256=hashlib.sha256(data).hexdigest(), input_shapes=shapes,
                       shapes=infer_shapes(model, shapes))


def full_rank_config(method, layer):
    module = PASSES[method]
    if method in ("svd", "conv_svd"):
        return {"rank": module.full_rank(layer)}
    if method == "conv_tt":
        return {"ranks": list(module.max_ranks(layer))}
    ins, outs = layer.config_modes
    return {"in_modes": list(ins), "out_modes": list(outs), "ranks": module.max_bonds(ins, outs)}


def check_full_rank(method, model, shapes, feeds, dtype, tt_modes=None):
    lm = loaded(model, shapes)
    found = find_layers(lm)
    assert len(found.layers) == 1, found.skipped
    layer = found.layers[0]
    assert PASSES[method].applies(layer) is None
    if tt_modes is not None:
        layer.config_modes = tt_modes
    config = full_rank_config(method, layer)
    out = rewrite_model(model, {layer.name: layer}, Plan({layer.name: Choice(method, config)}))
    onnx.checker.check_model(out, full_check=True)
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0].astype(np.float64)
    got = ort.InferenceSession(out.SerializeToString()).run(None, feeds)[0].astype(np.float64)
    assert got.shape == want.shape
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
    assert err <= BOUND[dtype], f"{method} relative error {err:.3g}"


def matmul_model(k, n, lead, dtype, bias, opset, rng):
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)
    ttype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names = [f"d{i}" for i in range(len(lead))]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H" if bias else "Y"], name="mm")]
    inits = [numpy_helper.from_array(w, "W")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(dtype), "b"))
        nodes.append(helper.make_node("Add", ["H", "b"], ["Y"]))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("X", ttype, [*names, k])],
                              [helper.make_tensor_value_info("Y", ttype, [*names, n])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def gemm_model(k, n, batch, dtype, trans_a, trans_b, alpha, beta, bias, opset, rng):
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)).astype(dtype)
    ttype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits, inputs = [numpy_helper.from_array(w, "W")], ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(dtype), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["Y"], name="fc", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    graph = helper.make_graph([node], "fuzz", [helper.make_tensor_value_info("X", ttype, [k, "N"] if trans_a else ["N", k])],
                              [helper.make_tensor_value_info("Y", ttype, ["N", n])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


def conv_model(cin, cout, kernel, spatial, strides, dilations, pads, dtype, bias, opset, rng):
    w = (rng.standard_normal((cout, cin, *kernel)) / np.sqrt(cin * np.prod(kernel))).astype(dtype)
    ttype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits, inputs = [numpy_helper.from_array(w, "W")], ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(dtype), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], name="conv", kernel_shape=list(kernel), strides=list(strides),
                            dilations=list(dilations), pads=list(pads))
    nd = len(kernel)
    graph = helper.make_graph([node], "fuzz", [helper.make_tensor_value_info("X", ttype, ["N", cin, *spatial])],
                              [helper.make_tensor_value_info("Y", ttype, ["N", cout] + [f"o{i}" for i in range(nd)])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    return m


@st.composite
def matmul_case(draw, for_tt=False):
    from denseflex_onnx.passes.tt import factorizations
    k, n = draw(dims), draw(dims)
    if for_tt:
        d = draw(st.integers(2, 4))
        ins, outs = factorizations(k, d), factorizations(n, d)
        if not ins or not outs:
            d = 2
            k, n = draw(st.sampled_from([4, 6, 8, 12, 16, 24, 32, 48, 64])), draw(st.sampled_from([4, 6, 9, 10, 16, 32]))
            ins, outs = factorizations(k, d), factorizations(n, d)
        modes = (draw(st.sampled_from(ins)), draw(st.sampled_from(outs)))
    else:
        modes = None
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))     # 2-4 dims in all
    return k, n, lead, draw(dtypes), draw(st.booleans()), draw(opsets), draw(st.integers(0, 2**31)), modes


@pytest.mark.parametrize("method", ["svd", "tt"])
def test_fuzz_matmul(method):
    @FUZZ
    @given(case=matmul_case(for_tt=method == "tt"))
    def run(case):
        k, n, lead, dtype, bias, opset, seed, modes = case
        rng = np.random.default_rng(seed)
        model = matmul_model(k, n, lead, dtype, bias, opset, rng)
        shapes = {"X": (*lead, k)}
        feeds = {"X": rng.standard_normal((*[l + 1 for l in lead], k)).astype(dtype)}   # other sizes at run time
        check_full_rank(method, model, shapes, feeds, dtype, modes)
    run()


@FUZZ
@given(k=dims, n=dims, batch=st.integers(1, 5), dtype=dtypes, trans_a=st.integers(0, 1), trans_b=st.integers(0, 1),
       alpha=st.sampled_from([1.0, 0.5, 2.0]), beta=st.sampled_from([1.0, 0.25]), bias=st.booleans(), opset=opsets,
       seed=st.integers(0, 2**31))
def test_fuzz_gemm_svd(k, n, batch, dtype, trans_a, trans_b, alpha, beta, bias, opset, seed):
    rng = np.random.default_rng(seed)
    model = gemm_model(k, n, batch, dtype, trans_a, trans_b, alpha, beta, bias, opset, rng)
    shape = (k, batch) if trans_a else (batch, k)
    check_full_rank("svd", model, {"X": shape}, {"X": rng.standard_normal(shape).astype(dtype)}, dtype)


@st.composite
def conv_case(draw):
    nd = draw(st.integers(1, 2))
    kernel = draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=nd, max_size=nd))
    strides = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    dilations = draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd))
    pads = draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    spatial = [draw(st.integers(d * (k - 1) + 1, 12)) for k, d in zip(kernel, dilations)]
    cin = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 16]))
    cout = draw(st.sampled_from([2, 3, 7, 8, 16, 17]))
    return cin, cout, kernel, spatial, strides, dilations, pads, draw(dtypes), draw(st.booleans()), draw(opsets), \
        draw(st.integers(0, 2**31))


@pytest.mark.parametrize("method", ["conv_svd", "conv_tt"])
def test_fuzz_conv(method):
    @FUZZ
    @given(case=conv_case())
    def run(case):
        cin, cout, kernel, spatial, strides, dilations, pads, dtype, bias, opset, seed = case
        if method == "conv_tt" and int(np.prod(kernel)) == 1:
            kernel = [3] * len(kernel)
            spatial = [max(s, 2 * d + 1) for s, d in zip(spatial, dilations)]
        if method == "conv_svd" and cin * int(np.prod(kernel)) < 2:
            cin = 2             # a 1x1 conv of one channel has rank 1: nothing to factorize
        rng = np.random.default_rng(seed)
        model = conv_model(cin, cout, kernel, spatial, strides, dilations, pads, dtype, bias, opset, rng)
        shape = (2, cin, *spatial)
        check_full_rank(method, model, {"X": shape}, {"X": rng.standard_normal(shape).astype(dtype)}, dtype)
    run()
