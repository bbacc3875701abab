"""ONNX files and graphs: reading, checking, shape inference, writing (loading.py runs stage 1 on them)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from .errors import UserError

log = logging.getLogger("denseflex_onnx")

# Protobuf cannot serialize a message over 2 GiB: bigger models are handed to
# checkers and onnxruntime by path.
PROTOBUF_LIMIT = 2**31 - 1

_SHAPE_LIST_RE = re.compile(r",\s*(?=[^,\[\]]*:)")      # a comma that starts the next NAME:
_SHAPE_RE = re.compile(r"^\s*\[?\s*(\d+(?:\s*[x,]\s*\d+)*)\s*\]?\s*$")


@dataclass
class LoadedModel:
    path: Path
    proto: onnx.ModelProto          # the file as read, weights loaded (inferred shapes stay out)
    sha256: str
    input_shapes: dict[str, tuple[int, ...]]   # the concrete shapes it is profiled at
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor shape known
    external_data: bool = False     # weights stored beside the file: outputs keep them so

    @property
    def opset(self) -> int:
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0

    @property
    def ir_version(self) -> int:
        return self.proto.ir_version

    @property
    def byte_size(self) -> int:
        return weight_bytes(self.proto)


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`NAME:1x128` or `NAME:[1,128]`, repeatable (CLI.md, Shapes); one flag may also list
    several, comma-separated (`a:1x64,b:1x64`), as users of other tools guess."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in (part for given in specs or [] for part in _SHAPE_LIST_RE.split(given)):
        name, sep, dims = spec.rpartition(":")
        match = _SHAPE_RE.match(dims)
        if not sep or not name or not match:
            raise UserError(f"--input-shape {spec!r}: expected NAME:1x128 or NAME:[1,128]")
        shapes[name] = tuple(int(d) for d in re.split(r"\s*[x,]\s*", match.group(1)))
        if any(d <= 0 for d in shapes[name]):
            raise UserError(f"--input-shape {spec!r}: every dim must be a positive integer")
    return shapes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """Read and check an ONNX file with its external data; UserError if it is not one.

    Returns the model and whether its weights were stored externally.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an .onnx file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty, expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise UserError(f"{path}: not an ONNX model or a truncated one ({first_line(exc)})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise UserError(f"{path}: not an ONNX model (no graph or no IR version)")
    external = uses_external_data(model)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise UserError(f"{path}: its external weight data cannot be read ({first_line(exc)})") from None
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:
        raise UserError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    return model, external


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old IR versions also list initializers as inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def fixed_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A dim's size when the model fixes it; None when it is symbolic or unknown.

    Exporters write a dynamic dim as dim_value -1 (Paddle) or 0: those are not sizes.
    """
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _dim_label(dim: onnx.TensorShapeProto.Dimension, unknown: str = "unknown") -> str:
    """How a message names a dim that is not fixed: its symbol, -1 or 0 as written, or `unknown`."""
    if dim.HasField("dim_value"):
        return str(dim.dim_value)
    return dim.dim_param or unknown


def resolve_input_shapes(model: onnx.ModelProto,
                         given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: the model's own dims, `--input-shape` for the rest.

    A symbolic leading dim defaults to 1 with a warning; any other unresolved dim
    is an error naming the input, the dim and the flag. A dim_value of -1 or 0 is
    symbolic too (fixed_dim).
    """
    inputs = {i.name: i for i in graph_inputs(model)}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise UserError(f"--input-shape names {', '.join(unknown)}, which the model has no input of; "
                        f"its inputs are {', '.join(inputs) or 'none'}")
    shapes = {}
    for name, info in inputs.items():
        dims = info.type.tensor_type.shape.dim
        if name in given:
            shape = given[name]
            if len(shape) != len(dims):
                raise UserError(f"--input-shape {name}: {len(shape)} dims given, the model's input "
                                f"has {len(dims)}")
            for i, d in enumerate(dims):
                if fixed_dim(d) is not None and d.dim_value != shape[i]:
                    raise UserError(f"--input-shape {name}: dim {i} is fixed at {d.dim_value} in the "
                                    f"model, {shape[i]} given")
            shapes[name] = tuple(shape)
            continue
        shape = []
        for i, d in enumerate(dims):
            if fixed_dim(d) is not None:
                shape.append(d.dim_value)
            elif i == 0:
                log.warning("input %s: dim 0 (%s) is symbolic; using 1 (set it with "
                            "--input-shape %s:...)", name, _dim_label(d, "?"), name)
                shape.append(1)
            else:
                raise UserError(f"input {name}: dim {i} ({_dim_label(d)}) is not fixed; "
                                f"give it with --input-shape {name}:1x...")
        shapes[name] = tuple(shape)
    return shapes


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of the model whose inputs have these concrete dims (for shape inference).

    Dims written as -1 or 0 anywhere else (outputs, value_info, bodies) become unknown:
    onnx would take them for sizes and clash with what it infers.
    """
    fixed = copy.deepcopy(model)
    for graph in all_graphs(fixed.graph):
        for info in [*graph.input, *graph.value_info, *graph.output]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                for d in info.type.tensor_type.shape.dim:
                    if d.HasField("dim_value") and d.dim_value <= 0:
                        d.Clear()
    for info in fixed.graph.input:
        if info.name in shapes:
            dims = info.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[info.name]):
                d.Clear()
                d.dim_value = v
    return fixed


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every tensor onnx's shape inference can resolve at these input shapes."""
    fixed = with_input_shapes(without_big_data(model) if model.ByteSize() >= PROTOBUF_LIMIT else model,
                              input_shapes)
    try:
        fixed = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as exc:
        log.warning("shape inference failed (%s); shapes will be measured", first_line(exc))
    shapes: dict[str, tuple[int, ...]] = {}
    for graph in all_graphs(fixed.graph):
        for info in [*graph.input, *graph.value_info, *graph.output]:
            if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
                continue
            dims = info.type.tensor_type.shape.dim
            if all(fixed_dim(d) is not None for d in dims):
                shapes[info.name] = tuple(d.dim_value for d in dims)
        for init in graph.initializer:
            shapes[init.name] = tuple(init.dims)
    return shapes


BIG_TENSOR = 1 << 26      # 64 MiB: tensors this big are weights, never shapes or indices


def without_big_data(model: onnx.ModelProto, stubs: bool = True) -> onnx.ModelProto:
    """A copy of the model without the data of its big initializers: with `stubs` they keep
    their type and dims (enough for shape inference), else they are left out. Small enough
    to serialize, which over 2 GB the model is not."""
    skeleton = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, name, getattr(model, name))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        if tensor_bytes(init) >= BIG_TENSOR:
            if not stubs:
                continue
            stub = graph.initializer.add()
            stub.name, stub.data_type = init.name, init.data_type
            stub.dims.extend(init.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL      # no data here, by design
            stub.external_data.add(key="location", value="stripped")
        else:
            graph.initializer.append(init)
    return skeleton


def all_graphs(graph: onnx.GraphProto):
    """The graph and every If/Loop/Scan body in it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_graphs(sub)


def node_bodies(node: onnx.NodeProto):
    """The bodies a control-flow node holds (If branches, a Loop or Scan body)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of constant tensors in the model, If/Loop/Scan bodies included: what `--memory`
    counts (a voice-activity detector keeps every weight inside If branches)."""
    total = 0
    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            total += tensor_bytes(init)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        total += tensor_bytes(attr.t)
    return total


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for messages that must stay one line."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def check_output_path(out: Path, inputs: list[Path], force: bool, *related: Path) -> None:
    """Refuse before any work: the input as output, an existing file without --force, a bad folder."""
    out = Path(out)
    for path in inputs:
        if path.exists() and out.resolve() == Path(path).resolve():
            raise UserError(f"-o {out} is the input model; choose another output path")
    if out.is_dir():
        raise UserError(f"-o {out} is a folder; give a file path such as {out / 'model.onnx'}")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"-o {out}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise UserError(f"-o {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"-o {out}: folder {folder} is not writable")
    if not force:
        existing = [p for p in (out, *related) if p.exists()]
        if existing:
            raise UserError(f"{existing[0]} exists; pass --force to overwrite it")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.

    The temporary name is fixed before the file exists, so an interrupt that lands anywhere
    (Ctrl-C between mkstemp's return and a try block left one behind in a fresh-clone CI run)
    leaves nothing; the file gets the user's umask, as any file they write would.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_model(model: onnx.ModelProto, path: Path, external: bool = False) -> list[Path]:
    """Save atomically; weights go to `<name>.data` beside it when asked or when over 2 GB.

    Returns the files written.
    """
    path = Path(path)
    external = external or model.ByteSize() >= PROTOBUF_LIMIT
    if not external:
        atomic_write_bytes(path, model.SerializeToString())
        return [path]
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent or ".") as tmp:
        save_external(model, os.path.join(tmp, path.name), data_name)
        os.replace(os.path.join(tmp, data_name), path.parent / data_name)
        os.replace(os.path.join(tmp, path.name), path)
    return [path, path.parent / data_name]


def save_external(model: onnx.ModelProto, path: str, data_name: str) -> None:
    """onnx.save_model with the weights in `data_name` beside `path`, leaving `model` whole.

    onnx moves the weights out of the proto it saves: a small model is copied first; a big
    one (a copy would double the memory) gets its weights read back from the file."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        model = copy.deepcopy(model)
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.load_external_data_for_model(model, os.path.dirname(path))


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
