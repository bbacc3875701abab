"""Discovery (layers.py) on small real ONNX graphs: weight views, shapes, skip reasons, FLOPs and params.

Every weight view is checked two ways: against numpy (the formula of the op) and against
onnxruntime running the real graph (x @ weight + bias must reproduce the node's output).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

import graphs
import graphs_extra as gx
from denseflex_onnx import layers as L
from denseflex_onnx import loading


def discover(m: onnx.ModelProto, tmp_path, shapes=None):
    path = graphs.save(m, tmp_path / "m.onnx")
    loaded = loading.load(path, shapes)
    return loaded, L.find_layers(loaded)


def only_layer(found) -> L.Layer:
    assert len(found.layers) == 1, (found.layers, found.skipped)
    return found.layers[0]


def init_array(m: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name == name)


def layer_output(layer: L.Layer, x: np.ndarray) -> np.ndarray:
    """What the layer computes by its record (the contract of the Layer docstring)."""
    if layer.side == "left":
        return layer.weight @ x
    a = x.T if layer.attrs.get("transA") else x
    y = a.astype(np.float64) @ layer.weight.astype(np.float64)
    return y if layer.bias is None else y + layer.bias


# ------------------------------------------------------------------------------------------- Gemm

GEMM_BATCH = 3


@pytest.mark.parametrize("bias", ["vector", "row", "scalar", None])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_weight_view_every_attribute_combination(tmp_path, trans_a, trans_b, alpha, beta, bias):
    k, n = 12, 10
    m = graphs.gemm(k, n, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    x_shape = (k, GEMM_BATCH) if trans_a else (GEMM_BATCH, k)
    loaded, found = discover(m, tmp_path, {"X": x_shape})
    layer = only_layer(found)

    b = init_array(m, "W")
    expected_w = alpha * (b.T if trans_b else b)
    assert layer.op == "Gemm" and layer.side == "right"
    assert layer.weight.shape == (k, n)
    np.testing.assert_allclose(layer.weight, expected_w, rtol=1e-6)
    if bias is None:
        assert layer.bias is None
    else:
        c = init_array(m, "C")
        # a scalar C stays one element (the rewrite's Add broadcasts it); a vector is [N]
        assert layer.bias.shape == ((1,) if c.size == 1 else (n,))
        np.testing.assert_allclose(layer.bias, beta * c.reshape(-1), rtol=1e-6)
    assert layer.input == "X" and layer.output == "Y" and layer.node_outputs == ("Y",)
    assert layer.activation_shape == x_shape
    assert layer.output_shape == (GEMM_BATCH, n)
    assert layer.rows == GEMM_BATCH
    assert layer.matrix_shape == (k, n)
    assert layer.params == k * n + (init_array(m, "C").size if bias is not None else 0)
    assert layer.flops == 2 * GEMM_BATCH * k * n

    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    (y,) = gx.run(m, {"X": x})
    np.testing.assert_allclose(layer_output(layer, x), y, rtol=1e-4, atol=1e-4)


def test_gemm_fp16(tmp_path):
    m = graphs.gemm(16, 8, trans_b=1, alpha=0.5, dtype=np.float16)
    _, found = discover(m, tmp_path, {"X": (2, 16)})
    layer = only_layer(found)
    assert layer.weight.dtype == np.float16 and layer.bias.dtype == np.float16
    assert layer.dtype == np.float16
    np.testing.assert_allclose(layer.weight, (0.5 * init_array(m, "W").T).astype(np.float16))
    assert layer.weight.shape == (16, 8)


def test_gemm_with_runtime_bias_is_skipped_with_reason(tmp_path):
    node = helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="fc")
    m = graphs.model([node], [graphs.value("X", ["N", 12]), graphs.value("C", [10])],
                     [graphs.value("Y", ["N", 10])], [graphs.init("W", np.ones((12, 10), np.float32))])
    _, found = discover(m, tmp_path)
    assert not found.layers
    (s,) = found.skipped
    assert (s.name, s.op) == ("fc", "Gemm") and "bias" in s.reason


# ----------------------------------------------------------------------------------------- MatMul

@pytest.mark.parametrize("lead,shape", [(("N",), {"X": (5, 12)}), (("N", "S"), {"X": (2, 7, 12)})])
def test_matmul_2d_and_3d(tmp_path, lead, shape):
    m = graphs.matmul(12, 10, lead=lead)
    _, found = discover(m, tmp_path, shape)
    layer = only_layer(found)
    act = shape["X"]
    rows = math.prod(act[:-1])
    assert (layer.op, layer.side, layer.name) == ("MatMul", "right", "mm")
    assert layer.activation_shape == act and layer.output_shape == (*act[:-1], 10)
    assert layer.bias is None and layer.node_outputs == ("Y",)
    np.testing.assert_array_equal(layer.weight, init_array(m, "W"))
    assert layer.rows == rows and layer.flops == 2 * rows * 12 * 10 and layer.params == 120
    x = np.random.default_rng(2).standard_normal(act).astype(np.float32)
    np.testing.assert_allclose(layer_output(layer, x), gx.run(m, {"X": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("other", ["vector", "row", "left"])
def test_matmul_add_fused_into_one_layer_with_bias(tmp_path, other):
    m = gx.matmul_add(12, 10, lead=("N", "S"), other=other)
    _, found = discover(m, tmp_path, {"X": (2, 3, 12)})
    layer = only_layer(found)
    assert layer.name == "mm" and layer.output == "Y" and layer.node_outputs == ("H", "Y")
    np.testing.assert_allclose(layer.bias, init_array(m, "b").reshape(-1))
    assert layer.params == 12 * 10 + 10
    assert layer.flops == 2 * 6 * 12 * 10
    x = np.random.default_rng(3).standard_normal((2, 3, 12)).astype(np.float32)
    np.testing.assert_allclose(layer_output(layer, x), gx.run(m, {"X": x}, ["Y"])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("other,readers", [("input", 1), ("matrix", 1), ("vector", 2)])
def test_matmul_add_not_fused(tmp_path, other, readers):
    """Add of a run-time tensor, of a constant that is not an [N] vector, or H read twice: no fusion."""
    m = gx.matmul_add(12, 10, lead=("N", 3), other=other, readers=readers)
    _, found = discover(m, tmp_path, {"X": (2, 3, 12)} | ({"b": (2, 3, 10)} if other == "input" else {}))
    layer = only_layer(found)
    assert layer.bias is None
    assert layer.output == "H" and layer.node_outputs == ("H",)
    assert layer.params == 120


def test_matmul_then_scalar_add_does_not_crash(tmp_path):
    """N = 1 and a 0-d constant: it has N elements, so the Add is fused as the layer's bias [1];
    discovery does not raise, and a full-rank rewrite of the fused pair is exact."""
    from denseflex_onnx.passes import PASSES
    from denseflex_onnx.plan import Choice, Plan
    from denseflex_onnx.rewrite import rewrite_model

    m = gx.matmul_scalar_add(12)
    loaded, found = discover(m, tmp_path, {"X": (4, 12)})
    layer = only_layer(found)
    assert found.skipped == []
    assert (layer.name, layer.op, layer.side) == ("mm", "MatMul", "right")
    assert layer.input == "X" and layer.output == "Y" and layer.node_outputs == ("H", "Y")   # the Add fused
    assert layer.weight.dtype == np.float32
    np.testing.assert_array_equal(layer.weight, init_array(m, "W"))                         # [12, 1]
    assert layer.bias is not None and layer.bias.shape == (1,) and layer.bias.dtype == np.float32
    np.testing.assert_array_equal(layer.bias, np.reshape(init_array(m, "b"), (1,)))          # 0.5
    assert layer.activation_shape == (4, 12) and layer.output_shape == (4, 1)
    assert layer.params == 12 * 1 + 1 and layer.flops == 2 * 4 * 12 * 1
    assert found.total_params == 13 and found.total_flops == 96
    # the record computes the fused pair: by numpy from the initializers and by onnxruntime
    x = np.random.default_rng(4).standard_normal((4, 12)).astype(np.float32)
    by_numpy = x.astype(np.float64) @ init_array(m, "W").astype(np.float64) + 0.5
    (want,) = gx.run(m, {"X": x}, [layer.output])
    np.testing.assert_allclose(want, by_numpy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer_output(layer, x), want, rtol=1e-5, atol=1e-5)
    # K x 1 has nothing to factorize, but the svd chain at its full rank (1) must still be exact,
    # bias and all, against onnxruntime on the original graph
    assert "dimension of 1" in (PASSES["svd"].applies(layer) or "")
    choice = Choice("svd", {"rank": PASSES["svd"].full_rank(layer)})
    assert choice.config == {"rank": 1}
    factors = PASSES["svd"].factorize(layer, choice.config)
    assert [f.shape for f in factors] == [(12, 1), (1, 1)]
    out = rewrite_model(loaded.proto, {layer.name: layer}, Plan({layer.name: choice}), {layer.name: factors})
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops == ["MatMul", "MatMul", "Add"], ops            # the old MatMul and Add are gone
    assert [o.name for o in out.graph.output] == ["Y"]
    for batch in (1, 4, 33):
        xb = np.random.default_rng(batch).standard_normal((batch, 12)).astype(np.float32)
        (got,) = gx.run(out, {"X": xb})
        (ref,) = gx.run(m, {"X": xb})
        assert got.shape == ref.shape == (batch, 1) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("via", ["Constant", "Identity", "Cast", "Transpose"])
def test_weight_through_pass_through_nodes_is_folded(tmp_path, via):
    k, n = 12, 10
    m = graphs.matmul(k, n, weight_via=via)
    _, found = discover(m, tmp_path, {"X": (k, k)})
    layer = only_layer(found)
    assert layer.weight.shape == (k, n) and layer.weight.dtype == np.float32
    # the value the MatMul really multiplies by: run the graph on the identity matrix
    (folded,) = gx.run(m, {"X": np.eye(k, dtype=np.float32)})
    np.testing.assert_array_equal(layer.weight, folded)
    # and by numpy from the stored tensor
    expected = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    if via == "Cast":
        expected = expected.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(layer.weight, expected)


def test_matmul_fp16(tmp_path):
    m = graphs.matmul(16, 8, lead=("N", "S"), bias=True, dtype=np.float16)
    _, found = discover(m, tmp_path, {"X": (1, 4, 16)})
    layer = only_layer(found)
    assert layer.dtype == np.float16 and layer.bias is not None and layer.bias.dtype == np.float16
    assert layer.node_outputs == ("H", "Y")


def test_left_constant_matmul(tmp_path):
    m = graphs.matmul_left(10, 12, 7, lead=("N",))
    _, found = discover(m, tmp_path, {"X": (3, 12, 7)})
    layer = only_layer(found)
    assert (layer.name, layer.op, layer.side) == ("mm_left", "MatMul", "left")
    assert layer.weight.shape == (10, 12)
    np.testing.assert_array_equal(layer.weight, init_array(m, "W"))
    assert layer.input == "X" and layer.activation_shape == (3, 12, 7) and layer.output_shape == (3, 10, 7)
    assert layer.matrix_shape == (12, 10) and layer.rows == 3 * 7
    assert layer.flops == 2 * 3 * 7 * 12 * 10 and layer.params == 120
    x = np.random.default_rng(5).standard_normal((3, 12, 7)).astype(np.float32)
    np.testing.assert_allclose(layer_output(layer, x), gx.run(m, {"X": x})[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- Conv

CONV_CASES = {
    "1d": dict(cin=4, cout=6, kernel=(3,), spatial=(11,)),
    "1d-stride-pad-dil": dict(cin=4, cout=6, kernel=(3,), spatial=(20,), strides=(2,), pads=(1, 2), dilations=(2,)),
    "2d": dict(cin=3, cout=5, kernel=(3, 3), spatial=(9, 9)),
    "2d-stride-pad-dil": dict(cin=3, cout=5, kernel=(3, 2), spatial=(13, 11), strides=(2, 3), pads=(1, 0, 2, 1),
                              dilations=(2, 1)),
    "2d-same-upper": dict(cin=3, cout=4, kernel=(4, 3), spatial=(10, 9), strides=(3, 2), auto_pad="SAME_UPPER"),
    "2d-same-lower": dict(cin=3, cout=4, kernel=(4, 3), spatial=(10, 9), strides=(3, 2), auto_pad="SAME_LOWER"),
    "2d-valid-dilated": dict(cin=2, cout=3, kernel=(2, 2), spatial=(8, 7), dilations=(2, 3), auto_pad="VALID"),
    "1d-same-lower": dict(cin=2, cout=3, kernel=(4,), spatial=(9,), strides=(2,), auto_pad="SAME_LOWER"),
    "2d-valid": dict(cin=3, cout=4, kernel=(3, 3), spatial=(10, 9), strides=(2, 2), auto_pad="VALID"),
    "2d-no-bias": dict(cin=3, cout=4, kernel=(1, 1), spatial=(5, 5), bias=False),
}


def spec_pads(size, kernel, stride, dilation, mode):
    """ONNX spec for SAME_*: output = ceil(in / stride); the odd extra pad goes at the end (UPPER)."""
    span = dilation * (kernel - 1) + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return (total // 2, total - total // 2) if mode == "SAME_UPPER" else (total - total // 2, total // 2)


def explicit_conv(m: onnx.ModelProto, layer: L.Layer) -> onnx.ModelProto:
    """The same Conv with the layer's explicit strides/pads/dilations and no auto_pad."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    node = m2.graph.node[0]
    keep = [a for a in node.attribute if a.name in ("kernel_shape", "group")]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.extend([helper.make_attribute("strides", layer.attrs["strides"]),
                           helper.make_attribute("pads", layer.attrs["pads"]),
                           helper.make_attribute("dilations", layer.attrs["dilations"])])
    return m2


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_attrs_shapes_and_flops(tmp_path, case):
    kw = CONV_CASES[case]
    batch = 2
    m = graphs.conv(**kw)
    x_shape = (batch, kw["cin"], *kw["spatial"])
    _, found = discover(m, tmp_path, {"X": x_shape})
    layer = only_layer(found)
    nd = len(kw["kernel"])
    assert (layer.op, layer.name) == ("Conv", "conv")
    np.testing.assert_array_equal(layer.weight, init_array(m, "W"))
    assert layer.weight.shape == (kw["cout"], kw["cin"], *kw["kernel"])
    assert (layer.bias is None) == (kw.get("bias") is False)
    assert list(layer.attrs["strides"]) == list(kw.get("strides") or [1] * nd)
    assert list(layer.attrs["dilations"]) == list(kw.get("dilations") or [1] * nd)
    mode = kw.get("auto_pad")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [spec_pads(kw["spatial"][i], kw["kernel"][i], (kw.get("strides") or [1] * nd)[i],
                           (kw.get("dilations") or [1] * nd)[i], mode) for i in range(nd)]
        assert list(layer.attrs["pads"]) == [p[0] for p in pairs] + [p[1] for p in pairs]
    elif mode == "VALID":
        assert list(layer.attrs["pads"]) == [0] * 2 * nd
    else:
        assert list(layer.attrs["pads"]) == list(kw.get("pads") or [0] * 2 * nd)

    x = np.random.default_rng(6).standard_normal(x_shape).astype(np.float32)
    (y,) = gx.run(m, {"X": x})
    assert layer.output_shape == y.shape        # onnxruntime's actual output shape
    assert layer.activation_shape == x_shape
    # the explicit attributes compute exactly what the original node computes
    (y2,) = gx.run(explicit_conv(m, layer), {"X": x})
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)
    # FLOPs: 2 x N x Cout x prod(out spatial) x Cin x prod(kernel); params: weight + bias
    assert layer.flops == 2 * batch * kw["cout"] * math.prod(y.shape[2:]) * kw["cin"] * math.prod(kw["kernel"])
    assert layer.params == layer.weight.size + (kw["cout"] if layer.bias is not None else 0)


def test_conv_flops_by_hand(tmp_path):
    """Conv 3->8, 3x3, stride 2, pad 1 on 1x3x32x32: out 16x16; 2*1*8*16*16*3*3*3 FLOPs."""
    m = graphs.conv(cin=3, cout=8, kernel=(3, 3), spatial=(32, 32), strides=(2, 2), pads=(1, 1, 1, 1))
    _, found = discover(m, tmp_path, {"X": (1, 3, 32, 32)})
    layer = only_layer(found)
    assert layer.output_shape == (1, 8, 16, 16)
    assert layer.flops == 2 * 1 * 8 * 16 * 16 * 3 * 3 * 3 == 110592
    assert layer.params == 8 * 3 * 9 + 8
    assert found.total_flops == layer.flops and found.total_params == layer.params
    assert layer.flops_share == 1.0 and layer.params_share == 1.0


def test_conv_fp16(tmp_path):
    m = graphs.conv(cin=2, cout=3, kernel=(3, 3), spatial=(6, 6), dtype=np.float16)
    _, found = discover(m, tmp_path, {"X": (1, 2, 6, 6)})
    assert only_layer(found).dtype == np.float16


# ------------------------------------------------------------------------------------ skip reasons

@pytest.mark.parametrize("cin,cout,group", [(4, 8, 2), (6, 6, 6)], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_conv_skipped(tmp_path, cin, cout, group):
    m = graphs.conv(cin=cin, cout=cout, group=group, spatial=(8, 8))
    _, found = discover(m, tmp_path, {"X": (1, cin, 8, 8)})
    assert not found.layers
    (s,) = found.skipped
    assert (s.name, s.op) == ("conv", "Conv") and "group" in s.reason
    # its FLOPs still count in the model total: 2 x N x Cout x 6 x 6 x (Cin/group) x 9
    assert found.total_flops == 2 * cout * 6 * 6 * (cin // group) * 9


def test_3d_conv_skipped(tmp_path):
    m = graphs.conv(cin=2, cout=3, kernel=(3, 3, 3), spatial=(5, 5, 5))
    _, found = discover(m, tmp_path, {"X": (1, 2, 5, 5, 5)})
    assert not found.layers
    (s,) = found.skipped
    assert s.op == "Conv" and "3-D" in s.reason


def test_matmul_of_two_inputs_skipped(tmp_path):
    _, found = discover(gx.two_input_matmul(), tmp_path, {"A": (1, 6, 8), "B": (1, 8, 5)})
    assert not found.layers
    (s,) = found.skipped
    assert (s.name, s.op) == ("attn", "MatMul") and "run time" in s.reason


def test_gemm_with_input_weight_skipped(tmp_path):
    _, found = discover(gx.gemm_runtime_weight(), tmp_path, {"X": (2, 12)})
    assert not found.layers
    (s,) = found.skipped
    assert (s.name, s.op) == ("fc", "Gemm") and "run time" in s.reason


@pytest.mark.parametrize("via_identity", [False, True])
def test_weight_shared_by_two_nodes_skipped(tmp_path, via_identity):
    _, found = discover(gx.shared_weight(via_identity=via_identity), tmp_path, {"X": (2, 12)})
    assert not found.layers
    assert sorted(s.name for s in found.skipped) == ["mm1", "mm2"]
    assert all("shared" in s.reason for s in found.skipped)


def test_weights_inside_if_body_are_layers_named_by_their_subgraph_path(tmp_path):
    _, found = discover(gx.if_model(), tmp_path, {"X": (2, 12)})
    by_name = {l.name: l for l in found.layers}
    assert set(by_name) == {"ifnode/then_branch/mm_then", "ifnode/else_branch/mm_else"}
    assert by_name["ifnode/then_branch/mm_then"].scope == (("Y", "then_branch"),)
    assert by_name["ifnode/else_branch/mm_else"].scope == (("Y", "else_branch"),)
    for layer in by_name.values():
        assert layer.op == "MatMul" and layer.weight.shape == (12, 10) and layer.activation_shape == (2, 12)


def test_weights_inside_loop_and_nested_if_bodies(tmp_path):
    _, found = discover(gx.loop_model(), tmp_path, {"X": (2, 12)})
    assert [(l.name, l.op, l.scope) for l in found.layers] == [("loop/body/mm_body", "MatMul", (("Ys", "body"),))]
    _, found = discover(gx.nested_if_model(), tmp_path, {"X": (2, 12), "Z": (2, 10)})
    assert [l.name for l in found.layers] == ["outer/then_branch/inner/then_branch/mm_deep"]
    assert len(found.layers[0].scope) == 2


def test_weight_shared_with_an_if_body_is_not_a_layer(tmp_path):
    """W is read by mm_main and, from the outer scope, by a MatMul in the If body: shared."""
    _, found = discover(gx.if_model(main_reads_w=True), tmp_path, {"X": (2, 12)})
    assert [l.name for l in found.layers] == ["ifnode/else_branch/mm_else"]     # V is its own
    shared = {s.name: s.reason for s in found.skipped}
    assert set(shared) == {"mm_main", "ifnode/then_branch/mm_then"}
    assert all("shared" in reason for reason in shared.values())


def test_dequantized_weight_into_gemm_skipped_as_quantized(tmp_path):
    _, found = discover(gx.dequantized("Gemm"), tmp_path, {"X": (2, 12)})
    assert not found.layers
    (s,) = found.skipped
    assert s.op == "Gemm" and "quantized" in s.reason.lower()


def test_dequantized_weight_into_matmul_skipped_as_quantized(tmp_path):
    _, found = discover(gx.dequantized("MatMul"), tmp_path, {"X": (2, 12)})
    assert not found.layers
    (s,) = found.skipped
    assert s.op == "MatMul"
    assert "quantized" in s.reason.lower(), s.reason


@pytest.mark.parametrize("build,shape,op", [(gx.matmul_integer, {"X": (2, 12)}, "MatMulInteger"),
                                            (gx.conv_integer, {"X": (1, 3, 8, 8)}, "ConvInteger")])
def test_integer_ops_skipped_as_quantized(tmp_path, build, shape, op):
    _, found = discover(build(), tmp_path, shape)
    assert not found.layers
    (s,) = found.skipped
    assert s.op == op and "quantized" in s.reason.lower()


def test_nothing_to_factorize(tmp_path):
    _, found = discover(gx.relu_only(), tmp_path, {"X": (1, 8)})
    assert found.layers == [] and found.skipped == [] and found.total_flops == 0


# ------------------------------------------------------------------------------ FLOPs, params, shares

def test_gemm_flops_and_params_by_hand(tmp_path):
    _, found = discover(graphs.gemm(12, 10, trans_b=1), tmp_path, {"X": (3, 12)})
    layer = only_layer(found)
    assert layer.flops == 2 * 3 * 12 * 10 == 720
    assert layer.params == 120 + 10
    assert found.total_flops == 720 and found.total_params == 130
    assert layer.params_share == 1.0 and layer.flops_share == 1.0


def test_mlp_shares_sum_to_one(tmp_path):
    sizes = (20, 32, 24, 5)
    _, found = discover(gx.mlp(sizes), tmp_path, {"X": (4, 20)})
    assert [l.name for l in found.layers] == ["fc0", "fc1", "fc2"]
    pairs = list(zip(sizes[:-1], sizes[1:]))
    assert [l.weight.shape for l in found.layers] == pairs
    assert [l.params for l in found.layers] == [k * n + n for k, n in pairs]
    assert [l.flops for l in found.layers] == [2 * 4 * k * n for k, n in pairs]
    assert found.total_params == sum(k * n + n for k, n in pairs)
    assert found.total_flops == sum(2 * 4 * k * n for k, n in pairs)
    assert sum(l.params_share for l in found.layers) == pytest.approx(1.0)
    assert sum(l.flops_share for l in found.layers) == pytest.approx(1.0)
    for l in found.layers:
        assert l.params_share == pytest.approx(l.params / found.total_params)
        assert l.flops_share == pytest.approx(l.flops / found.total_flops)


def test_totals_include_non_layer_matmuls(tmp_path):
    _, found = discover(gx.layer_and_attention(12, 10, 6, 5), tmp_path,
                        {"X": (3, 12), "A": (3, 6, 12), "B": (3, 12, 5)})
    layer = only_layer(found)
    (s,) = found.skipped
    assert s.name == "attn"
    attn = 2 * 3 * 6 * 5 * 12
    assert layer.flops == 2 * 3 * 12 * 10
    assert found.total_flops == layer.flops + attn
    assert layer.flops_share == pytest.approx(layer.flops / (layer.flops + attn))
    assert found.total_params == 130 and layer.params_share == 1.0


def test_params_shares_never_exceed_one_with_a_scalar_bias(tmp_path):
    """Gemm with a scalar C: the model stores 120 + 1 numbers; a layer cannot hold more than all of them."""
    _, found = discover(graphs.gemm(12, 10, bias="scalar"), tmp_path, {"X": (3, 12)})
    layer = only_layer(found)
    assert found.total_params == 121
    assert layer.params_share <= 1.0, (layer.params, found.total_params)
    assert sum(l.params_share for l in found.layers) == pytest.approx(1.0)


def test_layer_names_unique_and_default_to_output(tmp_path):
    w = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"], name="fc"),
             helper.make_node("MatMul", ["H", "W2"], ["G"], name="fc"),
             helper.make_node("MatMul", ["G", "W3"], ["Y"])]
    m = graphs.model(nodes, [graphs.value("X", ["N", 4])], [graphs.value("Y", ["N", 4])],
                     [graphs.init("W1", w), graphs.init("W2", w), graphs.init("W3", w)])
    _, found = discover(m, tmp_path, {"X": (1, 4)})
    names = [l.name for l in found.layers]
    assert len(names) == 3 and len(set(names)) == 3
    assert names[0] == "fc" and names[2] == "Y"


def test_bundled_cnn_layers(tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    loaded = loading.load(root / "models/mnist_cnn.onnx", {"x": (2, 1, 28, 28)})
    found = L.find_layers(loaded)
    assert [l.op for l in found.layers] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert [l.weight.shape for l in found.layers] == [(32, 1, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3),
                                                       (3136, 128), (128, 10)]
    assert [l.output_shape for l in found.layers[:3]] == [(2, 32, 28, 28), (2, 64, 28, 28), (2, 64, 14, 14)]
    assert found.layers[1].flops == 2 * 2 * 64 * 28 * 28 * 32 * 9
    assert found.total_params == 458570
    assert sum(l.params_share for l in found.layers) == pytest.approx(1.0)
