"""Validation and calibration data (CLI.md, Data): an .npz, or random inputs when none is given."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import UserError
from .model import LoadedModel, fixed_dim, graph_inputs

log = logging.getLogger("denseflex_onnx")

SYMBOLIC_BATCH_CHUNK = 64


@dataclass
class Dataset:
    arrays: dict[str, np.ndarray]      # per input, dim 0 = samples
    fixed: dict[str, np.ndarray]       # inputs fed whole to every chunk (no sample dim)
    labels: np.ndarray | None
    synthetic: bool = False

    @property
    def samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0] if self.arrays else 0

    def take(self, start: int, stop: int) -> "Dataset":
        return Dataset({k: v[start:stop] for k, v in self.arrays.items()}, self.fixed,
                       None if self.labels is None else self.labels[start:stop], self.synthetic)

    def pick(self, indices: np.ndarray) -> "Dataset":
        return Dataset({k: v[indices] for k, v in self.arrays.items()}, self.fixed,
                       None if self.labels is None else self.labels[indices], self.synthetic)


def _input_types(model: LoadedModel) -> dict[str, tuple[np.dtype, list]]:
    out = {}
    for info in graph_inputs(model.proto):
        t = info.type.tensor_type
        dims = [fixed_dim(d) for d in t.shape.dim]          # -1 or 0 (as Paddle writes) is symbolic
        if not t.HasField("shape") and info.name in model.input_shapes:
            dims = list(model.input_shapes[info.name])     # no shape declared: --input-shape's is the shape
        out[info.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)
    return out


def load_data(path: str | Path, model: LoadedModel) -> Dataset:
    """Read an .npz and check it against the model's inputs; UserError naming what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except Exception:
        raise UserError(f"--data {path}: not an .npz file of arrays (write one with numpy.savez)") from None
    types = _input_types(model)
    missing = [name for name in types if name not in raw]
    if missing:
        raise UserError(f"--data {path}: no array for input {', '.join(missing)} "
                        f"(it has {', '.join(raw) or 'none'}; name arrays after the model's inputs)")
    arrays, fixed = {}, {}
    for name, (dtype, dims) in types.items():
        array = raw[name]
        if np.issubdtype(dtype, np.floating) != np.issubdtype(array.dtype, np.floating):
            raise UserError(f"--data {path}: array {name} is {array.dtype}, the input is {dtype}")
        array = array.astype(dtype, copy=False)
        # fed whole: the array is the input's whole (resolved) shape, and dim 0 is fixed, so not
        # a sample dim (silero's state [2, batch, 128], given as --input-shape state:2x1x128)
        concrete = list(model.input_shapes.get(name, dims))
        if (not dims or dims[0] is not None) and list(array.shape) == concrete and (not dims or dims[0] != 1):
            fixed[name] = array
            continue
        if array.ndim != len(dims) or any(d is not None and d != a for d, a in zip(dims[1:], array.shape[1:])):
            want = "x".join("?" if d is None else str(d) for d in ["samples", *dims[1:]])
            raise UserError(f"--data {path}: array {name} has shape {list(array.shape)}, the input takes {want}")
        arrays[name] = array
    if not arrays:
        raise UserError(f"--data {path}: no array has a sample dim")
    counts = {a.shape[0] for a in arrays.values()}
    if len(counts) > 1:
        raise UserError(f"--data {path}: arrays hold different sample counts {sorted(counts)}")
    labels = raw.get("labels")
    samples = counts.pop()
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != samples:
            raise UserError(f"--data {path}: labels has shape {list(labels.shape)}, expected [{samples}]")
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"--data {path}: labels must be integer class ids, not {labels.dtype}")
    return Dataset(arrays, fixed, labels)


def synthetic_data(model: LoadedModel, samples: int, seed: int = 0) -> Dataset:
    """Random normal floats; integer ids within the table a Gather reads them from."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (dtype, dims) in _input_types(model).items():
        shape = [samples, *model.input_shapes[name][1:]]
        if np.issubdtype(dtype, np.floating):
            arrays[name] = rng.standard_normal(shape).astype(dtype)
            continue
        table = _gather_table_size(model, name)
        if table is None:
            raise UserError(f"input {name} is {dtype} and no embedding table bounds its values: "
                            f"give real inputs with --data FILE.npz")
        arrays[name] = rng.integers(0, table, size=shape).astype(dtype)
    log.warning("no --data: random inputs; the metric is fidelity to the original model only")
    return Dataset(arrays, {}, None, synthetic=True)


def _gather_table_size(model: LoadedModel, name: str) -> int | None:
    inits = {i.name: i for i in model.proto.graph.initializer}
    readers = {name}
    for node in model.proto.graph.node:        # follow Cast/Unsqueeze on the way to the Gather
        if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Identity") and node.input and node.input[0] in readers:
            readers.add(node.output[0])
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in readers and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def split(data: Dataset, calib_samples: int) -> tuple[Dataset, Dataset]:
    """The first `calib_samples` calibrate; the rest (disjoint) judge accuracy."""
    n = data.samples
    if n < 2:
        raise UserError(f"the data holds {n} sample; at least 2 are needed (calibration and evaluation)")
    calib = min(calib_samples, n // 2) if calib_samples >= n else calib_samples
    if calib < calib_samples:
        log.warning("the data holds %d samples: %d calibrate and %d evaluate", n, calib, n - calib)
    return data.take(0, calib), data.take(calib, n)


def batching(model: LoadedModel, fed_whole=()) -> tuple[int, bool]:
    """(chunk size, fixed?): a fixed batch b runs in chunks of b; a symbolic batch in chunks of 64,
    or of the batch it is profiled at when an input fed whole has a symbolic dim too.

    Inputs fed whole to every chunk (`fed_whole`: no sample dim) do not set the batch.
    """
    inputs = graph_inputs(model.proto)
    # a whole-fed input with a symbolic dim of its own (an RNN state [2, batch, 128]) may be
    # tied to the batch: then run at the batch it was given for, as profiling does
    tied = any(info.name in fed_whole and any(fixed_dim(d) is None for d in info.type.tensor_type.shape.dim)
               for info in inputs)
    for info in inputs:
        if info.name in fed_whole:
            continue
        dims = info.type.tensor_type.shape.dim
        if dims and fixed_dim(dims[0]) is not None:
            return dims[0].dim_value, True
        if tied and info.name in model.input_shapes:
            return model.input_shapes[info.name][0], False
    return SYMBOLIC_BATCH_CHUNK, False


def feeds(data: Dataset, model: LoadedModel):
    """Feed dicts of one chunk each; a tail that does not fill a fixed batch is dropped."""
    size, fixed = batching(model, data.fixed)
    n = data.samples
    usable = (n // size) * size if fixed else n
    if usable < n:
        log.warning("%d samples do not fill the model's fixed batch of %d: dropped", n - usable, size)
    for start in range(0, usable, size):
        chunk = {k: v[start:start + size] for k, v in data.arrays.items()}
        chunk.update(data.fixed)
        yield chunk
