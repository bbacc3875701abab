"""Stage 5, choose: one candidate per layer under the constraints, exactly, then verified.

The choice is a multiple-choice knapsack solved as a MILP (scipy.optimize.milp, HiGHS):
one candidate (or dense) per layer, minimizing the objective subject to the latency,
memory and FLOPs limits and a budget on the summed layer error. Layer sums estimate the
model; the whole rewritten model is then built and measured. If it misses the accuracy
limit the error budget is bisected; if it misses the latency limit, the latency budget
is tightened by the measured miss; at most `max_verifications` end-to-end checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .constraints import Constraints
from .space import Candidate, Space

MAX_VERIFICATIONS = 6
ERROR_FLOOR = 1e-3      # the smallest summed error budget tried, per unit of its range


@dataclass(frozen=True)
class Baseline:
    """The original model, measured first: what relative limits and layer deltas start from."""
    latency: float        # median seconds, end to end
    bytes: int            # weight bytes
    flops: int
    metric: float         # 0..100 on the evaluation samples


@dataclass
class Limits:
    """Absolute upper bounds (None: unconstrained)."""
    latency: float | None
    bytes: float | None
    flops: float | None
    accuracy_drop: float

    @classmethod
    def resolve(cls, constraints: Constraints, baseline: Baseline) -> "Limits":
        def res(limit, base):
            return None if limit is None else limit.resolve(base)
        return cls(res(constraints.latency, baseline.latency), res(constraints.memory, baseline.bytes),
                   res(constraints.flops, baseline.flops), constraints.max_accuracy_drop)


@dataclass(frozen=True)
class Estimate:
    latency: float
    bytes: float
    flops: float
    error: float


@dataclass
class Verified:
    """What the whole rewritten model measured."""
    latency: float           # median seconds
    baseline_latency: float  # the original, timed interleaved with it
    metric: float
    bytes: int
    flops: int

    @property
    def speedup(self) -> float:
        return self.baseline_latency / self.latency if self.latency > 0 else math.inf


@dataclass
class Step:
    error_budget: float
    latency_budget: float | None
    choices: dict[str, Candidate] | None
    estimate: Estimate | None
    verified: Verified | None = None
    misses: dict[str, tuple[float, float]] = field(default_factory=dict)   # name -> (reached, limit)


@dataclass
class SearchResult:
    feasible: bool
    choices: dict[str, Candidate]
    verified: Verified | None
    misses: dict[str, tuple[float, float]]
    steps: list[Step]


def estimate(choices: dict[str, Candidate], dense: dict[str, Candidate], baseline: Baseline,
             itemsize: dict[str, int], error_scale: dict[str, float] | None = None) -> Estimate:
    """The model's figures predicted from layer deltas against dense."""
    scale = error_scale or {}
    lat = baseline.latency + sum(c.latency - dense[n].latency for n, c in choices.items())
    mem = baseline.bytes + sum((c.params - dense[n].params) * itemsize[n] for n, c in choices.items())
    flops = baseline.flops + sum(c.flops - dense[n].flops for n, c in choices.items())
    return Estimate(lat, mem, flops, sum(c.error * scale.get(n, 1.0) for n, c in choices.items()))


def solve(space: Space, baseline: Baseline, limits: Limits, objective: str, error_budget: float,
          itemsize: dict[str, int], latency_budget: float | None = None,
          exclude: list[dict[str, Candidate]] = ()) -> dict[str, Candidate] | None:
    """The exact optimum of the multiple-choice knapsack; None if nothing fits.

    Ties are broken by fewer params (a tiny secondary term), so the plan is deterministic.
    `exclude` lists plans not to return again (for the next-best alternatives).
    """
    names = sorted(space.candidates)
    cands = [(n, c) for n in names for c in space.alive(n)]
    if not cands:
        return {}
    dense = {n: next(c for c in space.candidates[n] if c.is_dense) for n in names}
    lat = np.array([c.latency - dense[n].latency for n, c in cands])
    mem = np.array([(c.params - dense[n].params) * itemsize[n] for n, c in cands], dtype=float)
    flops = np.array([c.flops - dense[n].flops for n, c in cands], dtype=float)
    err = np.array([space.weighted_error(c) for _, c in cands])
    params = np.array([c.params for _, c in cands], dtype=float)

    primary = {"latency": lat, "memory": mem, "flops": flops, "accuracy": err}[objective]
    scale = max(float(np.abs(primary).max()), 1e-30)
    tie = params / max(float(params.sum()), 1.0)
    c = primary / scale + 1e-6 * tie

    rows, lower, upper = [], [], []
    for i, n in enumerate(names):
        rows.append(np.array([1.0 if m == n else 0.0 for m, _ in cands]))
        lower.append(1.0)
        upper.append(1.0)
    lat_limit = latency_budget if latency_budget is not None else limits.latency
    for vector, limit, base in ((lat, lat_limit, baseline.latency), (mem, limits.bytes, baseline.bytes),
                                (flops, limits.flops, baseline.flops)):
        if limit is not None:
            rows.append(vector)
            lower.append(-np.inf)
            upper.append(limit - base)
    rows.append(err)
    lower.append(-np.inf)
    upper.append(error_budget)
    for plan in exclude:        # a no-good cut: not all of this plan's picks at once
        rows.append(np.array([1.0 if plan.get(n) is c else 0.0 for n, c in cands]))
        lower.append(-np.inf)
        upper.append(len(plan) - 1)
    from scipy.optimize import Bounds, LinearConstraint, milp    # imported where used: the CLI starts faster
    result = milp(c, integrality=np.ones(len(cands)), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(np.vstack(rows), lower, upper))
    if result.status != 0 or result.x is None:
        return None
    picked = np.round(result.x).astype(bool)
    return {n: cand for (n, cand), p in zip(cands, picked) if p}


def misses(verified: Verified, baseline: Baseline, limits: Limits) -> dict[str, tuple[float, float]]:
    """Each limit the measured model exceeds: name -> (reached, limit)."""
    out = {}
    if limits.latency is not None:
        # judged on the interleaved A/B ratio, applied to the baseline measured first
        latency = baseline.latency * verified.latency / verified.baseline_latency
        if latency > limits.latency:
            out["latency"] = (latency, limits.latency)
    if limits.bytes is not None and verified.bytes > limits.bytes:
        out["memory"] = (verified.bytes, limits.bytes)
    if limits.flops is not None and verified.flops > limits.flops:
        out["flops"] = (verified.flops, limits.flops)
    drop = baseline.metric - verified.metric
    if drop > limits.accuracy_drop + 1e-9:
        out["accuracy drop"] = (drop, limits.accuracy_drop)
    return out


def choose(space: Space, baseline: Baseline, limits: Limits, objective: str, itemsize: dict[str, int],
           verify: Callable[[dict[str, Candidate]], Verified],
           max_verifications: int = MAX_VERIFICATIONS, on_step=None) -> SearchResult:
    """Bisect the summed layer-error budget, geometrically, over a range that depends only on
    the number of layers (relative errors above 1 are useless): the same budgets are tried
    whatever the pruning kept, so a pruned and an exhaustive space give the same plan."""
    names = sorted(space.candidates)
    dense = {n: next(c for c in space.candidates[n] if c.is_dense) for n in names}
    hi = float(max(len(names), 1))
    lo = ERROR_FLOOR * hi
    budget = _between(lo, hi)
    latency_budget = limits.latency
    steps: list[Step] = []
    best: Step | None = None
    seen: dict[tuple, Step] = {}
    attempts = 0
    while len(steps) < max_verifications and attempts < 4 * max_verifications and hi / lo > 1.02:
        attempts += 1
        choices = solve(space, baseline, limits, objective, budget, itemsize, latency_budget)
        if choices is None:           # too tight an error budget (or limits no plan meets)
            lo = budget
            budget = _between(lo, hi)
            continue
        key = tuple(sorted((n, c.spec) for n, c in choices.items()))
        step = Step(budget, latency_budget, choices, estimate(choices, dense, baseline, itemsize, space.error_scale))
        if key in seen:
            step.verified, step.misses = seen[key].verified, seen[key].misses
        else:
            step.verified = verify(choices)
            step.misses = misses(step.verified, baseline, limits)
            seen[key] = step
            steps.append(step)
            if on_step:
                on_step(step)
        if not step.misses:
            if best is None or _objective(step, objective) < _objective(best, objective):
                best = step
            lo = budget
        elif "accuracy drop" in step.misses:
            hi = budget
        elif "latency" in step.misses:
            reached, limit = step.misses["latency"]
            current = latency_budget if latency_budget is not None else limit
            latency_budget = current - (reached - limit) * 1.1
            continue
        else:
            break                          # memory/FLOPs are exact: nothing to tighten
        budget = _between(lo, hi)
    if best is not None:
        return SearchResult(True, best.choices, best.verified, {}, steps)
    # nothing met every limit: the verified plan that missed least
    if steps:
        nearest = min(steps, key=lambda s: _miss_score(s.misses))
        return SearchResult(False, nearest.choices, nearest.verified, nearest.misses, steps)
    # no plan even fits the estimates: the closest is the one that gets nearest the limits no plan
    # meets while keeping the accuracy limit, i.e. the same search with those limits as objective
    near = "latency" if limits.latency is not None else "memory" if limits.bytes is not None else "flops"
    relaxed = choose(space, baseline, Limits(None, None, None, limits.accuracy_drop), near, itemsize, verify,
                     max_verifications, on_step)
    for step in relaxed.steps:          # judged by the real limits, not the relaxed ones
        step.misses = misses(step.verified, baseline, limits)
    met = [s for s in relaxed.steps if not s.misses]
    if met:
        # the layer sums said no plan fits, the whole model measured says these do (per-layer
        # session overheads add up in the sums: the MNIST MLP at batch 1, latency -80%)
        best = min(met, key=lambda s: _objective(s, objective))
        return SearchResult(True, best.choices, best.verified, {}, relaxed.steps)
    missed = misses(relaxed.verified, baseline, limits) if relaxed.verified else {}
    return SearchResult(False, relaxed.choices, relaxed.verified, missed or {"constraints": (1.0, 0.0)},
                        relaxed.steps)


def _between(lo: float, hi: float) -> float:
    """Geometric bisection: layer errors span decades."""
    return math.sqrt(lo * hi)


def _objective(step: Step, objective: str) -> float:
    """Plans that pass verification are ranked by their estimate (cached timings, exact sums),
    not by a fresh noisy measurement, so the same inputs and cache give the same plan."""
    e = step.estimate
    return {"latency": e.latency, "memory": e.bytes, "flops": e.flops, "accuracy": -step.verified.metric}[objective]


def _miss_score(m: dict[str, tuple[float, float]]) -> float:
    return sum(reached / limit - 1 if limit > 0 else reached for reached, limit in m.values())
