"""Stage 2, find: Gemm/MatMul/Conv nodes with constant weights -> Layer records.

Everything else that holds a weight is listed as skipped, with the reason.
A Layer carries the weight as the layer computes it (the "weight view"):
Gemm's alpha and transB folded in, Identity/Cast/Transpose chains resolved.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import costs
from .model import LoadedModel, all_graphs

FACTORIZABLE_OPS = ("Gemm", "MatMul", "Conv")
QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")
_PASS_THROUGH = ("Identity", "Cast", "Transpose")


@dataclass(eq=False)
class Layer:
    """One factorizable layer.

    MatMul/Gemm, side "right": y = x @ weight + bias, weight [K, N].
    MatMul, side "left":       y = weight @ x,        weight [M, K], x [..., K, cols].
    Conv:                      weight [Cout, Cin, *kernel], bias [Cout]; `attrs` has
                               explicit strides, pads ([begin..., end...]) and dilations.
    """
    name: str                      # stable and unique; subgraph layers carry their path
    op: str                        # Gemm | MatMul | Conv
    input: str                     # activation tensor
    output: str                    # the layer's last tensor (a fused Add's output)
    node_outputs: tuple[str, ...]  # first output of each node the rewrite replaces
    weight: np.ndarray
    bias: np.ndarray | None
    activation_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    side: str = "right"
    attrs: dict = field(default_factory=dict)
    params: int = 0
    flops: int = 0
    params_share: float = 0.0
    flops_share: float = 0.0
    # the way to the graph holding it: (first output of the control-flow node, body attribute)
    # per level; empty for the main graph
    scope: tuple = ()

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def rows(self) -> int:
        """How many vectors the weight is applied to: the M of an M x K x N product."""
        if self.op == "Conv":
            return self.output_shape[0] * costs.prod(self.output_shape[2:])
        if self.side == "left":
            return costs.prod(self.activation_shape[:-2]) * self.activation_shape[-1]
        if self.attrs.get("transA"):
            return self.activation_shape[1]
        return costs.prod(self.activation_shape[:-1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(K, N) of the product as a matrix: inputs per output x outputs."""
        if self.op == "Conv":
            return costs.prod(self.weight.shape[1:]), self.weight.shape[0]
        if self.side == "left":
            return self.weight.shape[1], self.weight.shape[0]
        return self.weight.shape

    def signature(self) -> tuple:
        """What determines a layer's run time: layers alike are timed once."""
        return (self.op, self.side, tuple(self.weight.shape), tuple(self.activation_shape),
                str(self.dtype), self.bias is not None,
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())))


@dataclass(frozen=True)
class Skipped:
    name: str
    op: str
    reason: str


@dataclass
class Discovery:
    layers: list[Layer]
    skipped: list[Skipped]
    total_params: int
    total_flops: int


class _Graph:
    """Index of one graph: producers, consumers, constants (with outer-scope constants)."""

    def __init__(self, graph: onnx.GraphProto, outer: "_Graph | None" = None):
        self.graph = graph
        self.outer = outer
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        # how many nodes read each name anywhere in the model, bodies included (names are
        # unique across scopes): a weight read twice is shared, whichever graphs read it
        self.readers: collections.Counter = outer.readers if outer is not None else _readers(graph)
        self.inits = {i.name: i for i in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> tuple[np.ndarray | None, list[onnx.NodeProto], str | None]:
        """Value of a tensor if it is constant, the pass-through nodes on the way, and why not."""
        chain: list[onnx.NodeProto] = []
        ops: list[onnx.NodeProto] = []
        while True:
            if name in self.inits:
                value = numpy_helper.to_array(self.inits[name])
                break
            node = self.producer.get(name)
            if node is None:
                if self.outer is not None and name not in {i.name for i in self.graph.input}:
                    value, outer_chain, why = self.outer.constant(name)
                    if value is None:
                        return None, chain, why
                    break
                return None, chain, "weight is computed at run time (an input, not a constant)"
            if node.op_type == "Constant":
                value = _constant_node_value(node)
                if value is None:
                    return None, chain, "unsupported Constant attribute"
                chain.append(node)
                break
            if node.op_type == "DequantizeLinear":
                return None, chain, "quantized weight (DequantizeLinear)"
            if node.op_type not in _PASS_THROUGH:
                return None, chain, f"weight is computed at run time (by a {node.op_type} node)"
            chain.append(node)
            ops.append(node)
            name = node.input[0]
        for node in reversed(ops):
            value = _apply_pass_through(node, value)
        return value, chain, None

    def shared(self, tensor: str, chain: list[onnx.NodeProto]) -> bool:
        """Does anything besides this one path read the weight?"""
        names = [tensor] + [i for n in chain for i in n.input[:1]]
        return any(self.readers[t] > 1 or t in self.graph_outputs for t in names)


def _readers(graph: onnx.GraphProto) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for node in graph.node:
        counts.update(set(node.input) - {""})
        for attr in node.attribute:
            for _, sub in _subgraphs(attr):
                counts.update(_readers(sub))
    return counts


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
    return None


def _apply_pass_through(node: onnx.NodeProto, value: np.ndarray) -> np.ndarray:
    if node.op_type == "Identity":
        return value
    if node.op_type == "Cast":
        to = _attr(node, "to", onnx.TensorProto.FLOAT)
        return value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    perm = _attr(node, "perm", None)
    return np.transpose(value, perm if perm else None)


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def explicit_pads(input_shape, kernel, strides, dilations, auto_pad, pads):
    """Conv pads as [begin..., end...], resolving auto_pad at the concrete input shape."""
    nd = len(kernel)
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            size = input_shape[2 + i]
            span = dilations[i] * (kernel[i] - 1) + 1
            total = max((math.ceil(size / strides[i]) - 1) * strides[i] + span - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    return list(pads) if pads else [0] * (2 * nd)


def find_layers(model: LoadedModel) -> Discovery:
    """Every layer a pass could take, and every other weight-holding node with its reason.

    Layers inside If/Loop/Scan bodies are found too: their name carries the subgraph path
    (`if_node/then_branch/fc`) and `scope` says how to reach the body. Their FLOPs count once,
    however often a Loop runs its body.
    """
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    _scan(_Graph(model.proto.graph), "", (), model.shapes, set(), layers, skipped)
    total_flops = sum(l.flops for l in layers) + sum(
        _node_flops(node, model.shapes) for node in model.proto.graph.node
        if node.op_type in FACTORIZABLE_OPS and not any(l.node_outputs[0] == node.output[0] for l in layers))
    total_params = _count_params(model.proto)
    for layer in layers:
        layer.params_share = layer.params / total_params if total_params else 0.0
        layer.flops_share = layer.flops / total_flops if total_flops else 0.0
    return Discovery(layers, skipped, total_params, total_flops)


def _scan(g: _Graph, prefix: str, scope: tuple, shapes, names: set[str], layers: list, skipped: list) -> None:
    for node in g.graph.node:
        name = _unique(prefix + (node.name or node.output[0]), names)
        if node.op_type in QUANTIZED_OPS:
            skipped.append(Skipped(name, node.op_type, "quantized op"))
        elif node.op_type in FACTORIZABLE_OPS:
            found = _layer(g, node, name, shapes)
            if isinstance(found, Layer):
                found.scope = scope
                layers.append(found)
            else:
                skipped.append(Skipped(name, node.op_type, found))
        for attr in node.attribute:
            for sub_name, sub in _subgraphs(attr):
                _scan(_Graph(sub, g), f"{name}/{sub_name}/", (*scope, (node.output[0], sub_name)), shapes,
                      names, layers, skipped)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}#{i}", i + 1
    taken.add(candidate)
    return candidate


def _subgraphs(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.name, attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        for i, g in enumerate(attr.graphs):
            yield f"{attr.name}[{i}]", g


def _layer(g: _Graph, node: onnx.NodeProto, name: str, shapes) -> Layer | str:
    if node.op_type == "Gemm":
        return _gemm(g, node, name, shapes)
    if node.op_type == "MatMul":
        return _matmul(g, node, name, shapes)
    return _conv(g, node, name, shapes)


def _float_weight(value: np.ndarray) -> str | None:
    if value.dtype not in (np.float32, np.float16, np.float64):
        return f"weight dtype {value.dtype} is not floating point"
    return None


def _gemm(g, node, name, shapes) -> Layer | str:
    a, b = node.input[0], node.input[1]
    weight, chain, why = g.constant(b)
    if weight is None:
        return why
    if g.shared(b, chain):
        return "weight shared by several nodes"
    if (bad := _float_weight(weight)):
        return bad
    if a not in shapes:
        return "activation shape unknown"
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
    w = (weight.T if trans_b else weight) * np.asarray(alpha, dtype=weight.dtype)
    w = w.astype(weight.dtype)
    n = w.shape[1]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c, c_chain, why = g.constant(node.input[2])
        if c is None:
            return f"bias C: {why}"
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            return "bias C is not a vector over the outputs"
        # a scalar stays a scalar: the chain's Add broadcasts it
        bias = (c.reshape(-1) * np.asarray(beta, dtype=c.dtype)).astype(w.dtype)
    act = shapes[a]
    out = (act[1] if trans_a else act[0], n)
    return _matmul_layer(name, "Gemm", a, node.output[0], (node.output[0],), w, bias, act, out,
                         "right", {"transA": int(trans_a)})


def _matmul(g, node, name, shapes) -> Layer | str:
    a, b = node.input
    wb, chain_b, why_b = g.constant(b)
    wa, chain_a, _ = g.constant(a)
    if wa is not None and wb is not None:
        return "both inputs are constant (fold constants first)"
    if wa is None and wb is None:
        if "quantized" in (why_b or ""):
            return why_b
        return "both inputs computed at run time (attention-style MatMul)"
    side, weight, act_name, chain, w_name = (("right", wb, a, chain_b, b) if wb is not None
                                             else ("left", wa, b, chain_a, a))
    if weight.ndim != 2:
        return f"constant operand has {weight.ndim} dims; only 2-D weights are factorized"
    if g.shared(w_name, chain):
        return "weight shared by several nodes"
    if (bad := _float_weight(weight)):
        return bad
    if act_name not in shapes or node.output[0] not in shapes:
        return "activation shape unknown"
    act, out_shape = shapes[act_name], shapes[node.output[0]]
    if len(act) < 2:
        return "activation has fewer than 2 dims"
    output, nodes, bias = node.output[0], (node.output[0],), None
    if side == "right":
        fused = _fused_bias(g, node, weight.shape[1], shapes)
        if fused is not None:
            add, bias = fused
            output, nodes = add.output[0], (node.output[0], add.output[0])
    return _matmul_layer(name, "MatMul", act_name, output, nodes, weight, bias, act, out_shape, side, {})


def _fused_bias(g, node, n, shapes):
    """A MatMul whose only reader is an Add of a constant [N] vector: one layer with a bias."""
    out = node.output[0]
    readers = g.consumers.get(out, [])
    if len(readers) != 1 or g.readers[out] != 1 or out in g.graph_outputs or readers[0].op_type != "Add":
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    value, chain, _ = g.constant(other)
    if value is None or value.size != n or (value.ndim and value.shape[-1] != n) or g.shared(other, chain):
        return None
    if shapes.get(add.output[0]) != shapes.get(out):
        return None
    return add, value.reshape(-1)


def _matmul_layer(name, op, act_name, output, nodes, w, bias, act, out_shape, side, attrs) -> Layer:
    layer = Layer(name=name, op=op, input=act_name, output=output, node_outputs=nodes, weight=w,
                  bias=bias, activation_shape=tuple(act), output_shape=tuple(out_shape), side=side,
                  attrs=attrs)
    k, n = layer.matrix_shape
    layer.params = w.size + (bias.size if bias is not None else 0)
    layer.flops = costs.matmul_flops(layer.rows, k, n)
    return layer


def _conv(g, node, name, shapes) -> Layer | str:
    x, w_name = node.input[0], node.input[1]
    weight, chain, why = g.constant(w_name)
    if weight is None:
        return why
    if g.shared(w_name, chain):
        return "weight shared by several nodes"
    if (bad := _float_weight(weight)):
        return bad
    group = _attr(node, "group", 1)
    if group != 1:
        return f"grouped or depthwise convolution (group={group})"
    if weight.ndim not in (3, 4):
        return f"{weight.ndim - 2}-D convolution; only 1-D and 2-D are factorized"
    if x not in shapes:
        return "activation shape unknown"
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias, _, why = g.constant(node.input[2])
        if bias is None:
            return f"bias: {why}"
    kernel = list(weight.shape[2:])
    nd = len(kernel)
    strides = list(_attr(node, "strides", None) or [1] * nd)
    dilations = list(_attr(node, "dilations", None) or [1] * nd)
    pads = explicit_pads(shapes[x], kernel, strides, dilations, _attr(node, "auto_pad", "NOTSET"),
                         _attr(node, "pads", None))
    out_shape = costs.conv_output_shape(shapes[x], weight.shape[0], kernel, strides, pads, dilations)
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    attrs = {"strides": strides, "pads": pads, "dilations": dilations}
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        attrs["auto_pad"] = auto_pad    # pads depend on the input size: rewrites keep auto_pad
    layer = Layer(name=name, op="Conv", input=x, output=node.output[0], node_outputs=(node.output[0],),
                  weight=weight, bias=bias, activation_shape=tuple(shapes[x]), output_shape=out_shape,
                  attrs=attrs)
    layer.params = weight.size + (bias.size if bias is not None else 0)
    layer.flops = costs.conv_flops(out_shape, weight.shape[1], kernel)
    return layer


def _node_flops(node: onnx.NodeProto, shapes) -> int:
    """FLOPs of a MatMul/Gemm/Conv that is not a layer, where shapes are known."""
    out = shapes.get(node.output[0])
    a = shapes.get(node.input[0])
    if out is None or a is None:
        return 0
    if node.op_type == "MatMul":
        return 2 * costs.prod(out) * a[-1]
    if node.op_type == "Gemm":
        return 2 * costs.prod(out) * (a[0] if _attr(node, "transA", 0) else a[-1])
    w = shapes.get(node.input[1])
    if w is None:
        return 0
    return costs.conv_flops(out, w[1], w[2:])


def _count_params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point constants of the model, If/Loop/Scan bodies included
    (where its layers may be)."""
    total = 0
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    for graph in all_graphs(model.graph):
        tensors = list(graph.initializer) + [
            a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for t in tensors:
            if t.data_type in floats:
                total += costs.prod(t.dims)
    return total
