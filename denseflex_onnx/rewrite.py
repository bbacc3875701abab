"""Applying a plan: every chosen layer's pass rewrites the graph; the rest is kept."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .passes import PASSES
from .passes.chain import conv_geometry

from . import __version__
from .layers import Layer
from .errors import UserError
from .plan import Choice, Plan
from . import model as model_io
from .model import PROTOBUF_LIMIT, without_big_data
from .runtime import max_ir_version


def rewrite_model(model: onnx.ModelProto, layers: dict[str, Layer], plan: Plan,
                  factors: dict[str, list[np.ndarray]] | None = None, stats=None,
                  samples: list[dict] | None = None) -> onnx.ModelProto:
    """A new model with each planned layer replaced by its chain (a pruned pair: `layers` holds
    the pairs.Pair under its producer's name).

    `factors` may hold precomputed factors by layer name; the others are factorized here.
    Opset, metadata, other nodes, input and output names, dtypes and symbolic dims are kept;
    the IR version is capped at what onnxruntime reads; the tool version and plan hash are
    recorded in metadata_props. A `+int8` layer that onnxruntime's quantizer leaves in float
    raises UserError (int8_left_float finds such layers beforehand). `samples` (feeds of the
    model's inputs) calibrate the activation ranges of a static INT8 plan.
    """
    out, left = _rewrite(model, layers, plan, factors, stats, samples)
    if left:
        raise UserError(f"onnxruntime's quantizer leaves {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} "
                        f"in float (it quantizes a MatMul/Conv whose weight is a stored initializer and whose input "
                        f"type it can infer): take {'these layers' if len(left) > 1 else 'that layer'} without +int8")
    return out


def int8_left_float(model: onnx.ModelProto, layers: dict[str, Layer]) -> list[str]:
    """The layers that onnxruntime's dynamic quantizer would leave in float were each of them
    given INT8 weights as it is (dense+int8): Paddle's exports, for one, feed MatMuls weights
    from Constant nodes, which it does not read."""
    return _rewrite(model, layers, Plan({n: Choice("dense", {}, int8=True) for n in layers}))[1]


def _rewrite(model: onnx.ModelProto, layers: dict[str, Layer], plan: Plan, factors=None, stats=None,
             samples=None) -> tuple[onnx.ModelProto, list[str]]:
    """rewrite_model's model, and the `+int8` layers left in float."""
    # over 2 GB, the big initializers stay out of graphsurgeon's copy of the graph and are put
    # back after it (those still read), so memory holds the model about twice, not four times
    big = model.ByteSize() >= PROTOBUF_LIMIT
    graph = gs.import_onnx(without_big_data(model, stubs=False) if big else model)
    to_quantize: dict[str, list[gs.Node]] = {}
    for name, choice in sorted(plan.rewritten().items()):
        layer = layers[name]
        if choice.method != "dense":
            module = PASSES[choice.method]
            layer_factors = (factors or {}).get(name)
            if layer_factors is None:
                # a pair pass fits its consumer: the statistics it needs are the consumer's inputs
                layer_factors = module.factorize(layer, choice.config, (stats or {}).get(choice.consumer or name))
            module.rewrite(_body(graph, layer.scope), layer, layer_factors)
        if choice.int8:
            to_quantize[name] = weight_nodes(_body(graph, layer.scope), layer)
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True).toposort()
    exported = gs.export_onnx(graph, do_type_check=False)

    out = onnx.ModelProto()
    out.CopyFrom(model) if not big else _copy_header(model, out)
    out.graph.CopyFrom(exported.graph)
    if big:
        read = {i for node in out.graph.node for i in node.input}
        out.graph.initializer.extend(t for t in model.graph.initializer
                                     if t.name in read and model_io.tensor_bytes(t) >= model_io.BIG_TENSOR)
    _keep_interface(model.graph, out.graph)
    out.ir_version = min(model.ir_version, max_ir_version())
    _set_metadata(out, {"denseflex_onnx.version": __version__, "denseflex_onnx.plan_sha256": plan.sha256()})
    return quantize(out, to_quantize, model.graph, plan.int8, samples) if to_quantize else (out, [])


def _body(graph: gs.Graph, scope: tuple) -> gs.Graph:
    """The (sub)graph a layer lives in: follow (control-flow node output, body attribute) steps."""
    for node_output, attr in scope:
        node = next(n for n in graph.nodes if n.outputs and n.outputs[0].name == node_output)
        if "[" in attr:                       # a GRAPHS attribute: name[i]
            base, index = attr[:-1].split("[")
            graph = node.attrs[base][int(index)]
        else:
            graph = node.attrs[attr]
    return graph


def _copy_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, field, getattr(src, field))
    dst.opset_import.extend(src.opset_import)
    dst.metadata_props.extend(src.metadata_props)
    dst.functions.extend(src.functions)


def _keep_interface(src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
    """Inputs and outputs exactly as they were (gs may re-derive their types)."""
    del dst.input[:]
    dst.input.extend(src.input)
    del dst.output[:]
    dst.output.extend(src.output)


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def one_layer_model(layer: Layer, choice: Choice, factors: list[np.ndarray] | None,
                    opset: int = 17, int8: str = "dynamic", samples: list[np.ndarray] | None = None) -> onnx.ModelProto:
    """The layer alone at its real activation shape, dense or rewritten: what gets timed. A
    static `+int8` choice calibrates its activation ranges on `samples` (inputs of the layer), or
    for timing alone, where values do not matter, on a few random ones."""
    dtype = onnx.helper.np_dtype_to_tensor_dtype(layer.dtype)
    x = onnx.helper.make_tensor_value_info("x", dtype, list(layer.activation_shape))
    y = onnx.helper.make_tensor_value_info("y", dtype, list(layer.output_shape))
    inits = [onnx.numpy_helper.from_array(layer.weight, "W")]
    bias_input = []
    if layer.bias is not None:
        inits.append(onnx.numpy_helper.from_array(layer.bias, "b"))
        bias_input = ["b"]
    nodes: list[onnx.NodeProto]
    if layer.op == "Conv":
        attrs = conv_geometry(layer, layer.weight.shape[2:])
        nodes = [onnx.helper.make_node("Conv", ["x", "W", *bias_input], ["y"], **attrs)]
    elif layer.op == "Gemm":
        nodes = [onnx.helper.make_node("Gemm", ["x", "W", *bias_input], ["y"],
                                       transA=layer.attrs.get("transA", 0))]
    elif layer.side == "left":
        nodes = [onnx.helper.make_node("MatMul", ["W", "x"], ["y"])]
    elif layer.bias is not None:
        nodes = [onnx.helper.make_node("MatMul", ["x", "W"], ["h"]), onnx.helper.make_node("Add", ["h", "b"], ["y"])]
    else:
        nodes = [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = onnx.helper.make_graph(nodes, layer.name, [x], [y], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, max_ir_version())
    if not choice.changes:
        return model
    local = dataclasses.replace(layer, input="x", output="y", node_outputs=tuple(n.output[0] for n in nodes), scope=())
    plan = Plan({layer.name: choice}, int8=int8)
    if choice.int8 and int8 == "static" and samples is None:
        rng = np.random.default_rng(0)
        samples = [rng.standard_normal(layer.activation_shape).astype(layer.dtype) for _ in range(2)]
    return rewrite_model(model, {layer.name: local}, plan, {layer.name: factors} if factors else None,
                         samples=None if samples is None else [{"x": s} for s in samples])


# ------------------------------------------------------------------------------------- INT8

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def weight_nodes(graph: gs.Graph, layer) -> list[gs.Node]:
    """The nodes that hold a layer's (a pair's: both layers') weights once it is rewritten: its
    chain's MatMul/Gemm/Conv (named `<layer>/<method>/...`, passes/chain.py), or the original
    node when it is kept dense. A node without a name gets one: quantization selects by name."""
    found = []
    for part in (layer.producer, layer.consumer) if hasattr(layer, "consumer") else (layer,):
        prefix = f"{part.name}/"
        for node in graph.nodes:
            if node.op not in WEIGHT_OPS or not node.outputs:
                continue
            if node.name.startswith(prefix) or node.outputs[0].name in part.node_outputs:
                if not node.name:
                    node.name = f"{part.name}/{node.op}"
                found.append(node)
    return found


def quantize(model: onnx.ModelProto, nodes: dict[str, list[gs.Node]], original: onnx.GraphProto,
             mode: str = "dynamic", samples: list[dict] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with these nodes' weights (by layer) in INT8; only these nodes, so an INT8 layer can
    sit beside float ones. Also returns the layers onnxruntime.quantization left (partly) float.
    `mode` dynamic: QInt8 weights, activations quantized at run time (MatMulInteger /
    ConvInteger); static: QDQ, activation ranges calibrated on `samples` (feeds of the model).

    Weights are scaled per output channel: as fast as one scale per tensor, and far more accurate
    where a few columns are large (MiniLM-L6, every weight MatMul in INT8: cosine 99.31 per
    channel, 96.40 per tensor, at the same speed)."""
    # it reads weights from stored initializers only (a Constant node's output makes it raise)
    stored = {layer: found for layer, found in nodes.items()
              if found and all(isinstance(n.inputs[1], gs.Constant) for n in found)}
    # quantize_dynamic first turns every Gemm into MatMul + Add, the MatMul named <gemm>_MatMul
    names = {layer: [n.name for n in found] + [f"{n.name}_MatMul" for n in found if n.op == "Gemm"]
             for layer, found in stored.items()}
    chosen = [n for found in names.values() for n in found]
    if not names:
        out = model
    elif mode == "static":
        out = quantize_static(model, chosen, samples)
    else:
        out = quantize_dynamic(model, chosen, per_channel=True)
    # a chosen node still there as MatMul/Gemm/Conv is float unless a DequantizeLinear feeds its weight (QDQ)
    dequantized = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    still_float = {n.name for n in out.graph.node if n.op_type in WEIGHT_OPS and n.input[1] not in dequantized}
    _keep_interface(original, out.graph)
    return out, sorted(layer for layer in nodes if layer not in names or still_float & set(names[layer]))


def quantize_dynamic(model: onnx.ModelProto, nodes: list[str] | None = None, per_channel: bool = False) -> onnx.ModelProto:
    """onnxruntime.quantization.quantize_dynamic (QInt8 weights, its defaults otherwise) of these
    nodes, or of every node it takes (None: what a user runs as "INT8" instead of this tool)."""
    from onnxruntime import quantization

    def run(src, dst, big):
        quantization.quantize_dynamic(src, dst, weight_type=quantization.QuantType.QInt8, nodes_to_quantize=nodes,
                                      per_channel=per_channel, use_external_data_format=big)
    return _through_files(model, run)


def quantize_static(model: onnx.ModelProto, nodes: list[str], samples: list[dict] | None) -> onnx.ModelProto:
    """onnxruntime.quantization.quantize_static of these nodes in QDQ form (what TensorRT reads):
    weights QInt8 per output channel, activations QUInt8 with MinMax ranges over `samples`."""
    from onnxruntime import quantization

    if not samples:
        raise UserError("static INT8 calibrates its activation ranges on data: give --data, or use --int8 dynamic")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.left = iter(samples)

        def get_next(self):
            return next(self.left, None)

    def run(src, dst, big):
        quantization.quantize_static(src, dst, Reader(), quant_format=quantization.QuantFormat.QDQ,
                                     op_types_to_quantize=list(WEIGHT_OPS), nodes_to_quantize=nodes, per_channel=True,
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8, use_external_data_format=big)
    return _through_files(model, run)


def _through_files(model: onnx.ModelProto, run) -> onnx.ModelProto:
    """run(src, dst, big) on the model saved in a temporary folder, and what it wrote, loaded."""
    import logging
    import tempfile

    big = model.ByteSize() >= PROTOBUF_LIMIT
    root = logging.getLogger()      # onnxruntime.quantization advises pre-processing through the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="denseflex-int8-") as tmp:
            src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, src, save_as_external_data=big, location="float.onnx.data")
            run(src, dst, big)
            out = onnx.load(dst)
    finally:
        root.setLevel(level)
    out.ir_version = min(out.ir_version, model.ir_version)
    return out
