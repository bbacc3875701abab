"""Stage 1, load: an ONNX file -> the model and the concrete shapes it runs at.

Shapes come from onnx's inference at the given input shapes (model.py); the tensors it leaves
unknown that later stages read (around Gemm, MatMul, Conv, Add) are measured off onnxruntime
runs. Here, not in model.py, because it runs the model: model.py stays file and graph work that
runtime.py can build on without an import circle.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx

from .model import (LoadedModel, all_graphs, first_line, graph_inputs, infer_shapes, node_bodies, read_model,
                    resolve_input_shapes, sha256_file)
from .runtime import create_session

log = logging.getLogger("denseflex_onnx")


def load(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None) -> LoadedModel:
    """Read, check and resolve shapes: everything later stages need from the file."""
    path = Path(path)
    proto, external = read_model(path)
    concrete = resolve_input_shapes(proto, input_shapes or {})
    shapes = infer_shapes(proto, concrete)
    missing = sorted({t for graph in all_graphs(proto.graph) for n in graph.node if n.op_type in _SHAPES_NEEDED
                      for t in [*n.input, *n.output] if t and t not in shapes})
    if missing:
        shapes.update(measure_shapes(proto, concrete, missing))
    return LoadedModel(path=path, proto=proto, sha256=sha256_file(path), input_shapes=concrete,
                       shapes=shapes, external_data=external)


# the ops whose tensor shapes discovery and FLOP counts read
_SHAPES_NEEDED = ("Gemm", "MatMul", "Conv", "Add")


def measure_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                   names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes that inference could not resolve, read off onnxruntime runs at these input shapes.

    Main-graph tensors are read off one run of a copy that outputs them too. A tensor inside
    an If/Loop/Scan body cannot be a graph output, and a branch not taken never computes it:
    each body that holds one is run on its own, as a model whose inputs are the outer values
    it reads (measured in the same run) and, for a Loop or Scan, its first iteration's inputs.
    Nested bodies recurse the same way.
    """
    feeds = {}
    for info in graph_inputs(model):
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except Exception:          # an undefined element type: what onnxruntime assumes
            dtype = np.dtype(np.float32)
        feeds[info.name] = np.ones(input_shapes[info.name], dtype=dtype)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        _measure(model, feeds, set(names), shapes)
    except Exception as exc:
        log.warning("could not measure tensor shapes (%s); some layers may be skipped", first_line(exc))
    return shapes


def _measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray], wanted: set[str],
             shapes: dict[str, tuple[int, ...]]) -> None:
    """Shapes of the `wanted` tensors of this model's graph and of its bodies, into `shapes`."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    produced = {o for n in graph.node for o in n.output if o}
    here = wanted & produced
    bodies = [(node, body, wanted & _defined(body)) for node in graph.node for body in node_bodies(node)]
    bodies = [(node, body, inside) for node, body, inside in bodies if inside]
    outer = set()
    for node, body, _ in bodies:     # what the body reads, and a Loop's or Scan's own inputs
        outer |= (_free_names(body) | (set() if node.op_type == "If" else set(node.input))) & produced
    values: dict = dict(feeds)
    try:
        values.update(_run_taps(model, feeds, here | outer))
    except Exception as exc:
        if not here or not outer:
            raise
        # a main-graph tensor this run cannot reach (say, behind an If that fails on these
        # made-up inputs) must not cost the bodies their shapes
        log.warning("could not measure tensor shapes (%s); some layers may be skipped", first_line(exc))
        values.update(_run_taps(model, feeds, outer))
    for name in wanted & (produced | set(feeds)):
        if isinstance(values.get(name), np.ndarray):
            shapes[name] = tuple(int(d) for d in values[name].shape)
    for node, body, inside in bodies:
        try:
            standalone = _standalone_body(model, node, body, values, inits)
            if standalone is None:
                log.warning("shapes inside %s (%s) cannot be measured; its layers may be skipped",
                            node.name or node.output[0], node.op_type)
                continue
            _measure(*standalone, inside, shapes)
        except Exception as exc:
            log.warning("could not measure tensor shapes inside %s (%s); its layers may be skipped",
                        node.name or node.output[0], first_line(exc))


def _run_taps(model: onnx.ModelProto, feeds: dict[str, np.ndarray], taps: set[str]) -> dict:
    """These tensors' values from one run of a copy that outputs them and runs only what they need:
    onnxruntime runs every node it is given, and a node the taps do not need (an If whose
    branch fails on made-up inputs, a sample rate of 1) must not stop the measurement."""
    if not taps:
        return {}
    order = sorted(taps)
    needed = _needed_nodes(model.graph, taps)
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    del tapped.graph.output[:]
    tapped.graph.output.extend(onnx.ValueInfoProto(name=name) for name in order)
    del tapped.graph.node[:]
    tapped.graph.node.extend(n for i, n in enumerate(model.graph.node) if i in needed)
    return dict(zip(order, create_session(tapped).run(order, feeds)))


def _needed_nodes(graph: onnx.GraphProto, names: set[str]) -> set[int]:
    """Indices of the nodes these tensors depend on (a body's outer reads included)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    needed: set[int] = set()
    todo = [name for name in names if name in producer]
    while todo:
        index = producer[todo.pop()]
        if index in needed:
            continue
        needed.add(index)
        node = graph.node[index]
        reads = set(node.input)
        for body in node_bodies(node):
            reads |= _free_names(body)
        todo.extend(name for name in reads if name in producer and producer[name] not in needed)
    return needed


def _defined(graph: onnx.GraphProto) -> set[str]:
    """Every tensor a body and the bodies nested in it define."""
    names = {i.name for i in graph.input} | {o for n in graph.node for o in n.output if o}
    for node in graph.node:
        for body in node_bodies(node):
            names |= _defined(body)
    return names


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """The outer-scope tensors a body reads (nested bodies included)."""
    defined = ({i.name for i in graph.input} | {i.name for i in graph.initializer}
               | {o for n in graph.node for o in n.output if o})
    read = set()
    for node in graph.node:
        read.update(node.input)
        for body in node_bodies(node):
            read |= _free_names(body)
    return read - defined - {""}


def _standalone_body(model: onnx.ModelProto, node: onnx.NodeProto, body: onnx.GraphProto, values: dict,
                     inits: dict) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """A body as a model of its own, and its feeds: None where its inputs cannot be had."""
    def value_of(name: str):
        if name in values:
            return values[name]
        if name in inits:
            return onnx.numpy_helper.to_array(inits[name])
        return None

    formal = _first_iteration(model, node, body, value_of)
    if formal is None:
        return None
    graph = onnx.GraphProto(name=body.name or "body")
    graph.node.extend(body.node)
    graph.initializer.extend(body.initializer)
    feeds: dict[str, np.ndarray] = {}
    for name in sorted(_free_names(body)):
        if name in inits:
            graph.initializer.append(inits[name])
        elif isinstance(values.get(name), np.ndarray):
            feeds[name] = values[name]
        else:
            return None            # a sequence or an optional: not fed here
    feeds.update(formal)
    for name, array in feeds.items():
        graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
    standalone = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "domain"):
        setattr(standalone, field, getattr(model, field))
    standalone.opset_import.extend(model.opset_import)
    standalone.functions.extend(model.functions)
    standalone.graph.CopyFrom(graph)
    return standalone, feeds


def _first_iteration(model: onnx.ModelProto, node: onnx.NodeProto, body: onnx.GraphProto,
                     value_of) -> dict[str, np.ndarray] | None:
    """The values a body's own inputs take on its first run: none for an If branch; the
    iteration number, condition and initial loop-carried values for a Loop; the initial
    states and the first slice of each scanned input for a Scan."""
    names = [i.name for i in body.input]
    if node.op_type == "If":
        return {} if not names else None
    if node.op_type == "Loop":
        carried = [value_of(name) for name in node.input[2:]]
        if len(names) != 2 + len(carried) or any(not isinstance(v, np.ndarray) for v in carried):
            return None
        return dict(zip(names, [np.array(0, dtype=np.int64), np.array(True), *carried]))
    if node.op_type == "Scan" and next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0) >= 9:
        scanned = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
        axes = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), None) or [0] * scanned
        given = [value_of(name) for name in node.input]
        if len(names) != len(given) or any(not isinstance(v, np.ndarray) for v in given):
            return None
        states, inputs = given[:len(given) - scanned], given[len(given) - scanned:]
        firsts = []
        for array, axis in zip(inputs, axes):
            if array.ndim == 0 or array.shape[axis] == 0:
                return None
            firsts.append(np.take(array, 0, axis=axis))
        return dict(zip(names, [*states, *firsts]))
    return None
