"""Find, pairs: two layers joined only by ops that act on each channel on its own.

A pair is a producer layer (Gemm/MatMul with the weight on the right, or a Conv) whose output
reaches exactly one consumer layer's input (Gemm/MatMul on the right, or a Conv after a Conv)
through elementwise ops only (activations; Add/Sub/Mul/Div/Pow by a scalar or a per-channel
constant; products of such tensors, as the Erf GELU computes x * (1 + erf(x / sqrt 2)) / 2),
with nothing else reading any tensor on the way. Inner channel j then lives in column j of the
producer (and its bias), in entry j of each per-channel constant and in input row j of the
consumer (rows j*kh*kw ... for a Conv), and nowhere else: dropping it there changes nothing
about the channels kept (passes/prune.py).

Every producer layer that heads no pair gets the reason, so `apply --layer X=prune:K` can
say why not. Only the main graph is searched (pairs inside If/Loop bodies are not offered).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from .layers import Discovery, Layer
from .model import LoadedModel

# one input, one output, value by value: channel j out depends on channel j in only
UNARY = frozenset({"Relu", "LeakyRelu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Elu",
                   "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Identity", "Neg", "Abs"})
# two operands, broadcast: elementwise when the other operand is another tensor of the pair, a
# scalar, or a constant that varies along the channel axis only
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu"})
# Clip's min and max are scalars by the operator's definition
CLIP = "Clip"
ELEMENTWISE = UNARY | BINARY | {CLIP}


@dataclass(frozen=True)
class ChannelConstant:
    """A per-channel constant operand of an op between the layers, which the rewrite slices."""
    node: str              # the op's first output (how the rewrite finds the node)
    index: int             # which input of the op it is
    value: np.ndarray
    axis: int              # the channel axis of `value`


@dataclass(eq=False)
class Pair:
    producer: Layer
    consumer: Layer
    channels: int                       # inner channels: the producer's N (Cout) = the consumer's K (Cin)
    between: tuple[str, ...]            # op types of the nodes between, in graph order
    nodes: tuple[str, ...]              # their first outputs
    tensors: tuple[str, ...]            # every tensor carrying the inner channels (producer output first)
    sliced: tuple[ChannelConstant, ...]
    axis: int                           # the channel axis of those tensors: -1 (Gemm/MatMul) or 1 (Conv)

    # a pair is named, placed and typed by its producer (plan.json lists it under the producer)
    @property
    def name(self) -> str:
        return self.producer.name

    @property
    def scope(self) -> tuple:
        return self.producer.scope

    @property
    def dtype(self) -> np.dtype:
        return self.producer.dtype

    @property
    def op(self) -> str:
        return "Conv" if self.producer.op == "Conv" else "MatMul"

    @property
    def params(self) -> int:
        """What the pair holds that pruning shrinks: both layers and the per-channel constants."""
        return self.producer.params + self.consumer.params + sum(c.value.size for c in self.sliced)

    @property
    def flops(self) -> int:
        return self.producer.flops + self.consumer.flops

    @property
    def flops_share(self) -> float:
        return self.producer.flops_share + self.consumer.flops_share

    @property
    def params_share(self) -> float:
        return self.producer.params_share + self.consumer.params_share

    def layers_at(self, keep: int) -> tuple[Layer, Layer]:
        """The producer and the consumer as they run with `keep` inner channels (the first ones:
        which channels are kept changes nothing about the run time), to time them alone."""
        p, c = self.producer, self.consumer
        if p.op == "Conv":
            w1, w2 = p.weight[:keep], c.weight[:, :keep]
        else:
            w1, w2 = p.weight[:, :keep], c.weight[:keep]
        b1 = None if p.bias is None else (p.bias[:keep] if p.bias.size == self.channels else p.bias)
        out1 = list(p.output_shape)
        out1[self.axis] = keep
        act2 = list(c.activation_shape)
        act2[self.axis] = keep
        return (replace(p, weight=np.ascontiguousarray(w1), bias=b1, output_shape=tuple(out1)),
                replace(c, weight=np.ascontiguousarray(w2), activation_shape=tuple(act2)))

    def to_json(self) -> dict:
        return {"producer": self.producer.name, "consumer": self.consumer.name, "channels": self.channels,
                "between": list(self.between)}


@dataclass(frozen=True)
class Refused:
    producer: str
    consumer: str | None     # the layer it would pair with, where one was reached
    reason: str


@dataclass
class PairDiscovery:
    pairs: list[Pair]
    refused: list[Refused]

    def pair(self, producer: str) -> Pair | None:
        return next((p for p in self.pairs if p.producer.name == producer), None)

    def why_not(self, producer: str) -> str:
        found = next((r for r in self.refused if r.producer == producer), None)
        return found.reason if found else "not a layer that heads a pair"


def find_pairs(model: LoadedModel, discovery: Discovery) -> PairDiscovery:
    """Every pair in the main graph, and for every other layer why it heads none."""
    graph = model.proto.graph
    index = _Index(graph)
    by_first_output = {l.node_outputs[0]: l for l in discovery.layers if not l.scope}
    skipped = {s.name: s.reason for s in discovery.skipped}
    pairs, refused = [], []
    for layer in discovery.layers:
        found = _pair(index, layer, by_first_output, skipped, model.shapes)
        if isinstance(found, Pair):
            pairs.append(found)
        else:
            refused.append(Refused(layer.name, *found))
    return PairDiscovery(pairs, refused)


class _Index:
    """Readers and constants of the main graph; names that If/Loop/Scan bodies read count as readers."""

    def __init__(self, graph: onnx.GraphProto):
        self.order = {n.output[0]: i for i, n in enumerate(graph.node) if n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.body_reads: set[str] = set()
        for node in graph.node:
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)
            for attr in node.attribute:
                for sub in _subgraphs(attr):
                    self.body_reads |= _names_read(sub)
        self.inits = {i.name: i for i in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.constant_nodes.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
        return None


def _subgraphs(attr: onnx.AttributeProto):
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = {i for n in graph.node for i in n.input}
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                names |= _names_read(sub)
    return names


def _pair(index: _Index, producer: Layer, layers: dict[str, Layer], skipped: dict[str, str],
          shapes: dict) -> Pair | tuple[str | None, str]:
    """The pair this layer heads, or (the consumer reached or None, why there is none)."""
    if producer.scope:
        return None, "inside an If/Loop/Scan body (pairs are found in the main graph only)"
    if producer.side == "left":
        return None, "its weight is on the left (W @ x): channels are not the last axis"
    axis = 1 if producer.op == "Conv" else -1
    channels = int(producer.weight.shape[0] if producer.op == "Conv" else producer.weight.shape[1])
    shape = shapes.get(producer.output)
    if shape is None:
        return None, "its output shape is unknown"

    # the tensors carrying the inner channels: the producer's output and whatever elementwise
    # ops make of it; any other reader is the consumer (there must be exactly one)
    tensors, nodes, exits = [producer.output], [], []
    seen: set[str] = set()
    queue = [producer.output]
    while queue:
        t = queue.pop(0)
        if t in index.outputs:
            return None, f"{t} is a graph output (read outside the pair)"
        if t in index.body_reads:
            return None, f"{t} is read inside an If/Loop/Scan body"
        for node in index.readers.get(t, []):
            key = node.output[0]
            if key in seen:
                continue
            seen.add(key)
            if node.op_type in ELEMENTWISE and len(node.output) == 1:
                nodes.append(node)
                tensors.append(node.output[0])
                queue.append(node.output[0])
            else:
                exits.append(node)
    if not exits:
        return None, "nothing but elementwise ops reads its output (no consumer layer)"
    if len(exits) > 1:
        ops = ", ".join(f"{n.op_type} {n.name or n.output[0]}" for n in exits[:3])
        return None, f"its channels reach {len(exits)} nodes ({ops}): a second consumer"
    exit_node = exits[0]
    consumer = layers.get(exit_node.output[0])
    label = exit_node.name or exit_node.output[0]
    if consumer is None:
        if exit_node.op_type in ("Gemm", "MatMul", "Conv"):
            why = skipped.get(label, "not a layer")
            return label, f"the next layer {label} cannot be rewritten ({why})"
        return None, (f"a {exit_node.op_type} ({label}) sits between it and the next layer: "
                      f"only elementwise ops may")
    region = set(tensors)
    if consumer.input not in region or any(i in region for i in exit_node.input if i != consumer.input):
        return consumer.name, f"{consumer.name} reads its channels as a weight, not as its input"
    if consumer.side == "left":
        return consumer.name, f"{consumer.name} has its weight on the left (W @ x)"
    if consumer.attrs.get("transA"):
        return consumer.name, f"{consumer.name} transposes its input (Gemm transA=1)"
    if (consumer.op == "Conv") != (producer.op == "Conv"):
        return consumer.name, f"{producer.op} -> {consumer.op}: channel axes differ"
    inner = int(consumer.weight.shape[1] if consumer.op == "Conv" else consumer.weight.shape[0])
    if inner != channels:
        return consumer.name, f"{channels} channels out, {inner} into {consumer.name}"
    rank = len(shape)
    for t in tensors:
        if shapes.get(t) is not None and tuple(shapes[t]) != tuple(shape):
            return consumer.name, f"{t} has shape {list(shapes[t])}, not the producer's {list(shape)}: a broadcast"
    sliced = []
    for node in nodes:
        for i, name in enumerate(node.input):
            if not name or name in region:
                continue
            value = index.constant(name)
            if value is None:
                return consumer.name, (f"{node.op_type} {node.name or node.output[0]} reads {name}, "
                                       f"computed outside the pair")
            if node.op_type == CLIP or (node.op_type == "Pow" and i == 1):
                if value.size != 1:
                    return consumer.name, f"{node.op_type} {node.name or node.output[0]}: a non-scalar {name}"
                continue
            c_axis = _channel_axis(value.shape, rank, axis, channels)
            if isinstance(c_axis, str):
                return consumer.name, f"{node.op_type} {node.name or node.output[0]}: constant {name} {c_axis}"
            if c_axis is not None:
                sliced.append(ChannelConstant(node.output[0], i, value, c_axis))
    nodes.sort(key=lambda n: index.order.get(n.output[0], 0))
    return Pair(producer=producer, consumer=consumer, channels=channels,
                between=tuple(n.op_type for n in nodes), nodes=tuple(n.output[0] for n in nodes),
                tensors=tuple(tensors), sliced=tuple(sliced), axis=axis)


def _channel_axis(shape: tuple, rank: int, axis: int, channels: int) -> int | None | str:
    """The axis of a broadcast constant that runs over the channels; None for a scalar-like
    constant (every dim 1), or why it is neither (it varies along another axis)."""
    if len(shape) > rank:
        return f"has {len(shape)} dims, more than the activation's {rank}"
    along = (axis % rank) - (rank - len(shape))       # numpy broadcasting aligns on the right
    for i, d in enumerate(shape):
        if d != 1 and i != along:
            return f"varies along axis {i - len(shape)} ({list(shape)}), not only the channels"
    if along < 0 or shape[along] == 1:
        return None
    if shape[along] != channels:
        return f"has {shape[along]} entries for {channels} channels"
    return along
