"""Stage 5, choose (its measured half): the model a plan describes, built and judged end to end.

`build` rewrites the model by a set of choices (independently fitted, or stage by stage anchored
to the original: sequential.py); `verify` times it A/B against the original and scores it on
the evaluation samples; `fidelity` is the cheaper score a sensitivity probe needs; the held-out
layer errors go in the report. The *_cached forms read and write the results cache, so a second
run on the same inputs measures nothing again. `ex` is the run api._explore prepared.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import calibrate, data as data_mod, metrics, model as model_mod, profile, results as results_mod, search
from . import sequential, space as space_mod
from .errors import about_layer
from .plan import Plan
from .rewrite import quantize_dynamic, rewrite_model
from .runtime import create_session

if TYPE_CHECKING:
    from .api import _Explored, _Prepared


def reference(results: results_mod.Results, session, data: data_mod.Dataset, prep: _Prepared, output,
               which: str, threads: int) -> np.ndarray:
    """The original model's output on these samples (CPU; `session()` opens it), or what an
    earlier run stored for them."""
    what = {"samples": which, "count": data.samples, "output": output, "threads": threads}
    stored = results.get_arrays("reference", what)
    if stored is not None and set(stored) == {"outputs"}:
        return stored["outputs"]
    reference = metrics.outputs(session(), data, prep.loaded, output)
    results.put_arrays("reference", what, {"outputs": reference})
    return reference


def measured_on(provider: str, threads: int, timing: profile.Budget) -> dict:
    """What a cached measurement depends on besides the model: where and how it was timed."""
    return {"provider": provider, "threads": threads, "cpu": profile.cpu_model(), "timing": dataclasses.asdict(timing)}


def held_out_errors(ex: _Explored, choices: dict) -> dict[str, float]:
    """Each rewritten layer's (a pair's: its consumer's) relative output error on the evaluation
    samples, alone on the original model's inputs, as fitted on the calibration samples. Only
    for independent calibration, and layers whose X^T X is small enough to keep whole."""
    if ex.calibration != "independent":
        return {}
    # factorized or pruned layers: a `dense+int8` one changes no float weight (int8.py measures its error)
    rewritten = {n: c for n, c in choices.items() if c.choice.method != "dense"}
    targets = {n: ex.prep.layers[c.choice.consumer or n] for n, c in rewritten.items()}
    measured = [l for l in {t.name: t for t in targets.values()}.values()
                if not l.scope and l.matrix_shape[0] <= calibrate.FULL_GRAM_MAX_INPUTS]
    if not measured:
        return {}
    stats = calibrate.collect(ex.prep.loaded, measured, ex.evaluation, threads=ex.threads)
    out = {}
    for name, cand in rewritten.items():
        target = targets[name]
        if target.name not in stats:
            continue
        layer, diff = space_mod.change_of(ex.factors, cand, ex.prep.layers, ex.prep.pairs)
        centered = ex.mode != "plain" and target.side != "left"
        out[name] = space_mod.relative_output_error(layer, diff, stats[target.name].observed(centered))
    return out


def held_out_errors_cached(ex: _Explored, choices: dict) -> dict[str, float]:
    """_held_out_errors, or what an earlier run on the same inputs computed for this plan."""
    what = {"plan": sorted((n, c.spec) for n, c in choices.items() if not c.is_dense),
            "calibration": ex.calibration, "evaluation": ex.evaluation.samples}
    stored = ex.results.get("held-out errors", what) if ex.results else None
    if isinstance(stored, dict):
        return stored
    errors = held_out_errors(ex, choices)
    if ex.results:
        ex.results.put("held-out errors", what, errors)
    return errors


def fidelity(ex: _Explored, choices: dict, data: data_mod.Dataset, reference: np.ndarray) -> float:
    """100 x mean cosine of the outputs of the model rewritten by these choices to the original's (CPU)."""
    _, new = build(ex, choices)
    session = create_session(new, "CPUExecutionProvider", ex.threads)
    return metrics.score("cosine", metrics.outputs(session, data, ex.prep.loaded, ex.output), reference, None)


def build(ex: _Explored, choices: dict) -> tuple[Plan, onnx.ModelProto]:
    plan = Plan({n: c.choice for n, c in choices.items() if not c.is_dense}, ex.mode, ex.prep.loaded.sha256,
                calibration=ex.calibration, int8=ex.int8)
    return plan, rewrite(ex.prep, ex.factors, plan, ex.calib, ex.threads)


def rewrite(prep: _Prepared, factors: space_mod.Factors, plan: Plan, calib=None, threads: int = 1) -> onnx.ModelProto:
    """The model `plan` describes; a sequential data-aware plan is fitted stage by stage on `calib`."""
    if plan.calibration == "sequential" and plan.factorization != "plain" and calib is not None:
        return rewrite_sequential(prep, factors, plan, calib, threads)
    layers, factor_map = dict(prep.layers), {}
    for name, choice in plan.factorized().items():
        with about_layer(name):
            if choice.consumer:         # a pair pass fits the pair on its consumer's input statistics
                layers[name] = prep.pairs.pair(name)
                factor_map[name] = factors.pair_factors(layers[name], choice)
            else:
                layers[name], factor_map[name] = factors.rewrite_inputs(prep.layers[name], choice)
    return rewrite_model(prep.loaded.proto, layers, plan, factor_map, samples=int8_samples(prep, plan, calib))


def int8_samples(prep: _Prepared, plan: Plan, calib) -> list[dict] | None:
    """What a static INT8 plan calibrates its activation ranges on: the calibration samples' feeds."""
    if plan.int8 != "static" or not plan.quantized() or calib is None or calib.synthetic:
        return None
    return list(data_mod.feeds(calib, prep.loaded))


def rewrite_sequential(prep: _Prepared, factors: space_mod.Factors, plan: Plan, calib, threads: int) -> onnx.ModelProto:
    """sequential.py: stage by stage, each layer (a pair: its consumer) anchored to the original
    output on the inputs of the model rewritten so far, then fitted by its pass as usual. A
    layer without full statistics, or not anchorable, is fitted independently."""
    rewritten = plan.factorized()        # fitted in float; the +int8 layers are quantized in the end
    units = {n: (prep.layers[n].input, prep.layers[c.consumer or n].output) for n, c in rewritten.items()}
    layers, factor_map, done = dict(prep.layers), {}, {}
    for i, stage in enumerate(sequential.stages(sequential.depths(prep.loaded.proto.graph, units))):
        anchors = {}
        fitted = [prep.layers[rewritten[n].consumer or n] for n in stage]
        fitted = [l for l in fitted if sequential.can_anchor(l) and getattr(factors.stats.get(l.name), "kind", "") == "full"]
        if i > 0 and fitted:
            partial = rewrite_model(prep.loaded.proto, layers,
                                    Plan({n: dataclasses.replace(c, int8=False) for n, c in done.items()},
                                         plan.factorization), factor_map)
            residuals = {l.name: r for l in fitted if (r := sequential.residual(prep.loaded.proto.graph, l))}
            anchors = calibrate.collect_anchored(prep.loaded, partial, fitted, calib, threads=threads,
                                                 residuals=residuals)
        for name in stage:
            choice = rewritten[name]
            target = choice.consumer or name
            with about_layer(name):
                local = factors
                if target in anchors:
                    layer = sequential.anchored(prep.layers[target], space_mod.as_matrix, anchors[target])
                    local = space_mod.Factors({**prep.layers, target: layer}, {target: anchors[target].stats()},
                                              factors.mode)
                if choice.consumer:
                    pair = prep.pairs.pair(name)
                    anchored_pair = dataclasses.replace(pair, consumer=local.layers[target])
                    layers[name], factor_map[name] = pair, local.pair_factors(anchored_pair, choice)
                else:
                    layers[name], factor_map[name] = local.rewrite_inputs(local.layers[name], choice)
            done[name] = choice
    return rewrite_model(prep.loaded.proto, layers, plan, factor_map, samples=int8_samples(prep, plan, calib))


AB_ROUNDS = 3


def verify_cached(ex: _Explored, choices: dict) -> search.Verified:
    """_verify, or what it measured for this plan in an earlier run on the same inputs, machine,
    provider and timing budget (so a second run reaches the same plan)."""
    what = {"plan": sorted((n, c.spec) for n, c in choices.items() if not c.is_dense), "calibration": ex.calibration,
            **measured_on(ex.provider, ex.threads, ex.timing), "metric": ex.metric, "output": ex.output,
            "evaluation": ex.evaluation.samples,
            "statistics": fitted_from(ex, choices)}      # in place of the run's, which names every layer
    stored = ex.results.get("verified", what) if ex.results else None
    if stored is not None:
        with contextlib.suppress(TypeError):
            return search.Verified(**stored)
    verified = verify(ex, choices)
    if ex.results:
        ex.results.put("verified", what, dataclasses.asdict(verified))
    return verified


def fitted_from(ex: _Explored, choices: dict) -> dict:
    """How the statistics the plan's layers (a pair: its consumer too) are fitted on were kept: all
    a built plan depends on, so a search over another space (exhaustive, other kept-dense layers)
    that verifies the same plan reads the same measurement instead of timing it again."""
    used = set()
    for name, cand in choices.items():
        if not cand.is_dense:
            used |= {name, cand.choice.consumer} - {None}
    return {n: {k: ex.statistics[n][k] for k in ("kind", "rank")} for n in sorted(used) if n in ex.statistics}


def verify(ex: _Explored, choices: dict) -> search.Verified:
    """Build the whole model; time it A/B interleaved with the original; score it on held-out data."""
    plan, new = build(ex, choices)
    # FLOPs are exact from the choices; their latencies are not needed (a uniform plan's may be untimed)
    return measure(ex, new, ex.baseline.flops + sum(ex.space.delta(c, "flops") for c in choices.values()))


def int8_baseline_cached(ex: _Explored) -> search.Verified:
    """What a user gets instead of this tool: onnxruntime's quantize_dynamic of the whole model,
    measured as a plan is (or read from an earlier run on the same inputs)."""
    what = {**measured_on(ex.provider, ex.threads, ex.timing), "metric": ex.metric, "output": ex.output,
            "evaluation": ex.evaluation.samples, "quantization": "dynamic QInt8"}
    stored = ex.results.get("int8 baseline", what) if ex.results else None
    if stored is not None:
        with contextlib.suppress(TypeError):
            return search.Verified(**stored)
    measured = measure(ex, quantize_dynamic(ex.prep.loaded.proto), ex.baseline.flops)
    if ex.results:
        ex.results.put("int8 baseline", what, dataclasses.asdict(measured))
    return measured


def measure(ex: _Explored, new: onnx.ModelProto, flops: int) -> search.Verified:
    """A model timed A/B interleaved with the original on the run's provider, and scored on the
    evaluation samples (CPU)."""
    original = ex.original()
    candidate = create_session(new, ex.provider, ex.threads, ex.engine_cache)
    a, b = [], []
    for _ in range(AB_ROUNDS):
        a.append(profile.time_session(original, ex.inputs, ex.provider, ex.timing).median)
        b.append(profile.time_session(candidate, ex.inputs, ex.provider, ex.timing).median)
    scoring = candidate if ex.provider == "CPUExecutionProvider" else create_session(new, "CPUExecutionProvider", ex.threads)
    result = metrics.outputs(scoring, ex.evaluation, ex.prep.loaded, ex.output)
    value = metrics.score(ex.metric, result, ex.reference, ex.evaluation.labels)
    return search.Verified(float(np.median(b)), float(np.median(a)), value, model_mod.weight_bytes(new), int(flops))
