"""Calibration statistics: what each layer's inputs look like on real data.

The original model runs once over the calibration samples, chunk by chunk, with
every layer's input as an extra output; per layer only X^T X, the sum and the sum
of |x| are kept (float64), never the activations themselves. Within a memory budget
(plan_statistics): a layer whose X^T X is too big to keep, or too costly for what it
serves, keeps a low-rank sketch of it instead (sketch.py), and the passes fit against
either through the same operations.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from . import costs
from .constraints import format_bytes
from .data import Dataset, feeds
from .layers import Layer, explicit_pads
from .model import LoadedModel
from .runtime import create_session
from .sketch import LowRankGram, NystromSketch

log = logging.getLogger("denseflex_onnx")


@dataclass
class LayerStats:
    gram: "np.ndarray | LowRankGram"   # X^T X over input vectors (im2col patches for Conv) [K, K]
    total: np.ndarray       # sum of x [K]
    total_abs: np.ndarray   # sum of |x| [K]
    count: int              # vectors seen

    @property
    def kind(self) -> str:
        return "sketch" if isinstance(self.gram, LowRankGram) else "full"

    @functools.cached_property
    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (descending, clipped at 0) and eigenvectors of a full X^T X, computed once."""
        values, vectors = np.linalg.eigh(self.gram)
        order = np.argsort(values)[::-1]
        return np.maximum(values[order], 0.0), vectors[:, order]

    def sketch(self, rows: int | None = None) -> np.ndarray:
        """X~ [rows, K] with X~^T X~ = X^T X (exactly, or its leading directions when rows < K
        or the statistics are themselves a sketch)."""
        if isinstance(self.gram, LowRankGram):
            return self.gram.rows(rows)
        values, vectors = self.eigen
        rows = len(values) if rows is None else min(rows, len(values))
        return np.sqrt(values[:rows])[:, None] * vectors[:, :rows].T

    def expected(self, centered: bool) -> "LayerStats":
        """These statistics with X^T X replaced by what it is expected to be on unseen inputs,
        the matrix a data-aware factorization should minimize the output error against.

        centered: the mean's part removed, for layers whose bias correction cancels the mean
        output error (then the rank goes to what varies, not to a constant shift).
        Shrunk toward the isotropic matrix of the same trace, with weight d / (d + n) for n
        rows in d dims, i.e. as if d isotropic rows were added: with fewer rows than dims the
        raw X^T X is singular, and a factorization fitted to it is exact on the calibration
        rows and poor off them (MNIST MLP, 128 images in 784 dims, whitened rank 8 in every
        layer: 57% accuracy against 85% shrunk and 88% plain on held-out images). n counts
        input vectors (Conv patches, tokens), so conv layers and transformers are barely shrunk.
        `total` stays the raw sum: the bias correction needs the raw mean.
        """
        d = len(self.gram)
        weight = d / (d + self.count)
        gram = self.observed(centered).gram
        if isinstance(gram, LowRankGram):
            return LayerStats(gram.shrunk(weight), self.total, self.total_abs, self.count)
        gram = (1 - weight) * gram + weight * (float(np.trace(gram)) / max(d, 1)) * np.eye(d)
        return LayerStats(gram, self.total, self.total_abs, self.count)

    def __add__(self, other: "LayerStats") -> "LayerStats":
        """The statistics of both sets of inputs together (full X^T X only: sketches do not add)."""
        return LayerStats(self.gram + other.gram, self.total + other.total, self.total_abs + other.total_abs,
                          self.count + other.count)

    def observed(self, centered: bool) -> "LayerStats":
        """These statistics as measured, centered or not: what an error on these very inputs
        (held-out ones, say) is computed on, where `expected` is what a fit should use."""
        if not centered:
            return self
        if isinstance(self.gram, LowRankGram):
            gram = self.gram.minus_outer(self.total, 1 / max(self.count, 1))
        else:
            gram = self.gram - np.outer(self.total, self.total) / max(self.count, 1)
        return LayerStats(gram, self.total, self.total_abs, self.count)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.total_abs / max(self.count, 1)


def stats_to_arrays(stats: dict[str, LayerStats]) -> dict[str, np.ndarray]:
    """Per-layer statistics as flat named arrays (the results cache stores them as .npz)."""
    out = {"names": np.array(list(stats), dtype=str)}
    for i, s in enumerate(stats.values()):
        if isinstance(s.gram, LowRankGram):
            out.update({f"{i}.sigma": np.array(s.gram.sigma), f"{i}.basis": s.gram.basis, f"{i}.values": s.gram.values})
        else:
            out[f"{i}.gram"] = s.gram
        out.update({f"{i}.total": s.total, f"{i}.total_abs": s.total_abs, f"{i}.count": np.array(s.count)})
    return out


def stats_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, LayerStats]:
    """stats_to_arrays undone, bit for bit."""
    out = {}
    for i, name in enumerate(arrays["names"].tolist()):
        gram = arrays[f"{i}.gram"] if f"{i}.gram" in arrays else \
            LowRankGram(float(arrays[f"{i}.sigma"]), arrays[f"{i}.basis"], arrays[f"{i}.values"])
        out[name] = LayerStats(gram, arrays[f"{i}.total"], arrays[f"{i}.total_abs"], int(arrays[f"{i}.count"]))
    return out


class Pooled(Mapping):
    """Per layer, the statistics of two disjoint parts of the calibration samples summed when
    asked for (then `rest`'s, for layers collected whole), so a run that scores layer errors
    on one part (scoring_parts) and fits its plans on both holds two copies, not three."""

    def __init__(self, first: dict, second: dict, rest: dict):
        self.first, self.second, self.rest = first, second, rest

    def __getitem__(self, name: str) -> LayerStats:
        if name in self.first:
            return self.first[name] + self.second[name]
        return self.rest[name]

    def __iter__(self):
        return iter([*self.first, *(n for n in self.rest if n not in self.first)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


# calibration samples below which no part is held out to score layer errors on
SCORING_MIN_SAMPLES = 16


def scoring_parts(data: Dataset) -> tuple[Dataset, Dataset] | None:
    """Every other calibration sample: (the part layer candidates are fitted on to be scored,
    the part they are scored on), or None with too few samples to split."""
    if data.samples < SCORING_MIN_SAMPLES:
        return None
    n = data.samples
    return data.pick(np.arange(0, n, 2)), data.pick(np.arange(1, n, 2))


# ----------------------------------------------------------------------------- memory budget

# Above this many inputs a full X^T X costs more to accumulate (2 K^2 flops a row) and to
# factor (K^3) than the layers it serves are worth: the small CREPE pitch tracker's Conv of
# Cin*kh*kw = 8,192 took 14 of its 15 minutes for a layer of 33 MFLOPs.
FULL_GRAM_MAX_INPUTS = 4096
# a full X^T X is copied a few times while it is fitted (centered, shrunk, its Cholesky root)
FULL_GRAM_WORKING_COPIES = 4
SKETCH_MIN_RANK = 64
BLOCK_BYTES = 64 << 20          # im2col rows materialized at a time


@dataclass(frozen=True)
class Representation:
    """How one layer's input statistics are kept, and why."""
    kind: str                   # full | sketch | none
    rank: int                   # sketched directions (0 unless sketch)
    bytes: int                  # what it holds while the model runs
    why: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "bytes": self.bytes, "why": self.why}


def default_memory_budget() -> int:
    """Half of the memory available now (the rest is the model, onnxruntime and the OS)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if ":" in line}
        available = info.get("MemAvailable", info.get("MemFree"))
    except (OSError, ValueError, IndexError):
        available = None
    if not available:
        import os
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(available // 2)


def plan_statistics(layers: list[Layer], budget: int, ranks: dict[str, int]) -> dict[str, Representation]:
    """Per layer, the statistics that fit: the full X^T X for narrow layers, else a sketch at
    the largest rank any of its candidates uses (at least SKETCH_MIN_RANK), else none (the
    layer is then fitted plainly). Narrow layers are served first; one layer's working copies
    are counted on top of what all layers hold, since layers are fitted one at a time."""
    out: dict[str, Representation] = {}
    held = peak_extra = 0
    for layer in sorted(layers, key=lambda l: (as_inputs(l), l.name)):
        k = as_inputs(layer)
        full = 8 * k * k
        if k <= FULL_GRAM_MAX_INPUTS and held + full + max(peak_extra, FULL_GRAM_WORKING_COPIES * full) <= budget:
            out[layer.name] = Representation("full", 0, full, f"X^T X of {k} inputs fits")
            held, peak_extra = held + full, max(peak_extra, FULL_GRAM_WORKING_COPIES * full)
            continue
        rank = min(k, max(2 * ranks.get(layer.name, 0), SKETCH_MIN_RANK))
        need = NystromSketch.bytes_needed(k, rank)
        reason = (f"{k} inputs: X^T X would take {format_bytes(full)}" if k > FULL_GRAM_MAX_INPUTS else
                  f"X^T X ({format_bytes(full)}) does not fit the memory budget {format_bytes(budget)}")
        if rank < k and held + need + peak_extra <= budget:
            out[layer.name] = Representation("sketch", rank, need, f"{reason}; sketched at rank {rank}")
            held += need
            continue
        out[layer.name] = Representation("none", 0, 0, f"{reason}, and a rank-{rank} sketch "
                                         f"({format_bytes(need)}) does not fit either: fitted plainly")
    return out


def as_inputs(layer: Layer) -> int:
    """K: the length of the input vectors the weight multiplies."""
    return layer.matrix_shape[0]


def input_blocks(layer: Layer, x: np.ndarray, max_bytes: int | None = BLOCK_BYTES, mask: np.ndarray | None = None):
    """The layer's input as the rows its weight matrix multiplies ([rows, K]), in blocks of at
    most `max_bytes` (float64), so a wide Conv's im2col patches (65,536 inputs a row) never
    exist all at once. `mask` (the leading dims of x, e.g. [batch, tokens]) drops the rows it
    marks 0."""
    x = x.astype(np.float64, copy=False)
    if layer.op == "Conv":
        kernel, strides, dilations = layer.weight.shape[2:], layer.attrs["strides"], layer.attrs["dilations"]
        pads = explicit_pads(x.shape, kernel, strides, dilations, layer.attrs.get("auto_pad", "NOTSET"),
                             layer.attrs["pads"])
        yield from im2col_blocks(x, kernel, strides, pads, dilations, max_bytes)
        return
    if layer.side == "left":
        rows = np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
    elif layer.attrs.get("transA"):
        rows = x.T
    else:
        rows = x.reshape(-1, x.shape[-1])
        if mask is not None and mask.shape == x.shape[:-1]:
            rows = rows[mask.reshape(-1) != 0]
    step = len(rows) if max_bytes is None else max(1, max_bytes // (8 * rows.shape[1]))
    for start in range(0, len(rows), step):
        yield rows[start:start + step]


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """Patches [N*out_pixels, C*prod(kernel)] in the order of weight.reshape(Cout, -1)."""
    return np.concatenate(list(im2col_blocks(x, kernel, strides, pads, dilations, None)))


def im2col_blocks(x: np.ndarray, kernel, strides, pads, dilations, max_bytes: int | None):
    """im2col's rows in blocks: a view of the padded input is sliced per sample and per run of
    output rows, and only each block is copied out."""
    nd = len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + nd)))
    picks = (slice(None), slice(None), *(slice(None, None, s) for s in strides),
             *(slice(None, None, d) for d in dilations))
    windows = windows[picks]                                   # [N, C, *out, *kernel]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    patches = windows.transpose(order)                         # [N, *out, C, *kernel], a view
    k = x.shape[1] * costs.prod(kernel)
    if max_bytes is None:
        yield patches.reshape(-1, k)
        return
    out_rows = patches.shape[1]                                # the first output dim
    per_out_row = costs.prod(patches.shape[2:1 + nd]) * k * 8
    samples = max_bytes // max(per_out_row * out_rows, 1)
    if samples >= 1:                                           # whole samples at a time
        for n in range(0, patches.shape[0], samples):
            yield patches[n:n + samples].reshape(-1, k)
        return
    step = max(1, max_bytes // max(per_out_row, 1))
    for n in range(patches.shape[0]):
        for start in range(0, out_rows, step):
            yield patches[n, start:start + step].reshape(-1, k)


def collect(model: LoadedModel, layers: list[Layer], data: Dataset, provider: str = "CPUExecutionProvider",
            threads: int = 1, on_chunk=None,
            representations: dict[str, Representation] | None = None) -> dict[str, LayerStats]:
    """Runs the original model over `data` and accumulates each layer's input statistics, kept
    as `representations` says (default: the full X^T X for every layer); layers planned
    "none" get no statistics."""
    body = [layer.name for layer in layers if layer.scope]
    if body:
        log.warning("%d layer(s) inside If/Loop bodies: their activations cannot be captured, "
                    "so they are factorized plainly (%s)", len(body), ", ".join(body[:3]))
    representations = representations or {}
    layers = [layer for layer in layers if not layer.scope
              and representations.get(layer.name, FULL).kind != "none"]
    if not layers or data.samples == 0:
        return {}
    wanted = sorted({layer.input for layer in layers})
    session = tapped_session(model.proto, wanted, provider, threads)
    sums: dict[str, _Sums] = {}
    for chunk in feeds(data, model):
        values = dict(zip(wanted, session.run(wanted, chunk)))
        mask = chunk.get(TOKEN_MASK)
        for layer in layers:
            for rows in input_blocks(layer, values[layer.input], mask=mask):
                if layer.name not in sums:
                    sums[layer.name] = _Sums(rows.shape[1], representations.get(layer.name, FULL))
                sums[layer.name].add(rows)
        if on_chunk:
            on_chunk()
    return {name: s.stats() for name, s in sums.items()}


def tapped_session(proto: onnx.ModelProto, tensors, provider: str = "CPUExecutionProvider", threads: int = 1):
    """A session of the model that also outputs these inner tensors (run it asking for them)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(proto)
    present = {o.name for o in tapped.graph.output}
    tapped.graph.output.extend(onnx.ValueInfoProto(name=n) for n in tensors if n not in present)
    return create_session(tapped, provider, threads)


FULL = Representation("full", 0, 0, "")
# Transformers' padding: token rows this input marks 0 are left out of the statistics (their
# activations are never read, yet they would weigh as much as real tokens in X^T X)
TOKEN_MASK = "attention_mask"


class _Sums:
    """One layer's running sums: X^T X (or its sketch), sum x, sum |x|, rows seen."""

    def __init__(self, k: int, representation: Representation):
        self.gram = np.zeros((k, k)) if representation.kind == "full" else None
        self.sketch = NystromSketch(k, representation.rank) if representation.kind == "sketch" else None
        self.total, self.total_abs, self.count = np.zeros(k), np.zeros(k), 0

    def add(self, rows: np.ndarray) -> None:
        if self.sketch is not None:
            self.sketch.add(rows)
        else:
            self.gram += rows.T @ rows
        self.total += rows.sum(axis=0)
        self.total_abs += np.abs(rows).sum(axis=0)
        self.count += rows.shape[0]

    def stats(self) -> LayerStats:
        gram = self.sketch.gram() if self.sketch is not None else self.gram
        return LayerStats(gram, self.total, self.total_abs, self.count)


@dataclass
class Anchored:
    """One layer's inputs in the partly rewritten model (X~) beside the original's (X), row by
    row: X~^T X~, X~^T X and the sums (sequential.py)."""
    gram_tilde: np.ndarray
    cross: np.ndarray
    total_tilde: np.ndarray
    total: np.ndarray
    total_abs_tilde: np.ndarray
    count: int
    # where a residual Add sums the layer's output with R: X~^T (R - R~) and the sum of R - R~,
    # what the original's residual stream has that the rewritten one lost (sequential.py)
    gap_cross: np.ndarray | None = None
    gap_total: np.ndarray | None = None

    def stats(self) -> LayerStats:
        """X~'s statistics, what the anchored layer is fitted on."""
        return LayerStats(self.gram_tilde, self.total_tilde, self.total_abs_tilde, self.count)


def collect_anchored(model: LoadedModel, rewritten: onnx.ModelProto, layers: list[Layer], data: Dataset,
                     provider: str = "CPUExecutionProvider", threads: int = 1,
                     residuals: Mapping[str, str] | None = None) -> dict[str, Anchored]:
    """Runs the original model and `rewritten` (the same interface, these layers' input tensors
    kept) over `data` chunk by chunk, accumulating each layer's Anchored sums. `residuals`
    (layer name -> the tensor a residual Add sums with its output) adds the residual gap."""
    layers = [layer for layer in layers if not layer.scope]
    if not layers or data.samples == 0:
        return {}
    residuals = {n: r for n, r in (residuals or {}).items() if n in {layer.name for layer in layers}}
    wanted = sorted({layer.input for layer in layers} | set(residuals.values()))
    sessions = [tapped_session(proto, wanted, provider, threads) for proto in (model.proto, rewritten)]
    # layers that multiply the very same rows (a transformer's Q, K and V) share their sums; rows
    # are gathered over chunks before they are multiplied: one sentence's tokens at a time (a
    # batch of 1, padding dropped) made ~20-row products that ran at a fraction of BLAS's speed
    groups: dict[tuple, list[Layer]] = {}
    for layer in layers:
        key = (layer.name,) if layer.op == "Conv" else (layer.input, layer.side, bool(layer.attrs.get("transA")))
        groups.setdefault(key, []).append(layer)
    sums: dict[tuple, Anchored] = {}
    gaps: dict[str, list] = {}
    pending: dict[tuple, list] = {key: [] for key in groups}
    held = dict.fromkeys(groups, 0)        # bytes of X rows pending per group
    unaligned: set[str] = set()

    def flush(key: tuple) -> None:
        blocks = pending[key]
        if not blocks:
            return
        held[key] = 0
        x, xt = np.vstack([b[0] for b in blocks]), np.vstack([b[1] for b in blocks])
        k = x.shape[1]
        s = sums.setdefault(key, Anchored(np.zeros((k, k)), np.zeros((k, k)), np.zeros(k), np.zeros(k),
                                          np.zeros(k), 0))
        s.gram_tilde += xt.T @ xt
        s.cross += xt.T @ x
        s.total_tilde += xt.sum(axis=0)
        s.total += x.sum(axis=0)
        s.total_abs_tilde += np.abs(xt).sum(axis=0)
        s.count += x.shape[0]
        for layer in groups[key]:
            if layer.name in residuals and layer.name not in unaligned:
                g = np.vstack([b[2][layer.name] for b in blocks])
                acc = gaps.setdefault(layer.name, [np.zeros((k, g.shape[1])), np.zeros(g.shape[1])])
                acc[0] += xt.T @ g
                acc[1] += g.sum(axis=0)
        blocks.clear()

    for chunk in feeds(data, model):
        original = dict(zip(wanted, sessions[0].run(wanted, chunk)))
        tilde = dict(zip(wanted, sessions[1].run(wanted, chunk)))
        mask = chunk.get(TOKEN_MASK)
        for key, members in groups.items():
            first = members[0]
            gap = {}
            for layer in members:
                if layer.name in residuals and layer.name not in unaligned:
                    r = residuals[layer.name]
                    gap[layer.name] = output_rows(layer, original[r] - tilde[r], mask)
            start = 0
            for x, xt in zip(input_blocks(first, original[first.input], mask=mask),
                             input_blocks(first, tilde[first.input], mask=mask)):
                for name in [n for n, g in gap.items() if g.shape[0] < start + len(x)]:
                    unaligned.add(name)     # fewer output rows than input rows: not the layer's rows
                    del gap[name]
                pending[key].append((x, xt, {n: g[start:start + len(x)] for n, g in gap.items()}))
                start += len(x)
                held[key] += x.nbytes
                if held[key] >= BLOCK_BYTES // 8:
                    flush(key)
            for name, g in gap.items():
                if g.shape[0] != start:     # a broadcasting Add: its rows are not the layer's output rows
                    unaligned.add(name)
    out: dict[str, Anchored] = {}
    for key, members in groups.items():
        flush(key)
        if key not in sums:
            continue
        for layer in members:
            s = sums[key]
            gap = gaps.get(layer.name) if layer.name not in unaligned else None
            out[layer.name] = Anchored(s.gram_tilde.copy(), s.cross.copy(), s.total_tilde.copy(), s.total.copy(),
                                       s.total_abs_tilde.copy(), s.count,
                                       None if gap is None else gap[0], None if gap is None else gap[1])
    return out


def output_rows(layer: Layer, y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """A tensor shaped like the layer's output as rows [rows, N], in input_blocks' row order
    (a Conv's: one per output pixel, sample by sample)."""
    y = y.astype(np.float64, copy=False)
    if layer.op == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]) if y.ndim >= 2 else y.reshape(0, 1)
    rows = y.reshape(-1, y.shape[-1]) if y.ndim else y.reshape(1, 1)
    if mask is not None and mask.shape == y.shape[:-1]:
        rows = rows[mask.reshape(-1) != 0]
    return rows
