"""The Python API: the pipeline load -> find -> space -> measure -> choose -> write.

The CLI calls these functions, so the API and the CLI give the same plan on the
same inputs and cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import sensitivity as sens
from . import calibrate, data as data_mod, layers as layers_mod, metrics, model as model_mod, profile, report, search, space as space_mod
from . import int8 as int8_mod, loading, pairs as pairs_mod, results as results_mod, verify
from .constraints import Constraints, METRICS, format_bytes, parse_memory_budget
from .errors import UserError
from .passes import PASSES
from .plan import (CALIBRATIONS, DENSE, FACTORIZATIONS, INT8_SUFFIX, Choice, Plan, int8_refusal, parse_layer_option,
                   parse_spec, read_plan)
from .runtime import create_session, resolve_provider

log = logging.getLogger("denseflex_onnx")

SYNTHETIC_EVAL_SAMPLES = 128


class Progress:
    """No-op progress; the CLI passes one that draws rich progress bars."""

    def task(self, description: str, total: int | None):
        return contextlib.nullcontext(lambda n=1: None)


@dataclass
class Result:
    status: str                          # "ok" | "infeasible"
    plan: Plan
    report: dict
    files: list[Path] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.status == "ok"


def parse_time_budget(text: str | None) -> float | None:
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise UserError(f"--time-budget {text!r}: use e.g. 90s, 10m or 1h") from None


# ---------------------------------------------------------------------------------------- inspect

def inspect(path, input_shapes: dict | None = None) -> dict:
    """The `inspect --json` object of CLI.md."""
    loaded = loading.load(path, input_shapes)
    found = layers_mod.find_layers(loaded)
    return {
        "model": str(path), "opset": loaded.opset, "ir_version": loaded.ir_version,
        "inputs": {k: list(v) for k, v in loaded.input_shapes.items()},
        "layers": [{"name": l.name, "op": l.op, "weight_shape": list(l.weight.shape),
                    "activation_shape": list(l.activation_shape), "params": int(l.params), "flops": int(l.flops),
                    "params_share": round(l.params_share, 6), "flops_share": round(l.flops_share, 6)}
                   for l in found.layers],
        "skipped": [{"name": s.name, "op": s.op, "reason": s.reason} for s in found.skipped],
        "totals": {"params": int(found.total_params), "flops": int(found.total_flops)},
        "pairs": [p.to_json() for p in pairs_mod.find_pairs(loaded, found).pairs],
    }


# ------------------------------------------------------------------------------------------ shared

@dataclass
class _Prepared:
    loaded: model_mod.LoadedModel
    layers: dict[str, layers_mod.Layer]
    discovery: layers_mod.Discovery

    @functools.cached_property
    def pairs(self) -> pairs_mod.PairDiscovery:
        """Layer pairs (prune), found when a spec or plan asks for them."""
        return pairs_mod.find_pairs(self.loaded, self.discovery)


def _check_counts(**values) -> None:
    """--threads, --jobs, --calib-samples and --max-verifications at least 1, --seed and --top-k at least 0."""
    least = {"threads": 1, "jobs": 1, "calib_samples": 1, "seed": 0, "top_k": 0, "max_verifications": 1}
    for name, value in values.items():
        if value is not None and value < least[name]:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {least[name]}")


def _prepare(path, input_shapes) -> _Prepared:
    loaded = loading.load(path, input_shapes)
    found = layers_mod.find_layers(loaded)
    if not found.layers:
        reasons = "; ".join(sorted({s.reason for s in found.skipped})) or "no Gemm, MatMul or Conv node"
        raise UserError(f"{path}: nothing to factorize ({reasons})")
    return _Prepared(loaded, {l.name: l for l in found.layers}, found)


def _dataset(loaded, data_path, calib_samples: int, seed: int):
    if data_path is not None:
        dataset = data_mod.load_data(data_path, loaded)
    else:
        dataset = data_mod.synthetic_data(loaded, calib_samples + SYNTHETIC_EVAL_SAMPLES, seed)
    return data_mod.split(dataset, calib_samples)


def _factorization(requested: str | None, data_path) -> str:
    if requested is None:
        return "whitened" if data_path is not None else "plain"
    if requested not in FACTORIZATIONS:
        raise UserError(f"--factorization {requested!r}: use one of {', '.join(FACTORIZATIONS)}")
    return requested


def _calibration(requested: str | None, factorization: str) -> str:
    """Independent unless sequential is asked for: on MiniLM-L6 sequential fits better on held-out
    sentences (svd:192 in every layer 91.67 against 90.96, prune:864 in every FFN 96.25 against
    95.81) but every verified plan is then fitted stage by stage, and `optimize --flops -20%`
    took 8-10 minutes instead of about 2; a plain plan has no data to fit on."""
    if requested is not None and requested not in CALIBRATIONS:
        raise UserError(f"--calibration {requested!r}: use one of {', '.join(CALIBRATIONS)}")
    if factorization == "plain":
        if requested == "sequential":
            raise UserError("--calibration sequential fits layers on data: give --data (or --factorization "
                            "whitened/scaled)")
        return "independent"
    return requested or "independent"


def _memory_budget(text) -> int:
    """--memory-budget in bytes; by default half of the memory available now."""
    if text is None:
        return calibrate.default_memory_budget()
    return parse_memory_budget(text)


def _cannot_pay_off(prep: _Prepared, forced: dict, methods) -> dict[str, str]:
    """Layers kept dense before any statistics or decomposition is computed for them."""
    out = {}
    for name, layer in prep.layers.items():
        reason = None if name in forced else space_mod.cannot_pay_off(layer, methods)
        if reason:
            out[name] = reason
    return out


def _statistics_plan(prep: _Prepared, forced: dict, methods, budget: int, pairs: list = (),
                     score_apart: bool = False) -> tuple[list, dict]:
    """The layers that need calibration statistics (those that may be rewritten, and the
    consumers of the pairs that may be pruned) and how each is kept within the memory budget
    (calibrate.plan_statistics); with score_apart the X^T X kept whole is held twice (two
    halves of the samples), so each half gets half the budget."""
    refitted = {c.consumer for c in forced.values() if c.consumer} | {p.consumer.name for p in pairs}
    wanted = [l for n, l in prep.layers.items() if n not in forced or forced[n].method != "dense" or n in refitted]
    representations = calibrate.plan_statistics(
        [l for l in wanted if not l.scope], budget // 2 if score_apart else budget,
        {l.name: space_mod.largest_rank(l, methods) for l in wanted})
    for name, r in representations.items():
        if r.kind == "none":
            log.warning("%s: no calibration statistics (%s); --memory-budget raises the limit", name, r.why)
    return wanted, representations


def _statistics(prep: _Prepared, calib, wanted: list, representations: dict, budget: int, threads: int,
                progress: Progress, results: results_mod.Results, score_apart: bool = False):
    """Calibration statistics of the `wanted` layers, kept as `representations` says; a layer
    left without them is fitted plainly, with a warning naming it. Returns (statistics plans are
    fitted on, those candidates are fitted on to be scored, those they are scored on).

    score_apart: layers whose X^T X is kept whole are collected on two halves of the samples
    (calibrate.scoring_parts), candidates fitted on one and scored on the other, plans fitted on
    both; each half holds a copy. Otherwise the first two are the same statistics and none are
    held out. What an earlier run with the same inputs collected comes from `results`."""
    parts = calibrate.scoring_parts(calib) if score_apart else None
    whole = [l for l in wanted if parts is None or representations.get(l.name, calibrate.FULL).kind != "full"]
    apart = [l for l in wanted if l not in whole]
    size, _ = data_mod.batching(prep.loaded, calib.fixed)
    runs = [(whole, calib, "all")] * bool(whole) + \
        ([(apart, part, which) for part, which in zip(parts, ("even", "odd"))] if apart else [])
    stored = [results.get_arrays("statistics", {"layers": [l.name for l in layers], "samples": which})
              for layers, _, which in runs]
    chunks = sum(math.ceil(data.samples / size) for (_, data, _), kept in zip(runs, stored) if kept is None)
    collected = []
    with progress.task(f"calibration activations (memory budget {format_bytes(budget)})", chunks) as advance:
        for (layers, data, which), kept in zip(runs, stored):
            if kept is not None:
                collected.append(calibrate.stats_from_arrays(kept))
                continue
            stats = calibrate.collect(prep.loaded, layers, data, provider="CPUExecutionProvider",
                                      threads=threads, on_chunk=advance, representations=representations)
            results.put_arrays("statistics", {"layers": [l.name for l in layers], "samples": which},
                               calibrate.stats_to_arrays(stats))
            collected.append(stats)
    rest = collected[0] if whole else {}
    if not apart:
        return rest, rest, {}
    fitted, held_out = collected[-2:]
    return calibrate.Pooled(fitted, held_out, rest), {**rest, **fitted}, held_out


def _forced(prep: _Prepared, layer_specs, exclude) -> dict[str, Choice]:
    forced: dict[str, Choice] = {}
    for name in exclude or []:
        if name not in prep.layers:
            raise UserError(f"--exclude {name}: no such layer (see `denseflex-onnx inspect`)")
        forced[name] = DENSE
    for text in layer_specs or []:
        name, spec = parse_layer_option(text)
        if name not in prep.layers:
            raise UserError(f"--layer {name}: no such layer (see `denseflex-onnx inspect`)")
        forced[name] = parse_spec(prep.layers[name], spec, prep.pairs)
    for name, choice in list(forced.items()):
        if choice.consumer:         # a pruned pair rewrites its consumer: that one stays as the pair leaves it
            other = forced.get(choice.consumer, DENSE)
            if other.method != "dense":
                raise UserError(f"--layer {name}={choice.spec} rewrites {choice.consumer} too (the pair's "
                                f"consumer): it cannot also take {other.spec}")
            forced[choice.consumer] = DENSE
    return forced


# ------------------------------------------------------------------------------------------- apply


def _blas_threads(threads: int):
    """numpy/scipy's BLAS limited to the run's thread count: on a shared machine an
    oversubscribed BLAS made decompositions several times slower, and timings noisier."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=max(int(threads), 1), user_api="blas")


def apply(path, out, **options) -> dict:
    """Rewrite the model by a plan, per-layer specs or one spec for all; writes `out` atomically."""
    with _blas_threads(1):
        return _apply(path, out, **options)


def _apply(path, out, *, plan_path=None, layer_specs=None, all_spec=None, data=None, force=False,
          input_shapes=None, calib_samples: int = 128, seed: int = 0, memory_budget=None,
          factorization=None, calibration=None, int8=None) -> dict:
    path, out = Path(path), Path(out)
    if plan_path is not None and (layer_specs or all_spec):
        raise UserError("--plan takes no --layer or --all: edit the plan, or use --all/--layer alone")
    if plan_path is None and not layer_specs and not all_spec:
        raise UserError("give --plan PLAN.json, --layer NAME=SPEC (repeatable) or --all SPEC")
    model_mod.check_output_path(out, [path], force)
    budget_bytes = _memory_budget(memory_budget)
    prep = _prepare(path, input_shapes)
    notes: list[str] = []
    if plan_path is not None:
        plan = read_plan(plan_path, prep.layers, prep.pairs)
        if plan.model_sha256 and plan.model_sha256 != prep.loaded.sha256:
            log.warning("the plan was made for another model file (sha256 differs); applying it by layer name")
        if factorization is not None and factorization != plan.factorization:
            raise UserError(f"{plan_path} is a {plan.factorization} plan: --factorization {factorization} "
                            f"would not give the model it describes; drop the flag")
        if plan.factorization != "plain" and data is None:
            raise UserError(f"{plan_path} is a {plan.factorization} (data-aware) plan: give the calibration data "
                            f"with --data to re-apply it")
        if calibration is not None and calibration != plan.calibration:
            raise UserError(f"{plan_path} is a {plan.calibration}ly calibrated plan: --calibration {calibration} "
                            f"would not give the model it describes; drop the flag")
        if int8 is not None and plan.quantized() and int8 != plan.int8:
            raise UserError(f"{plan_path} quantizes its +int8 layers {plan.int8}: --int8 {int8} would not give the "
                            f"model it describes; drop the flag")
    else:       # --all for every layer it fits, then --layer overrides (`--layer head=dense`)
        plan, notes = _plan_for_all(prep, all_spec) if all_spec else (Plan({}, "plain"), [])
        plan.layers.update(_forced(prep, layer_specs, None))
        plan.factorization = _factorization(factorization, data)     # whitened with --data, as optimize
        plan.calibration = _calibration(calibration, plan.factorization)
        plan.int8 = _int8_mode(int8, data) if int8 is not None else "dynamic"
        if plan.int8 == "off":
            raise UserError("apply --int8 takes dynamic or static: a layer is INT8 when its spec ends in +int8")
    if plan.int8 == "static" and plan.quantized() and data is None:
        raise UserError("the plan's +int8 layers are static INT8, whose activation ranges are calibrated on data: "
                        "give --data")
    plan.model_sha256 = prep.loaded.sha256
    if not plan.rewritten():
        raise UserError("the plan rewrites no layer: nothing to do")
    plan.check_pairs()
    stats = None
    mode = plan.factorization
    calib = evaluation = None
    if data is not None:
        calib, evaluation = _dataset(prep.loaded, data, calib_samples, seed)
        # data-aware plans fit each layer, and a pruned pair's consumer, on its input statistics
        wanted = set() if mode == "plain" else {c.consumer or n for n, c in plan.rewritten().items()}
        if wanted:
            # collected as optimize collects them (two halves summed, where it scores on one): the
            # float64 sums then round the same way, and a plan re-applied gives optimize's bytes
            apart = calib.samples >= calibrate.SCORING_MIN_SAMPLES
            layers, representations = _statistics_plan(prep, {n: DENSE for n in prep.layers if n not in wanted},
                                                       None, budget_bytes, score_apart=apart)
            stats, *_ = _statistics(prep, calib, layers, representations, budget_bytes, 1, Progress(),
                                    results_mod.Results(None, {}), score_apart=apart)
    new = verify.rewrite(prep, space_mod.Factors(prep.layers, stats, mode), plan, calib)
    files = model_mod.write_model(new, out, external=prep.loaded.external_data)
    summary = _summary(prep, plan, new)
    summary["notes"] = notes
    summary["factorization"] = plan.factorization
    summary["calibration"] = plan.calibration
    summary["files"] = [str(f) for f in files]
    if evaluation is not None:
        ref_session = create_session(prep.loaded.proto)
        new_session = create_session(new) if new.ByteSize() < model_mod.PROTOBUF_LIMIT else create_session(out)
        reference = metrics.outputs(ref_session, evaluation, prep.loaded, None)
        result = metrics.outputs(new_session, evaluation, prep.loaded, None)
        kind = metrics.default_metric(evaluation)
        summary["metric"] = {"kind": kind,
                             "original": metrics.score(kind, reference, reference, evaluation.labels),
                             "rewritten": metrics.score(kind, result, reference, evaluation.labels)}
    return summary


def _plan_for_all(prep: _Prepared, spec: str) -> tuple[Plan, list[str]]:
    choices, notes = {}, []
    method = spec.removesuffix(INT8_SUFFIX).partition(":")[0]
    if method != "dense" and method not in PASSES:
        raise UserError(f"--all {spec!r}: unknown method {method!r}; use one of {', '.join(PASSES)}")
    if method == "dense" and not spec.endswith(INT8_SUFFIX):
        raise UserError(f"--all dense rewrites nothing; dense{INT8_SUFFIX} quantizes every layer")
    if method != "dense" and getattr(PASSES[method], "TARGET", "layer") == "pair":
        raise UserError(f"--all {spec}: pairs share layers; name each pair by its producer with "
                        f"--layer PRODUCER={spec} (`denseflex-onnx inspect` lists the pairs)")
    for name, layer in prep.layers.items():
        reason = PASSES[method].applies(layer) if method != "dense" else None
        if reason is None and spec.endswith(INT8_SUFFIX):
            reason = int8_refusal(layer)
        if reason:
            notes.append(f"{name}: left dense ({reason})")
            continue
        try:
            choices[name] = parse_spec(layer, spec)
        except UserError as exc:
            if "above" in str(exc) or "exceed" in str(exc):
                notes.append(f"{name}: left dense ({exc})")
                continue
            raise
    if not choices:
        raise UserError(f"--all {spec}: no layer can take it ({'; '.join(notes[:3])})")
    return Plan(choices, "plain"), notes


def _summary(prep: _Prepared, plan: Plan, new: onnx.ModelProto) -> dict:
    rows = []
    params_before = params_after = flops_before = flops_after = 0
    consumers = {c.consumer for c in plan.layers.values() if c.consumer}
    for name, layer in prep.layers.items():
        choice = plan.layers.get(name, DENSE)
        if name in consumers:           # counted with its pair, under the producer
            continue
        if choice.consumer:             # a pair: both layers and the constants between
            layer = prep.pairs.pair(name)
        p, f = (layer.params, layer.flops) if choice.method == "dense" else PASSES[choice.method].cost(layer, choice.config)
        params_before += layer.params
        flops_before += layer.flops
        params_after += p
        flops_after += f
        if choice.changes:
            rows.append({"layer": name, "spec": choice.spec, "params": [int(layer.params), int(p)],
                         "flops": [int(layer.flops), int(f)]})
    return {"rewritten": rows, "layer_params": [params_before, params_after], "layer_flops": [flops_before, flops_after],
            "model_bytes": [model_mod.weight_bytes(prep.loaded.proto), model_mod.weight_bytes(new)],
            "model_flops": [prep.discovery.total_flops, prep.discovery.total_flops - flops_before + flops_after]}


# ------------------------------------------------------------------------------ explore / optimize

@dataclass
class _Explored:
    prep: _Prepared
    constraints: Constraints
    provider: str
    threads: int
    mode: str
    metric: str
    output: str | None
    calib: data_mod.Dataset
    evaluation: data_mod.Dataset
    factors: space_mod.Factors
    space: space_mod.Space
    baseline: search.Baseline
    inputs: dict
    reference: np.ndarray
    measure_stats: profile.MeasureStats
    itemsize: dict[str, int]
    engine_cache: Path | None
    timing: profile.Budget
    original: Callable                                # opens (once) the original model's session on the provider
    sensitivity: dict = field(default_factory=dict)   # layer -> [{spec, error, drop}] probed
    kept_dense: dict = field(default_factory=dict)    # layer -> why it was never factorized
    statistics: dict = field(default_factory=dict)    # layer -> how its input statistics were kept
    memory_budget: int = 0
    calibration: str = "independent"
    results: results_mod.Results | None = None       # what an earlier run with these inputs computed
    int8: str = "dynamic"                             # how +int8 candidates are quantized (static: QDQ)


def _explore(path, *, latency, memory, flops, max_accuracy_drop, objective, metric, output, data, provider,
             threads, factorization, calib_samples, sensitivity, time_budget, cache_dir, no_cache, seed,
             layer_specs, exclude, input_shapes, progress: Progress, methods=None, exhaustive=False,
             timing: profile.Budget | None = None, memory_budget=None, calibration=None,
             cache_size=None, jobs=None, int8=None) -> _Explored:
    started = time.monotonic()
    int8 = _int8_mode(int8, data)
    constraints = Constraints.parse(latency, memory, flops, max_accuracy_drop, objective)
    provider = resolve_provider(provider)
    jobs = default_jobs() if jobs is None else jobs
    _check_counts(threads=threads, calib_samples=calib_samples, seed=seed, jobs=jobs)
    if metric is not None and metric not in METRICS:
        raise UserError(f"--metric {metric!r}: use one of {', '.join(METRICS)}")
    budget_s = parse_time_budget(time_budget)
    budget_bytes = _memory_budget(memory_budget)
    cache_limit = results_mod.DEFAULT_SIZE if cache_size is None else parse_memory_budget(cache_size, "--cache-size")
    prep = _prepare(path, input_shapes)
    mode = _factorization(factorization, data)
    calibration = _calibration(calibration, mode)
    forced = _forced(prep, layer_specs, exclude)
    calib, evaluation = _dataset(prep.loaded, data, calib_samples, seed)
    metric = metric or metrics.default_metric(evaluation)
    if metric == "accuracy" and evaluation.labels is None:
        raise UserError("--metric accuracy needs `labels` in the --data file; use agreement or cosine")

    kept_dense = {} if exhaustive else _cannot_pay_off(prep, forced, methods)
    layers = list(prep.layers.values())
    pairs = _pairs(prep, methods, forced, exhaustive)
    score_apart = mode != "plain" and calib.samples >= calibrate.SCORING_MIN_SAMPLES
    wanted, representations = _statistics_plan(prep, {**forced, **{n: DENSE for n in kept_dense}}, methods,
                                               budget_bytes, pairs, score_apart)
    results = results_mod.Results(_results_folder(cache_dir, no_cache), {
        "model": prep.loaded.sha256, "data": None if data is None else model_mod.sha256_file(Path(data)),
        "calib_samples": calib.samples, "seed": seed, "input_shapes": prep.loaded.input_shapes,
        "factorization": mode, "statistics": {n: r.to_json() for n, r in representations.items()}})
    stats, scoring, held_out = _statistics(prep, calib, wanted, representations, budget_bytes, threads, progress,
                                           results, score_apart)
    # candidates are fitted on half the calibration samples and scored on the other half; the
    # plans that are built are fitted on all of them
    scored = space_mod.Factors(prep.layers, scoring, mode, held_out, memo=(results, "scoring part"))
    factors = space_mod.Factors(prep.layers, stats, mode, memo=(results, "all")) if held_out else scored
    known = {n: results.get("errors", {"layer": n}) or {} for n in prep.layers}
    # what the memory budget leaves beside the statistics held: where parallel work must fit
    spare = max(budget_bytes - sum(r.bytes for r in representations.values()), 0)
    with progress.task("decomposition and layer errors", len(layers)) as advance:
        space = space_mod.build(layers, scored, methods, forced, on_layer=lambda _: advance(),
                                prune=not exhaustive, kept_dense=kept_dense, pairs=pairs, known_errors=known,
                                jobs=jobs, working_memory=spare)
    for name, cands in space.candidates.items():
        errors = {c.spec: c.error for c in cands if not c.is_dense and not math.isnan(c.error)}
        if errors and any(known[name].get(k) != v for k, v in errors.items()):
            results.put("errors", {"layer": name}, {**known[name], **errors})
    if int8 != "off":
        quantizable = [l for n, l in prep.layers.items() if n not in kept_dense and (n not in forced or forced[n].int8)]
        with progress.task("INT8 error of each layer", None) as advance:
            int8_mod.add_variants(space, _int8_errors(prep, quantizable, calib, mode, threads, results, int8))
            advance()

    engine_cache = (Path(cache_dir) if cache_dir else profile.default_cache_dir()).parent / "trt-engines" \
        if provider == "TensorrtExecutionProvider" else None
    # sessions of the original, opened when first needed: a warm run may need neither
    session = functools.cache(lambda: create_session(prep.loaded.proto, provider, threads, engine_cache))
    ref_session = session if provider == "CPUExecutionProvider" else \
        functools.cache(lambda: create_session(prep.loaded.proto, "CPUExecutionProvider", threads))
    with progress.task("original model", None) as advance:
        inputs = profile.profiling_inputs(prep.loaded, calib)
        # as the verified plans are (_verify_cached): a second run judges them against the same figure
        timed = verify.measured_on(provider, threads, timing or profile.Budget())
        stored = results.get("original timing", timed)
        base_timing = profile.Timing(**stored) if isinstance(stored, dict) and set(stored) == {"median", "p90", "runs"} \
            else profile.time_session(session(), inputs, provider, timing or profile.Budget())
        if stored is None:
            results.put("original timing", timed, dataclasses.asdict(base_timing))
        reference = verify.reference(results, ref_session, evaluation, prep, output, "evaluation", threads)
        base_metric = metrics.score(metric, reference, reference, evaluation.labels)
        advance()
    baseline = search.Baseline(base_timing.median, model_mod.weight_bytes(prep.loaded.proto),
                               prep.discovery.total_flops, base_metric)

    cache = profile.Cache(None if no_cache else Path(cache_dir) if cache_dir else profile.default_cache_dir(),
                          provider, threads)
    deadline = started + budget_s if budget_s is not None else None
    alive = sum(1 for c in space.all() if c.dropped is None)
    with progress.task("timing candidates", alive) as advance:
        measured = profile.measure_space(space, prep.layers, scored, cache, provider, threads,
                                         budget=timing or profile.Budget(), deadline=deadline,
                                         opset=max(prep.loaded.opset, 13), engine_cache=engine_cache,
                                         on_candidate=lambda _: advance(), warn=log.warning,
                                         keys=search.pareto_keys(constraints), prune=not exhaustive,
                                         pairs={p.name: p for p in prep.pairs.pairs}, lazy=not exhaustive,
                                         int8=int8 if int8 != "off" else "dynamic")
    itemsize = {n: l.dtype.itemsize for n, l in prep.layers.items()}
    ex = _Explored(prep, constraints, provider, threads, mode, metric, output, calib, evaluation, factors,
                   space, baseline, inputs, reference, measured, itemsize, engine_cache, timing or profile.Budget(),
                   session, kept_dense=kept_dense, memory_budget=budget_bytes, calibration=calibration,
                   statistics={n: r.to_json() for n, r in representations.items()}, results=results,
                   int8=int8 if int8 != "off" else "dynamic")
    if sensitivity is None:     # on by default where the errors are fitted to data
        sensitivity = mode != "plain" and data is not None
    if sensitivity:
        probe = calib.take(0, min(sens.PROBE_SAMPLES, calib.samples))
        probe_reference = verify.reference(results, ref_session, probe, prep, output, "probe", threads)
        total = sum(len(sens.probes(space, n)) for n in space.candidates)

        def drop(name: str, cand) -> float:
            what = {"layer": name, "spec": cand.spec, "samples": probe.samples, "output": output}
            value = results.get("probe", what)
            if value is None:
                value = 100.0 - verify.fidelity(ex, {name: cand}, probe, probe_reference)
                results.put("probe", what, value)
            return value

        with progress.task("layer sensitivity", total) as advance:
            # each probe holds a rewritten copy of the model and its session (about 4 x the weights)
            at_once = max(1, min(jobs, spare // max(4 * baseline.bytes, 1)))
            space.error_scale, ex.sensitivity = sens.error_scales(space, drop, on_probe=advance, jobs=at_once)
    if results.folder is not None:      # timings and results together, least recently used first
        results_mod.trim(results.folder.parent, cache_limit)
    return ex


def _int8_mode(requested: str | None, data) -> str:
    mode = "dynamic" if requested is None else requested
    if mode not in int8_mod.MODES:
        raise UserError(f"--int8 {requested}: use one of {', '.join(int8_mod.MODES)} (--no-int8 = off)")
    if mode == "static" and data is None:
        raise UserError("--int8 static calibrates activation ranges on data: give --data, or use --int8 dynamic")
    return mode


def _int8_errors(prep: _Prepared, layers: list, calib, mode: str, threads: int, results, int8: str) -> dict[str, float]:
    """int8.layer_errors, or what an earlier run with these inputs measured."""
    what = {"layers": sorted(l.name for l in layers), "mode": mode, "samples": min(int8_mod.SAMPLES, calib.samples),
            **({"int8": int8} if int8 != "dynamic" else {})}
    stored = results.get("int8 errors", what)
    if isinstance(stored, dict):
        return stored
    errors = int8_mod.layer_errors(prep.loaded, layers, calib, mode, threads, int8)
    results.put("int8 errors", what, errors)
    return errors


def default_jobs() -> int:
    """--jobs: every core this process may run on (timing never runs beside the jobs)."""
    import os
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:          # not on Linux
        return max(os.cpu_count() or 1, 1)


def _cache_folder(cache_dir) -> Path:
    folder = Path(cache_dir) if cache_dir else profile.default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--cache-dir {folder}: not a folder")
    return folder


def cache_info(cache_dir=None) -> dict:
    """The cache folder (timings, results/ under it) and what it holds."""
    folder = _cache_folder(cache_dir)
    files = results_mod.entries(folder)
    held = sum(1 for p in files if p.parent.name == "results")
    return {"folder": str(folder), "timings": len(files) - held, "results": held, "bytes": results_mod.size(folder)}


def cache_clear(cache_dir=None) -> int:
    """Remove every file of the cache folder; returns how many."""
    return results_mod.clear(_cache_folder(cache_dir))


def _results_folder(cache_dir, no_cache: bool) -> Path | None:
    """Where results.py keeps its entries: beside the profile timings, under results/."""
    if no_cache:
        return None
    return (Path(cache_dir) if cache_dir else profile.default_cache_dir()) / "results"


def _pairs(prep: _Prepared, methods, forced: dict, exhaustive: bool) -> list:
    """The pairs whose prune candidates join the space: those with neither layer forced, that
    hold a share of the model that can pay off (unless `methods` leaves prune out)."""
    if methods is not None and "prune" not in methods:
        return []
    return [p for p in prep.pairs.pairs if p.name not in forced and p.consumer.name not in forced
            and (exhaustive or p.flops_share >= space_mod.NEGLIGIBLE_SHARE
                 or p.params_share >= space_mod.NEGLIGIBLE_SHARE)]


def _sizes(prep: _Prepared) -> dict[str, dict[str, int]]:
    """What uniform fractions are of: each layer's full rank, each pair's inner channels. A layer
    whose factorization cannot pay off has no rank here (the uniform plan keeps it dense, pruned
    search or exhaustive alike)."""
    out = {n: {} if space_mod.cannot_pay_off(l) else {"rank": int(min(l.matrix_shape))} for n, l in prep.layers.items()}
    for pair in prep.pairs.pairs:
        out[pair.name]["keep"] = pair.channels
    return out


def explore(path, prefix, *, latency=None, memory=None, flops=None, max_accuracy_drop=None, objective="latency",
            metric=None, output=None, data=None, provider="cpu", threads=1, factorization=None, calib_samples=128,
            sensitivity=None, time_budget=None, cache_dir=None, no_cache=False, seed=0, layer_specs=None,
            exclude=None, input_shapes=None, force=False, progress: Progress | None = None,
            timing: profile.Budget | None = None, memory_budget=None, calibration=None, cache_size=None,
            jobs=None, int8=None) -> Result:
    """Space, measure and the MILP's choice (estimated, not verified); writes `prefix`.report.* only.

    Example: explore("model.onnx", "space", flops="-50%")     # space.report.json, .csv, .md, .pareto.png
    """
    options = {k: v for k, v in locals().items() if k not in ("path", "prefix", "force", "progress")}
    with _blas_threads(threads):
        return _explore_reports(path, prefix, force=force, progress=progress, **options)


def _explore_reports(path, prefix, *, force=False, progress: Progress | None = None, **options) -> Result:
    prefix = Path(prefix)
    paths = report.output_paths(Path(str(prefix) + ".onnx"))
    model_mod.check_output_path(paths["json"], [Path(path)], force, paths["csv"], paths["md"], paths["png"])
    ex = _explore(path, progress=progress or Progress(), **options)
    limits = search.Limits.resolve(ex.constraints, ex.baseline)
    choices = search.solve(ex.space, ex.baseline, limits, ex.constraints.objective, search.worst_error(ex.space),
                           ex.itemsize, memo=ex.results) or {}
    plan = Plan({n: c.choice for n, c in choices.items() if not c.is_dense}, ex.mode, ex.prep.loaded.sha256,
                calibration=ex.calibration, int8=ex.int8)
    data = report.explore_report(ex, path, "explored" if choices else "infeasible", choices, None, [], [], plan)
    if choices:
        e = search.estimate(ex.space, choices, ex.baseline, ex.itemsize)
        data["estimate"] = {"latency_s": e.latency, "bytes": e.bytes, "flops": e.flops, "summed_layer_error": e.error}
    files: list[Path] = []
    with _all_or_nothing(files):
        _write_reports(paths, data, files)
    return Result(data["status"] if choices else "infeasible", plan, data, files)


def _write_reports(paths: dict, data: dict, written: list[Path]) -> None:
    """report.json/.csv/.md and the Pareto plot; each path is added to `written` once it is there."""
    report.write_json(paths["json"], data)
    written.append(paths["json"])
    report.write_csv(paths["csv"], data["candidates"])
    written.append(paths["csv"])
    model_mod.atomic_write_bytes(paths["md"], report.markdown(data).encode())
    written.append(paths["md"])
    report.pareto_png(paths["png"], data)
    written.append(paths["png"])


def optimize(path, out=None, *, latency=None, memory=None, flops=None, max_accuracy_drop=None,
             objective="latency", metric=None, output=None, data=None, provider="cpu", threads=1,
             factorization=None, calib_samples=128, sensitivity=None, time_budget=None, cache_dir=None,
             no_cache=False, seed=0, layer_specs=None, exclude=None, input_shapes=None, top_k=0,
             force=False, progress: Progress | None = None, exhaustive: bool = False,
             timing: profile.Budget | None = None, memory_budget=None, calibration=None,
             max_verifications: int | None = None, methods: list[str] | None = None, cache_size=None,
             jobs=None, int8=None) -> Result:
    """Find the plan that meets the constraints; with `out`, write the model, plan and reports.
    `methods` limits the passes searched (e.g. ["svd"]; default all, pairs' prune included).

    Example: optimize("model.onnx", "small.onnx", latency="-30%", data="val.npz")
    """
    with _blas_threads(threads):
        return _optimize(**locals())


def _optimize(path, out, *, latency, memory, flops, max_accuracy_drop, objective, metric, output, data, provider,
              threads, factorization, calib_samples, sensitivity, time_budget, cache_dir, no_cache, seed,
              layer_specs, exclude, input_shapes, top_k, force, progress, exhaustive, timing,
              memory_budget, calibration, max_verifications, methods, cache_size, jobs, int8) -> Result:
    path = Path(path)
    _check_counts(top_k=top_k)
    paths = report.output_paths(Path(out)) if out is not None else None
    if paths is not None:
        extra = [p for k, p in paths.items() if k != "model"]
        extra += [p for k in range(1, top_k + 1) for p in report.alt_paths(Path(out), k)]
        model_mod.check_output_path(paths["model"], [path], force, *extra)
    ex = _explore(path, latency=latency, memory=memory, flops=flops, max_accuracy_drop=max_accuracy_drop,
                  objective=objective, metric=metric, output=output, data=data, provider=provider,
                  threads=threads, factorization=factorization, calib_samples=calib_samples,
                  sensitivity=sensitivity, time_budget=time_budget, cache_dir=cache_dir, no_cache=no_cache,
                  seed=seed, layer_specs=layer_specs, exclude=exclude, input_shapes=input_shapes,
                  progress=progress or Progress(), exhaustive=exhaustive, timing=timing,
                  memory_budget=memory_budget, calibration=calibration, methods=methods, cache_size=cache_size,
                  jobs=jobs, int8=int8)
    limits = search.Limits.resolve(ex.constraints, ex.baseline)
    _check_counts(max_verifications=max_verifications)
    most = search.MAX_VERIFICATIONS if max_verifications is None else max_verifications
    uniform = search.uniform_plans(ex.space, _sizes(ex.prep), ex.baseline, limits, ex.itemsize)
    with (progress or Progress()).task("verifying plans end to end", most + len(uniform)) as advance:
        found = search.choose(ex.space, ex.baseline, limits, ex.constraints.objective, ex.itemsize,
                              lambda choices: verify.verify_cached(ex, choices), most, on_step=lambda _: advance(),
                              uniform=uniform, memo=ex.results)
    status = "ok" if found.feasible else "infeasible"
    plan, new = verify.build(ex, found.choices)
    misses = report.missed_line(found.misses)
    held_out = verify.held_out_errors_cached(ex, found.choices)
    data_out = report.explore_report(ex, path, status, found.choices, found.verified, misses, found.steps, plan)
    data_out["held_out_errors"] = held_out
    data_out["int8_baseline"] = _int8_baseline(ex)
    data_out["frontier"] = search.frontier(ex.space, ex.baseline, found, ex.itemsize, memo=ex.results)
    # how the verified uniform plans corrected the estimates: x prune's error, against factorization's
    data_out["error_correction"] = found.method_scale
    result = Result(status, plan, data_out, [], misses)
    if paths is None:
        return result
    with _all_or_nothing(result.files):
        external = ex.prep.loaded.external_data
        if found.feasible:
            result.files += model_mod.write_model(new, paths["model"], external)
            report.write_json(paths["plan"], plan.to_json())
            result.files.append(paths["plan"])
            alternatives = search.alternatives(ex.space, ex.baseline, limits, ex.constraints.objective,
                                               ex.itemsize, found, top_k, memo=ex.results)
            for k, alt in enumerate(alternatives, start=1):
                alt_model, alt_plan_path = report.alt_paths(paths["model"], k)
                alt_plan, alt_new = verify.build(ex, alt)
                result.files += model_mod.write_model(alt_new, alt_model, external)
                report.write_json(alt_plan_path, alt_plan.to_json())
                result.files.append(alt_plan_path)
        else:
            result.files += model_mod.write_model(new, paths["closest"], external)
            report.write_json(paths["closest_plan"], plan.to_json())
            result.files.append(paths["closest_plan"])
        _write_reports(paths, data_out, result.files)
    return result


def _int8_baseline(ex: _Explored) -> dict | None:
    """The report's row for what a user runs instead: the whole model under onnxruntime's dynamic
    INT8, measured in this run; None (with a warning) where onnxruntime cannot quantize it."""
    try:
        return report.measured_row(ex, verify.int8_baseline_cached(ex))
    except Exception as exc:        # onnxruntime.quantization's limits (float16, ...): the plan still stands
        log.warning("no INT8 baseline: onnxruntime could not quantize or run the whole model (%s)",
                    model_mod.first_line(exc))
        return None


@contextlib.contextmanager
def _all_or_nothing(files: list[Path]):
    """Outputs are a set: if writing stops half way (Ctrl-C, a full disk), remove what was written."""
    try:
        yield
    except BaseException:
        for path in files:
            with contextlib.suppress(OSError):
                Path(path).unlink()
        raise


def profile_model(path, provider="cpu", threads=1, input_shapes=None) -> dict:
    provider = resolve_provider(provider)
    _check_counts(threads=threads)
    loaded = loading.load(path, input_shapes)
    session = create_session(loaded.proto if loaded.proto.ByteSize() < model_mod.PROTOBUF_LIMIT else path,
                             provider, threads)
    inputs = profile.random_inputs(session, loaded.input_shapes)
    timing = profile.time_session(session, inputs, provider, profile.Budget(min_runs=10, max_runs=1000, max_seconds=2.0))
    return {"model": str(path), "provider": provider, "threads": threads,
            "input_shapes": {k: list(v) for k, v in loaded.input_shapes.items()},
            "median_s": timing.median, "p90_s": timing.p90, "runs": timing.runs}
