"""Small real ONNX graphs for the tests, built with onnx.helper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
FLOAT = TensorProto.FLOAT


def tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def model(nodes, inputs, outputs, inits=(), opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def value(name, shape, dtype=np.float32):
    return helper.make_tensor_value_info(name, tensor_type(dtype), shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def rng(seed=0):
    return np.random.default_rng(seed)


def gemm(k=12, n=10, batch="N", trans_a=0, trans_b=0, alpha=1.0, beta=1.0, bias="vector",
         dtype=np.float32, seed=0) -> onnx.ModelProto:
    """Y = alpha * op(X) @ op(W) + beta * C."""
    r = rng(seed)
    w = r.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    x_shape = [k, batch] if trans_a else [batch, k]
    inits, inputs = [init("W", w)], ["X", "W"]
    if bias is not None:
        c = {"vector": (n,), "row": (1, n), "scalar": ()}[bias]
        inits.append(init("C", r.standard_normal(c).astype(dtype)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["Y"], name="fc", transA=trans_a, transB=trans_b,
                            alpha=alpha, beta=beta)
    return model([node], [value("X", x_shape, dtype)], [value("Y", [batch, n], dtype)], inits)


def matmul(k=12, n=10, lead=("N",), bias=False, dtype=np.float32, weight_via=None, seed=0) -> onnx.ModelProto:
    """x [*lead, K] @ W [K, N] (+ b), the weight as an initializer or via a node chain."""
    r = rng(seed)
    w = r.standard_normal((k, n)).astype(dtype)
    nodes, inits = [], []
    weight_name = "W"
    if weight_via is None:
        inits.append(init("W", w))
    elif weight_via == "Constant":
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)))
    elif weight_via == "Identity":
        inits.append(init("W0", w))
        nodes.append(helper.make_node("Identity", ["W0"], ["W"]))
    elif weight_via == "Cast":
        inits.append(init("W0", w.astype(np.float16)))
        nodes.append(helper.make_node("Cast", ["W0"], ["W"], to=tensor_type(dtype)))
    elif weight_via == "Transpose":
        inits.append(init("W0", w.T.copy()))
        nodes.append(helper.make_node("Transpose", ["W0"], ["W"], perm=[1, 0]))
    out = "Y" if not bias else "H"
    nodes.append(helper.make_node("MatMul", ["X", weight_name], [out], name="mm"))
    if bias:
        inits.append(init("b", r.standard_normal(n).astype(dtype)))
        nodes.append(helper.make_node("Add", ["H", "b"], ["Y"], name="add"))
    return model(nodes, [value("X", [*lead, k], dtype)], [value("Y", [*lead, n], dtype)], inits)


def matmul_left(m=10, k=12, cols=7, lead=("N",), seed=0) -> onnx.ModelProto:
    """W [M, K] @ x [*lead, K, cols]."""
    w = rng(seed).standard_normal((m, k)).astype(np.float32)
    node = helper.make_node("MatMul", ["W", "X"], ["Y"], name="mm_left")
    return model([node], [value("X", [*lead, k, cols])], [value("Y", [*lead, m, cols])], [init("W", w)])


def conv(cin=8, cout=16, kernel=(3, 3), spatial=(9, 9), strides=None, pads=None, dilations=None,
         auto_pad=None, group=1, bias=True, batch="N", dtype=np.float32, seed=0) -> onnx.ModelProto:
    r = rng(seed)
    w = (r.standard_normal((cout, cin // group, *kernel)) / np.sqrt(cin * np.prod(kernel))).astype(dtype)
    inits, inputs = [init("W", w)], ["X", "W"]
    if bias:
        inits.append(init("B", r.standard_normal(cout).astype(dtype)))
        inputs.append("B")
    attrs = {"kernel_shape": list(kernel), "group": group}
    for key, val in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if val is not None:
            attrs[key] = list(val)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    node = helper.make_node("Conv", inputs, ["Y"], name="conv", **attrs)
    y = value("Y", [batch, cout, *[f"out{i}" for i in range(len(kernel))]], dtype)
    return model([node], [value("X", [batch, cin, *spatial], dtype)], [y], inits)


def decaying(r, n, k):
    """A weight with a decaying spectrum, as trained layers have (random ones are full rank)."""
    u, _ = np.linalg.qr(r.standard_normal((n, min(n, k))))
    v, _ = np.linalg.qr(r.standard_normal((k, min(n, k))))
    s = np.exp(-np.arange(min(n, k)) / (0.08 * min(n, k)))
    return ((u * s) @ v.T * np.sqrt(n)).astype(np.float32)


def mlp(sizes=(20, 32, 24, 5), batch="N", seed=0) -> onnx.ModelProto:
    """Gemm-ReLU chain like the bundled MNIST MLP (transB=1, as torch exports Linear)."""
    r = rng(seed)
    nodes, inits = [], []
    x = "X"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [init(f"W{i}", decaying(r, n, k)),
                  init(f"b{i}", (r.standard_normal(n) * 0.1).astype(np.float32))]
        y = f"h{i}" if i < len(sizes) - 2 else "Y"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [y], name=f"fc{i}", transB=1))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [y], [f"a{i}"]))
            x = f"a{i}"
    return model(nodes, [value("X", [batch, sizes[0]])], [value("Y", [batch, sizes[-1]])], inits)


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.save(m, str(path))
    return path
