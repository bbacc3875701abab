"""Stage 3, space (its INT8 axis): every candidate may also be taken with INT8 weights.

onnxruntime.quantization does the quantizing (rewrite.quantize, only the chosen layers' nodes:
dynamic QInt8 weights per channel with activations quantized at run time, or static QDQ with
activation ranges calibrated on the data). Here the space gets, beside
each candidate that survived pruning, its `+int8` variant: the same params (a quarter of the
bytes: Candidate.weight_size) and FLOPs, timed like any candidate (a one-layer model with its
quantize nodes), so an INT8 op that is slower than float on this machine (ConvInteger on many
CPUs) is simply not chosen.

Its error: the float candidate's and the layer's own quantization error, added as independent
energies, sqrt(e^2 + q^2). q is measured once per layer with onnxruntime, not assumed: the layer
alone (rewrite.one_layer_model), float and dense+int8, run on the inputs it receives in the
original model on the first calibration samples, at the profiling batch (dynamic quantization
scales each activation tensor by its own range, so the batch it runs at matters):
    q = ||Y_int8 - Y|| / ||Y - mean Y||      (/ ||Y|| where the bias is not corrected: plain)
the scale of the float candidates' errors (space.Factors). A pair's variant quantizes both of
its layers: q^2 of the producer plus q^2 of the consumer. The sensitivity slopes then weigh q as
they weigh every error of that layer, and the verification of each plan end to end judges them.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from .calibrate import TOKEN_MASK, output_rows, tapped_session
from .data import Dataset, feeds
from .layers import Layer
from .model import LoadedModel
from .plan import DENSE, UNQUANTIZABLE, int8_refusal
from .runtime import create_session
from .space import Space

log = logging.getLogger("denseflex_onnx")

MODES = ("off", "dynamic", "static")
# calibration samples the quantization errors are measured on (the sensitivity probes' count)
SAMPLES = 64


def layer_errors(model: LoadedModel, layers: list[Layer], data: Dataset, mode: str,
                 threads: int = 1, int8: str = "dynamic") -> dict[str, float]:
    """Each layer's relative output error with INT8 weights and inputs (see the module's text),
    by name; a layer onnxruntime cannot quantize (in the model as it is: int8_left_float), or
    whose inputs do not split into profiling batches, is left out (it gets no INT8 variant).
    `int8` static: the layer's activation range is calibrated on the inputs it is scored on."""
    from .rewrite import int8_left_float, one_layer_model

    layers = [l for l in layers if int8_refusal(l) is None]
    if not layers or data.samples == 0:
        return {}
    left = set(int8_left_float(model.proto, {l.name: l for l in layers}))
    if left:
        log.info("no INT8 variant for %d layer(s) onnxruntime's quantizer leaves in float: %s", len(left),
                 ", ".join(sorted(left)[:5]))
        layers = [l for l in layers if l.name not in left]
        if not layers:
            return {}
    wanted = sorted({l.input for l in layers})
    session = tapped_session(model.proto, wanted, threads=threads)
    models: dict[str, tuple] = {}
    sums: dict[str, _Energy] = {}
    skipped: set[str] = set()
    for chunk in feeds(data.take(0, min(SAMPLES, data.samples)), model):
        values = dict(zip(wanted, session.run(wanted, chunk)))
        mask = chunk.get(TOKEN_MASK)
        for layer in layers:
            x, batch = values[layer.input], layer.activation_shape[0]
            if layer.name in skipped or x.shape[1:] != tuple(layer.activation_shape[1:]) or x.shape[0] % batch:
                skipped.add(layer.name)
                continue
            pieces = [np.ascontiguousarray(x[i:i + batch]) for i in range(0, x.shape[0], batch)]
            if layer.name not in models:
                try:
                    models[layer.name] = tuple(
                        create_session(one_layer_model(layer, choice, None, int8=int8, samples=pieces),
                                       "CPUExecutionProvider", threads)
                        for choice in (DENSE, dataclasses.replace(DENSE, int8=True)))
                except Exception as exc:       # onnxruntime.quantization's limits: that layer stays float
                    log.info("%s: no INT8 variant (%s)", layer.name, exc)
                    skipped.add(layer.name)
                    continue
            total = sums.setdefault(layer.name, _Energy())
            for i, part in zip(range(0, x.shape[0], batch), pieces):
                y, yq = (s.run(None, {"x": part})[0] for s in models[layer.name])
                rows = None if mask is None else mask[i:i + batch]
                total.add(output_rows(layer, y, rows), output_rows(layer, yq, rows))
    # centered as space.Factors scores the float candidates: where the bias is corrected
    centered = {l.name: mode != "plain" and l.side != "left" for l in layers}
    errors = {name: e.relative(centered[name]) for name, e in sums.items() if name not in skipped and e.count}
    return {name: q for name, q in errors.items() if math.isfinite(q)}


@dataclasses.dataclass
class _Energy:
    """Running sums for ||Yq - Y||^2 against ||Y||^2 and ||Y - mean Y||^2 (float64)."""
    error: float = 0.0
    square: float = 0.0
    total: np.ndarray | float = 0.0
    count: int = 0

    def add(self, y: np.ndarray, yq: np.ndarray) -> None:
        y = y.astype(np.float64)
        self.error += float(np.sum((yq.astype(np.float64) - y) ** 2))
        self.square += float(np.sum(y * y))
        self.total = self.total + y.sum(axis=0)
        self.count += len(y)

    def relative(self, centered: bool) -> float:
        reference = self.square - (float(np.sum(np.square(self.total))) / self.count if centered else 0.0)
        return math.sqrt(self.error / reference) if reference > 0 else math.inf


def add_variants(space: Space, errors: dict[str, float]) -> int:
    """Beside each candidate still in the space (dense included) of a layer with a measured
    error, its `+int8` variant; a candidate forced to `+int8` (--layer X=svd:8+int8) gets the
    quantization error added. Returns how many were added (counted in every pruning stage:
    they are built after pruning, which only a measured latency can prune further)."""
    added = 0
    for name, cands in space.candidates.items():
        for cand in list(cands):
            parts = (cand.layer, *cand.covers)
            if cand.dropped is not None or any(p not in errors for p in parts) or cand.choice.method in UNQUANTIZABLE:
                continue
            error = math.sqrt((0.0 if cand.is_dense else cand.error) ** 2 + sum(errors[p] ** 2 for p in parts))
            if cand.choice.int8:                # forced: its error so far was the float one's
                cand.error = error
                continue
            if space.dense(name).dropped:       # another choice forced (--layer): nothing to add beside it
                continue
            cands.append(dataclasses.replace(cand, choice=dataclasses.replace(cand.choice, int8=True), error=error,
                                             latency=None, latency_bound=False, p90=None))
            added += 1
    for stage in ("grid", "after_saves_nothing", "after_dominated"):
        space.stage_counts[stage] = space.stage_counts.get(stage, 0) + added
    return added
