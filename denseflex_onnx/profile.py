"""Stage 4, measure: time candidates as one-layer models, and whole models, with onnxruntime.

Timings are cached on disk (one small JSON file per measurement, written atomically,
so runs can share a cache folder) under a key of everything that changes a timing:
the layer's signature, the config, provider, threads, onnxruntime version and CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import Dataset, feeds
from .model import LoadedModel, atomic_write_bytes, first_line
from .runtime import create_session, device_of, input_dtypes


@dataclass(frozen=True)
class Timing:
    median: float      # seconds
    p90: float
    runs: int


@dataclass(frozen=True)
class Budget:
    """How long one measurement may take: warm-up runs, at least min_runs, then until
    max_runs or max_seconds."""
    warmup: int = 3
    min_runs: int = 5
    max_runs: int = 200
    max_seconds: float = 0.5


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "denseflex-onnx" / "profiles"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Cache:
    """Timings on disk; `None` folder = no cache."""

    def __init__(self, folder: Path | None, provider: str, threads: int):
        self.folder = folder
        self.context = {"provider": provider, "threads": threads, "onnxruntime": ort.__version__,
                        "cpu": cpu_model()}

    def key(self, what: dict) -> str:
        text = json.dumps({**self.context, **what}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, what: dict) -> Timing | None:
        if self.folder is None:
            return None
        path = self.folder / f"{self.key(what)}.json"
        try:
            data = json.loads(path.read_text())
            return Timing(data["median"], data["p90"], data["runs"])
        except (OSError, ValueError, KeyError, TypeError):
            return None          # missing or damaged: measure again

    def put(self, what: dict, timing: Timing) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {"median": timing.median, "p90": timing.p90, "runs": timing.runs, "what": what, **self.context}
        atomic_write_bytes(self.folder / f"{self.key(what)}.json", json.dumps(data, default=str).encode())


def time_session(session: ort.InferenceSession, inputs: dict[str, np.ndarray], provider: str,
                 budget: Budget = Budget()) -> Timing:
    """Warm-up, then repeats bounded by count and time; inputs and outputs bound on the device."""
    device = device_of(provider)
    binding = session.io_binding()
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))

    def bind_outputs() -> None:
        binding.clear_binding_outputs()
        for out in session.get_outputs():
            binding.bind_output(out.name, device)

    bind_outputs()
    session.run_with_iobinding(binding)
    # After a run the binding holds the outputs it allocated, and onnxruntime checks such
    # pre-allocated outputs against the shapes the model declares: where those are stale
    # (an exporter's wrong output rank, which a plain run only warns about) the next run
    # fails. Such a model gets fresh outputs each run, bound outside the timed span.
    fresh = not declared_shapes_fit(session, binding)
    for _ in range(budget.warmup - 1):
        if fresh:
            bind_outputs()
        session.run_with_iobinding(binding)
    times = []
    start = time.perf_counter()
    while len(times) < budget.max_runs and (len(times) < budget.min_runs
                                            or time.perf_counter() - start < budget.max_seconds):
        if fresh:
            bind_outputs()
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return Timing(float(np.median(times)), float(np.percentile(times, 90)), len(times))


def declared_shapes_fit(session: ort.InferenceSession, binding: ort.IOBinding) -> bool:
    """Do the outputs of the last run have the rank and fixed dims the model declares?"""
    for declared, value in zip(session.get_outputs(), binding.get_outputs()):
        dims = declared.shape
        if dims is None:
            continue                      # no shape declared: nothing to check against
        actual = value.shape()
        if len(dims) != len(actual) or any(isinstance(d, int) and d > 0 and d != a
                                           for d, a in zip(dims, actual)):
            return False
    return True


def random_inputs(session: ort.InferenceSession, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype in input_dtypes(session).items():
        if np.issubdtype(dtype, np.floating):
            out[name] = rng.standard_normal(shapes[name]).astype(dtype)
        else:
            out[name] = np.zeros(shapes[name], dtype=dtype)
    return out


def time_model(model: onnx.ModelProto | str | os.PathLike, inputs: dict[str, np.ndarray], provider: str,
               threads: int, budget: Budget = Budget(), engine_cache: Path | None = None) -> Timing:
    session = create_session(model, provider, threads, engine_cache)
    return time_session(session, inputs, provider, budget)


def profiling_inputs(model: LoadedModel, data: Dataset | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the --input-shape shapes: the first samples of the data, or random ones."""
    shapes = model.input_shapes
    if data is not None and data.samples:
        chunk = next(feeds(data, model))
        out = {}
        for name, array in chunk.items():
            want = shapes[name]
            if tuple(array.shape) == tuple(want):
                out[name] = array
            elif array.ndim == len(want) and all(a >= w for a, w in zip(array.shape, want)):
                out[name] = np.ascontiguousarray(array[tuple(slice(0, w) for w in want)])
            else:        # the data is smaller than the profiling batch: repeat its samples
                reps = [int(np.ceil(w / a)) for a, w in zip(array.shape, want)]
                out[name] = np.ascontiguousarray(np.tile(array, reps)[tuple(slice(0, w) for w in want)])
        return out
    session = create_session(model.proto)
    return random_inputs(session, shapes, seed)


@dataclass
class MeasureStats:
    timed: int = 0          # measured in this run
    cached: int = 0         # read from the cache
    failed: int = 0
    skipped_budget: int = 0


# model-guided timing: per layer and method, these candidates are timed up front (fewest and most
# FLOPs, and the middle one); the others get a lower bound from a line through them, and are
# timed only when the solver picks one (search.solve), so it never trusts a guess
ANCHORS = 3
# the bound is the line's prediction less this share, or less twice the line's worst miss on
# the anchors where that is more (MiniLM-L6, 1 x 64 tokens: svd latency is within a few % of
# linear in FLOPs; per-call overheads make small layers less so)
BOUND_MARGIN = 0.25


def measure_space(space, layers: dict, factors, cache: Cache, provider: str, threads: int,
                  budget: Budget = Budget(), deadline: float | None = None, opset: int = 17,
                  engine_cache: Path | None = None, on_candidate=None, warn=None,
                  keys: tuple[str, ...] = ("latency", "params", "flops", "error"), prune: bool = True,
                  pairs: dict | None = None, lazy: bool = False, int8: str = "dynamic") -> MeasureStats:
    """Times every surviving candidate (`lazy`: only the anchors, see ANCHORS); layers alike
    (same signature) are timed once, and a timing in the cache is read, not measured again.

    A pair candidate (prune, `pairs` by producer) is timed as its two layers at the channels
    kept, each alone like a dense layer: its latency is their sum, against the sum of the two
    dense layers (the elementwise ops between, which pruning also shrinks, are not counted).

    `int8`: how `+int8` candidates are quantized (rewrite.quantize), part of their cache key.

    `lazy`: a candidate other than the anchors gets `latency` = a lower bound of it and
    `latency_bound` = True; `space.timer` times such candidates (or reads them from the cache)
    when the solver needs them.

    Stage 3 then drops candidates dominated on `keys`: the figures the constraints and
    the objective use (latency and error always); a bound never dominates.
    After `deadline` (time.monotonic()) nothing new is timed: those candidates are dropped
    as not timed, cached ones still count. A candidate whose timing fails is reported
    through `warn` and dropped; the search goes on without it.
    """
    from .plan import DENSE
    from .space import DOMINATED_TIMED, NOT_TIMED, TIMING_FAILED, dominated_by_group

    stats = MeasureStats()
    measured: dict[tuple, Timing | None] = {}

    def take(cand, counted: bool = True) -> bool:
        """Time `cand` (or read it); False if it is left without a latency."""
        if cand.covers:
            part_choice = dataclasses.replace(DENSE, int8=cand.choice.int8)
            units = [(part, part_choice) for part in pairs[cand.layer].layers_at(cand.choice.config["keep"])]
        else:
            units = [(layers[cand.layer], cand.choice)]
        total = []
        for layer, choice in units:
            total.append(_measure(layer, choice, cand, factors, measured, cache, stats, provider, threads,
                                  budget, deadline, opset, engine_cache, warn, int8))
            if total[-1] is None:
                break
        if total[-1] is None:
            cand.dropped = NOT_TIMED if deadline is not None and time.monotonic() > deadline else TIMING_FAILED
            return False
        cand.latency, cand.p90, cand.latency_bound = sum(t.median for t in total), sum(t.p90 for t in total), False
        if on_candidate and counted:
            on_candidate(cand)
        return True

    # dense first: every layer needs its baseline even when time runs out
    for cand in [c for c in space.all() if c.is_dense]:
        take(cand)
    alive = [c for c in space.all() if c.dropped is None and not c.is_dense]
    if not lazy:
        for cand in alive:
            take(cand)
    else:
        groups: dict[tuple, list] = {}
        for cand in alive:
            groups.setdefault((cand.layer, cand.choice.method, cand.choice.int8), []).append(cand)
        for group in groups.values():
            group.sort(key=lambda c: (c.flops, c.params))
            for i in sorted({round(k * (len(group) - 1) / max(ANCHORS - 1, 1)) for k in range(ANCHORS)}):
                take(group[i])
            # bounds even where the cache holds a timing: the search then takes the same path
            # whatever the cache holds, so a warm run reaches the cold run's plan
            rest = [c for c in group if c.dropped is None and c.latency is None]
            if deadline is not None and time.monotonic() > deadline:
                for cand in rest:       # a bound no timing can replace is of no use to the solver
                    cand.dropped = NOT_TIMED
                    stats.skipped_budget += 1
            else:
                _bound(rest, [c for c in group if c.latency is not None and not c.latency_bound])

        def timer(cands) -> None:
            for cand in cands:
                if cand.latency_bound and cand.dropped is None and not take(cand, counted=False):
                    cand.latency_bound = False       # dropped: the solver goes on without it
        space.timer = timer
    for name in space.candidates:
        for cand in dominated_by_group(space.alive(name), keys) if prune else []:
            cand.dropped = DOMINATED_TIMED
    space.stage_counts["after_timing"] = sum(len(space.alive(n)) for n in space.candidates)
    return stats


def _bound(cands: list, anchors: list) -> None:
    """Lower bounds of `cands`' latencies (space.Candidate) from a line in FLOPs through the
    `anchors`' measured ones, and from the fewest-FLOPs anchor below each (latency grows with
    FLOPs within a layer's method)."""
    x = np.array([a.flops for a in anchors], dtype=float)
    y = np.array([a.latency for a in anchors], dtype=float)
    line = len(set(x.tolist())) >= 2
    if line:
        slope, offset = np.polyfit(x, y, 1)
        fit = offset + slope * x
        margin = min(max(BOUND_MARGIN, 2 * float(np.max(np.abs(y - fit) / np.maximum(fit, 1e-12)))), 1.0)
    for cand in cands:
        bound = max((offset + slope * cand.flops) * (1 - margin), 0.0) if line else 0.0
        below = [a.latency for a in anchors if a.flops <= cand.flops]
        if below:
            bound = max(bound, min(below) * (1 - BOUND_MARGIN))
        cand.latency, cand.p90, cand.latency_bound = bound, None, True


def _measure(layer, choice, cand, factors, measured: dict, cache: Cache, stats: MeasureStats, provider: str,
             threads: int, budget: Budget, deadline, opset: int, engine_cache, warn, int8: str = "dynamic"
             ) -> Timing | None:
    """One one-layer model's timing, from this run's memo, the cache, or measured now; None when
    it failed or time ran out (counted in `stats`, reported through `warn`)."""
    from .rewrite import one_layer_model
    dense = choice.method == "dense"
    spec = choice.spec
    what = {"signature": repr(layer.signature()), "spec": spec, "opset": opset}
    if choice.int8 and int8 != "dynamic":       # dynamic keys stay as the first INT8 timings were stored
        what["int8"] = int8
    key = (what["signature"], spec)
    if key in measured:
        return measured[key]
    timing = cache.get(what)
    if timing is not None:
        stats.cached += 1
    elif deadline is not None and time.monotonic() > deadline and not cand.is_dense:
        stats.skipped_budget += 1
        timing = None
    else:
        try:
            chosen = None if dense else factors.factors(layer, choice)
            model = one_layer_model(layer, choice, chosen, opset, int8=int8)
            session = create_session(model, provider, threads, engine_cache)
            timing = time_session(session, random_inputs(session, {"x": layer.activation_shape}), provider, budget)
            cache.put(what, timing)
            stats.timed += 1
        except Exception as exc:    # one candidate's failure must not end the search
            stats.failed += 1
            timing = None
            if warn:
                warn(f"timing {cand.layer} {cand.spec} failed: {first_line(exc)}")
    measured[key] = timing
    return timing
