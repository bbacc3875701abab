"""Calibration statistics: what each layer's inputs look like on real data.

The original model runs once over the calibration samples, chunk by chunk, with
every layer's input as an extra output; per layer only X^T X, the sum and the sum
of |x| are kept (float64), never the activations themselves.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from . import costs
from .data import Dataset, feeds
from .layers import Layer, explicit_pads
from .model import LoadedModel
from .runtime import create_session

log = logging.getLogger("denseflex_onnx")


@dataclass
class LayerStats:
    gram: np.ndarray        # X^T X over input vectors (im2col patches for Conv) [K, K]
    total: np.ndarray       # sum of x [K]
    total_abs: np.ndarray   # sum of |x| [K]
    count: int              # vectors seen

    @functools.cached_property
    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (descending, clipped at 0) and eigenvectors of X^T X, computed once."""
        values, vectors = np.linalg.eigh(self.gram)
        order = np.argsort(values)[::-1]
        return np.maximum(values[order], 0.0), vectors[:, order]

    def sketch(self, rows: int | None = None) -> np.ndarray:
        """X~ [rows, K] with X~^T X~ = X^T X (exactly, or its leading directions when rows < K)."""
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
        gram = self.gram - np.outer(self.total, self.total) / max(self.count, 1) if centered else self.gram
        d = len(gram)
        weight = d / (d + self.count)
        gram = (1 - weight) * gram + weight * (float(np.trace(gram)) / max(d, 1)) * np.eye(d)
        return LayerStats(gram, self.total, self.total_abs, self.count)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.total_abs / max(self.count, 1)


def input_vectors(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as rows the weight matrix multiplies: [rows, K]."""
    x = x.astype(np.float64, copy=False)
    if layer.op == "Conv":
        kernel, strides, dilations = layer.weight.shape[2:], layer.attrs["strides"], layer.attrs["dilations"]
        pads = explicit_pads(x.shape, kernel, strides, dilations, layer.attrs.get("auto_pad", "NOTSET"),
                             layer.attrs["pads"])
        return im2col(x, kernel, strides, pads, dilations)
    if layer.side == "left":
        return np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
    if layer.attrs.get("transA"):
        return x.T
    return x.reshape(-1, x.shape[-1])


def im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """Patches [N*out_pixels, C*prod(kernel)] in the order of weight.reshape(Cout, -1)."""
    nd = len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + nd)))
    picks = (slice(None), slice(None), *(slice(None, None, s) for s in strides),
             *(slice(None, None, d) for d in dilations))
    windows = windows[picks]                                   # [N, C, *out, *kernel]
    order = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return windows.transpose(order).reshape(-1, x.shape[1] * costs.prod(kernel))


def collect(model: LoadedModel, layers: list[Layer], data: Dataset, provider: str = "CPUExecutionProvider",
            threads: int = 1, on_chunk=None) -> dict[str, LayerStats]:
    """Runs the original model over `data` and accumulates each layer's input statistics."""
    body = [layer.name for layer in layers if layer.scope]
    if body:
        log.warning("%d layer(s) inside If/Loop bodies: their activations cannot be captured, "
                    "so they are factorized plainly (%s)", len(body), ", ".join(body[:3]))
    layers = [layer for layer in layers if not layer.scope]
    if not layers or data.samples == 0:
        return {}
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model.proto)
    present = {o.name for o in tapped.graph.output}
    wanted = sorted({layer.input for layer in layers})
    for name in wanted:
        if name not in present:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
    session = create_session(tapped, provider, threads)
    stats: dict[str, LayerStats] = {}
    for chunk in feeds(data, model):
        values = dict(zip(wanted, session.run(wanted, chunk)))
        for layer in layers:
            rows = input_vectors(layer, values[layer.input])
            k = rows.shape[1]
            s = stats.setdefault(layer.name, LayerStats(np.zeros((k, k)), np.zeros(k), np.zeros(k), 0))
            s.gram += rows.T @ rows
            s.total += rows.sum(axis=0)
            s.total_abs += np.abs(rows).sum(axis=0)
            s.count += rows.shape[0]
        if on_chunk:
            on_chunk()
    return stats
