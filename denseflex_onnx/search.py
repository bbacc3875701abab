"""Stage 5, choose: one candidate per layer under the constraints, exactly, then verified.

The choice is a multiple-choice knapsack solved as a MILP (scipy.optimize.milp, HiGHS):
one candidate (or dense) per layer, minimizing the objective subject to the latency,
memory and FLOPs limits and a budget on the summed layer error. Layer sums estimate the
model; the whole rewritten model is then built and measured. If it misses the accuracy
limit the error budget is bisected; if it misses the latency limit, the latency budget
is tightened by the measured miss; at most `max_verifications` end-to-end checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .constraints import Constraints
from .space import NOT_TIMED, TIMING_FAILED, Candidate, Space

MAX_VERIFICATIONS = 4
ERROR_FLOOR = 1e-5      # the smallest summed squared error budget tried, per layer (0.3% each)


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
    error_budget: float | None        # None for a uniform baseline plan
    latency_budget: float | None
    choices: dict[str, Candidate] | None
    estimate: Estimate | None
    verified: Verified | None = None
    misses: dict[str, tuple[float, float]] = field(default_factory=dict)   # name -> (reached, limit)
    label: str | None = None          # a uniform baseline plan: which ("rank 0.5 everywhere")


@dataclass
class SearchResult:
    feasible: bool
    choices: dict[str, Candidate]
    verified: Verified | None
    misses: dict[str, tuple[float, float]]
    steps: list[Step]
    method_scale: dict[str, float] = field(default_factory=dict)     # the correction the search used (corrected)


def estimate(space: Space, choices: dict[str, Candidate], baseline: Baseline, itemsize: dict[str, int]) -> Estimate:
    """The model's figures predicted from the choices' deltas against dense (Space.delta)."""
    lat = baseline.latency + sum(space.delta(c, "latency") for c in choices.values())
    mem = baseline.bytes + sum(space.delta(c, "weight_size") * itemsize[n] for n, c in choices.items())
    flops = baseline.flops + sum(space.delta(c, "flops") for c in choices.values())
    return Estimate(lat, mem, flops, sum(space.weighted_error(c) for c in choices.values()))


def solve(space: Space, baseline: Baseline, limits: Limits, objective: str, error_budget: float,
          itemsize: dict[str, int], latency_budget: float | None = None,
          exclude: list[dict[str, Candidate]] = (), memo=None) -> dict[str, Candidate] | None:
    """The exact optimum of the multiple-choice knapsack; None if nothing fits.

    Ties are broken by fewer params (a tiny secondary term), so the plan is deterministic.
    `exclude` lists plans not to return again (for the next-best alternatives). `memo`
    (results.Results): solutions of the very same problem (its arrays' sha256) an earlier run
    found, so a warm run does not solve again what it solved before (0.3 s a solve on MiniLM).

    Candidates whose latency is a lower bound (model-guided timing) are timed when the optimum
    picks one (space.time), and the problem solved again, until the optimum's latencies are all
    measured: no plan beats it unless a bound was above the latency it bounds.
    """
    while True:
        choices = _solve_once(space, baseline, limits, objective, error_budget, itemsize, latency_budget,
                              exclude, memo)
        pending = [c for c in (choices or {}).values() if c.latency_bound]
        if not pending or space.timer is None:
            return choices
        space.time(pending)


def _solve_once(space: Space, baseline: Baseline, limits: Limits, objective: str, error_budget: float,
                itemsize: dict[str, int], latency_budget: float | None, exclude, memo) -> dict[str, Candidate] | None:
    names = sorted(space.candidates)
    cands = [(n, c) for n in names for c in space.alive(n)]
    if not cands:
        return {}
    lat = np.array([space.delta(c, "latency") for _, c in cands])
    mem = np.array([space.delta(c, "weight_size") * itemsize[n] for n, c in cands], dtype=float)
    flops = np.array([space.delta(c, "flops") for _, c in cands], dtype=float)
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
    for producer, consumer in space.couplings().items():
        # a pruned pair rewrites its consumer too: then the consumer's own choice must be dense
        rows.append(np.array([1.0 if (n == producer and c.covers) or (n == consumer and not c.is_dense) else 0.0
                              for n, c in cands]))
        lower.append(-np.inf)
        upper.append(1.0)
    for plan in exclude:        # a no-good cut: not all of this plan's picks at once
        rows.append(np.array([1.0 if plan.get(n) is c else 0.0 for n, c in cands]))
        lower.append(-np.inf)
        upper.append(len(plan) - 1)
    matrix, lower, upper = np.vstack(rows), np.array(lower, dtype=float), np.array(upper, dtype=float)
    problem = {"problem": _digest(c, matrix, lower, upper)}
    stored = memo.get("solution", problem) if memo is not None else None
    if isinstance(stored, dict) and (stored.get("picked") is None or len(stored["picked"]) == len(cands)):
        picked = stored["picked"]
    else:
        picked = _milp(c, matrix, lower, upper)
        if memo is not None:
            memo.put("solution", problem, {"picked": picked})
    if picked is None:
        return None
    return {n: cand for (n, cand), p in zip(cands, picked) if p}


def _milp(c: np.ndarray, matrix: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> list[bool] | None:
    """Which binary variables the optimum sets, or None if the problem has no solution."""
    from scipy.optimize import Bounds, LinearConstraint, milp    # imported where used: the CLI starts faster
    with _native_stdout_silenced():
        result = milp(c, integrality=np.ones(len(c)), bounds=Bounds(0, 1),
                      constraints=LinearConstraint(matrix, lower, upper))
    if result.status != 0 or result.x is None:
        return None
    return [bool(x) for x in np.round(result.x)]


@contextlib.contextmanager
def _native_stdout_silenced():
    """File descriptor 1 to /dev/null while HiGHS runs: the HiGHS in scipy 1.17 prints a stray
    "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();" to the C stdout,
    whatever its output options say (ERGO-Code/HiGHS#2783), into the middle of a user's report."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):     # no usable fd 1: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float64)
        digest.update(str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# the simplest baselines: one rank fraction in every layer (SVD family), or one keep fraction in
# every pair (prune); the best of each that the limits allow is verified beside the search's plans
# one plan per family is verified: the finer the fractions, the nearer it comes to the limit
UNIFORM_FRACTIONS = tuple(k / 16 for k in range(2, 16))
UNIFORM_FAMILIES = {"rank": ("svd", "conv_svd"), "keep": ("prune",)}


@dataclass(frozen=True)
class Uniform:
    label: str                            # e.g. "rank 0.5 everywhere"
    choices: dict[str, Candidate]


def uniform_plans(space: Space, sizes: dict[str, dict[str, int]], baseline: Baseline, limits: Limits,
                  itemsize: dict[str, int]) -> list[Uniform]:
    """Per family, the uniform plan nearest the original (the highest fraction) whose estimate
    meets the latency, memory and FLOPs limits. `sizes`: by layer name, {"rank": its full rank,
    "keep": the inner channels of the pair it heads}. A layer whose candidate at the fraction was never
    built (it saves nothing), or that the time budget left untimed, stays dense; latencies are
    the dense layers' scaled by FLOPs (_by_flops)."""
    out = []
    for key, methods in UNIFORM_FAMILIES.items():
        for fraction in sorted(UNIFORM_FRACTIONS, reverse=True):
            choices = _uniform(space, sizes, key, methods, fraction)
            if not choices:
                continue
            if _within(estimate(space, {n: _by_flops(space, c) for n, c in choices.items()}, baseline, itemsize),
                       limits):
                out.append(Uniform(f"{key} {fraction:g} everywhere", choices))
                break
    int8 = _uniform_int8(space)
    # INT8 alone, as this space holds it: timed like every candidate, not scaled by FLOPs
    if int8 and _within(estimate(space, int8, baseline, itemsize), limits):
        out.append(Uniform(UNIFORM_INT8, int8))
    return out


def _within(e: Estimate, limits: Limits) -> bool:
    """Does an estimate meet the latency, memory and FLOPs limits?"""
    return all(limit is None or value <= limit for value, limit in
               ((e.latency, limits.latency), (e.bytes, limits.bytes), (e.flops, limits.flops)))


UNIFORM_INT8 = "dense+int8 everywhere"


def _as_they_are(space: Space) -> dict[str, Candidate]:
    """Every layer dense, or a forced layer with the choice forced on it: what a uniform plan adds to."""
    return {n: space.dense(n) if not space.dense(n).dropped else space.alive(n)[0] for n in space.candidates}


def _uniform_int8(space: Space) -> dict[str, Candidate]:
    """Every layer that has a timed `dense+int8` variant takes it; the rest stay as they are."""
    picked = {n: c for n, cands in space.candidates.items() for c in cands
              if c.spec == "dense+int8" and c.dropped not in (NOT_TIMED, TIMING_FAILED) and c.latency is not None
              and not c.latency_bound}
    if not picked:
        return {}
    return {**_as_they_are(space), **picked}


def _uniform(space: Space, sizes: dict[str, dict[str, int]], key: str, methods: tuple,
             fraction: float) -> dict[str, Candidate]:
    """Each layer's candidate of these methods whose `key` is nearest fraction x its size (within
    a sixteenth of the size), pairs taken in name order without sharing a layer; the rest dense."""
    picked: dict[str, Candidate] = {}
    taken: set[str] = set()
    for name in sorted(space.candidates):
        size = sizes.get(name, {}).get(key)
        if name in taken or not size or space.dense(name).dropped:       # a forced layer keeps its choice
            continue
        target = fraction * size
        # one the time budget left untimed, or whose timing failed, is not offered: the user asked to stop
        near = [c for c in space.candidates[name] if c.choice.method in methods and not c.choice.int8
                and not math.isnan(c.error)
                and c.dropped not in (NOT_TIMED, TIMING_FAILED) and _saves(space, c)
                and abs(c.choice.config[key] - target) <= size / 16
                and not set(c.covers) & (taken | set(picked)) and not any(space.dense(m).dropped for m in c.covers)]
        if near:
            best = min(near, key=lambda c: (abs(c.choice.config[key] - target), c.choice.config[key]))
            picked[name] = best
            taken |= {name, *best.covers}
    if not picked:
        return {}
    return {**_as_they_are(space), **picked}


def _saves(space: Space, cand: Candidate) -> bool:
    """Fewer params or FLOPs than the dense layers it replaces (checked here, not read from
    `dropped`: an exhaustive space keeps what saves nothing, and must pick the same plans)."""
    return space.delta(cand, "params") < 0 or space.delta(cand, "flops") < 0


def _by_flops(space: Space, cand: Candidate) -> Candidate:
    """The candidate with the dense layers' latency scaled by its FLOPs share. A uniform plan is
    the simplest baseline: it is picked and ranked without the per-candidate timings, so a pruned
    and an exhaustively timed space pick the same one (it is measured end to end anyway)."""
    dense = sum(space.dense(n).latency for n in (cand.layer, *cand.covers))
    dense_flops = sum(space.dense(n).flops for n in (cand.layer, *cand.covers))
    return dataclasses.replace(cand, latency=dense * cand.flops / max(dense_flops, 1))


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
           max_verifications: int = MAX_VERIFICATIONS, on_step=None, uniform: list[Uniform] = (),
           memo=None, measured: list[Step] = ()) -> SearchResult:
    """Search the summed layer-error budget over a range that depends only on the number of
    layers (relative errors above 1 are useless), each next budget aimed by the measured drops
    (_aimed) inside the bracket the measurements leave, so it converges like a bisection.
    `measured`: plans an earlier search verified in this space's units (the relaxed search's
    start): they aim its budgets, and one that lost the accuracy caps the bracket.

    The `uniform` plans (uniform_plans) are verified first, beyond `max_verifications`: each
    family's measured drop against its estimate corrects how the MILP weighs pruning against
    factorization (corrected), and aims the first budget. They win where they meet every limit
    with a better objective: the result never loses to them."""
    names = sorted(space.candidates)
    hi = float(max(len(names), 1))
    lo = ERROR_FLOOR * hi
    steps: list[Step] = []
    seen: dict[tuple, Step] = {}
    best: Step | None = None

    def verified(step: Step) -> Step:
        nonlocal best
        key = tuple(sorted((n, c.spec) for n, c in step.choices.items()))
        if key in seen:
            step.verified, step.misses = seen[key].verified, seen[key].misses
            return step
        step.verified = verify(step.choices)
        step.misses = misses(step.verified, baseline, limits)
        seen[key] = step
        steps.append(step)
        if on_step:
            on_step(step)
        if not step.misses and (best is None or _better(step, best, objective)):
            best = step
        return step

    for plan in uniform:
        timed = {n: _by_flops(space, c) for n, c in plan.choices.items()}
        verified(Step(None, None, plan.choices, estimate(space, timed, baseline, itemsize), label=plan.label))
    space = corrected(space, steps, baseline)
    for step in steps:                  # in the corrected units the search goes on in
        step.estimate = estimate(space, {n: _by_flops(space, c) for n, c in step.choices.items()}, baseline, itemsize)
    lost = [s.estimate.error for s in measured if "accuracy drop" in s.misses and lo < s.estimate.error < hi]
    hi = min([hi, *lost])
    aims = [s for s in [*steps, *measured] if s.estimate.error > 0]
    budget = _aimed(aims, baseline, limits, lo, hi) if aims else _between(lo, hi)
    latency_budget = limits.latency
    searched = attempts = 0
    while searched < max_verifications and attempts < 4 * max_verifications and hi / lo > 1.02:
        attempts += 1
        choices = solve(space, baseline, limits, objective, budget, itemsize, latency_budget, memo=memo)
        if choices is None:           # too tight an error budget (or limits no plan meets)
            lo = budget
            # the least summed error the limits allow is the next budget: bisecting toward it
            # from below verified plans far worse than it (MiniLM-L6 at -25% FLOPs: 38 points)
            least = solve(space, baseline, limits, "accuracy", hi, itemsize, latency_budget, memo=memo)
            floor = None if least is None else estimate(space, least, baseline, itemsize).error
            if floor is None or floor * (1 + 1e-6) >= hi:
                break                 # nothing within the limits that is not known to miss
            budget = max(floor * (1 + 1e-9), budget * (1 + 1e-9))
            continue
        before = len(steps)
        step = verified(Step(budget, latency_budget, choices, estimate(space, choices, baseline, itemsize)))
        searched += len(steps) - before
        if not step.misses:
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
        budget = _aimed([*steps, *measured], baseline, limits, lo, hi)
    if best is not None:
        return SearchResult(True, best.choices, best.verified, {}, steps, space.method_scale)
    # nothing met every limit: the verified plan that missed least, among those that keep the
    # accuracy (a faster model that lost its accuracy is no one's closest plan)
    relaxable = any(x is not None for x in (limits.latency, limits.bytes, limits.flops))
    if any("accuracy drop" not in s.misses for s in steps) or (steps and not relaxable):
        nearest = min(steps, key=lambda s: ("accuracy drop" in s.misses, _miss_score(s.misses)))
        return SearchResult(False, nearest.choices, nearest.verified, nearest.misses, steps, space.method_scale)
    if not relaxable:                   # nothing verified, and no limit to relax
        return SearchResult(False, {}, None, {"constraints": (1.0, 0.0)}, steps, space.method_scale)
    # none fits the estimates, or every one verified lost the accuracy: the closest is the plan that
    # gets nearest the limits no plan meets while keeping the accuracy limit, i.e. the same search
    # with those limits as objective (with half the verifications where some were spent already)
    near = "latency" if limits.latency is not None else "memory" if limits.bytes is not None else "flops"
    relaxed = choose(space, baseline, Limits(None, None, None, limits.accuracy_drop), near, itemsize, verify,
                     max(1, max_verifications // 2) if steps else max_verifications, on_step, memo=memo,
                     measured=[s for s in steps if s.estimate is not None])
    for step in relaxed.steps:          # judged by the real limits, not the relaxed ones
        step.misses = misses(step.verified, baseline, limits)
    if steps:
        earlier = SearchResult(False, None, None, {}, steps, space.method_scale)
        return _closest(earlier, relaxed, objective)
    met = [s for s in relaxed.steps if not s.misses]
    if met:
        # the layer sums said no plan fits, the whole model measured says these do (per-layer
        # session overheads add up in the sums: the MNIST MLP at batch 1, latency -80%)
        best = _best(met, objective)
        return SearchResult(True, best.choices, best.verified, {}, relaxed.steps)
    missed = misses(relaxed.verified, baseline, limits) if relaxed.verified else {}
    return SearchResult(False, relaxed.choices, relaxed.verified, missed or {"constraints": (1.0, 0.0)},
                        relaxed.steps)


def _closest(earlier: SearchResult, relaxed: SearchResult, objective: str) -> SearchResult:
    """After a relaxed search that followed verified plans which all lost the accuracy: every
    plan verified, and the one that meets every limit (best objective) or else misses least,
    those keeping the accuracy first."""
    steps = earlier.steps + relaxed.steps
    met = [s for s in steps if not s.misses]
    if met:
        best = _best(met, objective)
        return SearchResult(True, best.choices, best.verified, {}, steps, earlier.method_scale)
    nearest = min(steps, key=lambda s: ("accuracy drop" in s.misses, _miss_score(s.misses)))
    return SearchResult(False, nearest.choices, nearest.verified, nearest.misses, steps, earlier.method_scale)


AIM = 0.9               # of --max-accuracy-drop: where the next budget is aimed, a little inside
CORRECTION_RANGE = (0.1, 10.0)      # a measured correction outside it is an outlier, clipped


def corrected(space: Space, steps: list[Step], baseline: Baseline) -> Space:
    """The space with pruning's errors rescaled by what the verified uniform plans measured: a unit
    of estimated error costs `drop / error` metric points, per family; the ratio keep / rank is
    prune's method_scale. Unchanged where either family has no measured drop."""
    cost = {}
    for step in steps:
        drop = baseline.metric - step.verified.metric
        if step.label and step.estimate.error > 0 and drop > 0:
            cost[step.label.split()[0]] = drop / step.estimate.error
    if "rank" not in cost or "keep" not in cost:
        return space
    ratio = min(max(cost["keep"] / cost["rank"], CORRECTION_RANGE[0]), CORRECTION_RANGE[1])
    return dataclasses.replace(space, method_scale={**space.method_scale, "prune": ratio})


def _aimed(steps: list[Step], baseline: Baseline, limits: Limits, lo: float, hi: float) -> float:
    """The next error budget, aimed where the measured drop should be AIM x the limit, kept a
    tenth of the bracket (in log) away from either end so that every step shrinks it.

    Drops grow as a power of the estimated error, so the aim is read off the measured plans in
    log-log: between the nearest plan below the aimed drop and the nearest above it where there
    are both (a secant), else scaled from the nearest one as if the drop were proportional to the
    error. From one point only, a plan that lost 34 points put the next budget 68x lower and the
    search spent the rest of its verifications far from the limit (MNIST MLP, -50% latency).
    Geometric bisection where the drops say nothing (none, or none estimated)."""
    target = AIM * limits.accuracy_drop
    points = sorted({(s.estimate.error, baseline.metric - s.verified.metric) for s in steps
                     if s.verified is not None and s.estimate.error > 0 and baseline.metric - s.verified.metric > 0})
    if not points or target <= 0:
        return _between(lo, hi)
    below = [p for p in points if p[1] <= target]
    above = [p for p in points if p[1] > target]
    if below and above:
        (e1, d1), (e2, d2) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        if e1 != e2 and d1 != d2:
            slope = (math.log(d2) - math.log(d1)) / (math.log(e2) - math.log(e1))
            x = math.log(e1) + (math.log(target) - math.log(d1)) / slope if slope > 0 else \
                0.5 * (math.log(e1) + math.log(e2))
        else:
            x = 0.5 * (math.log(e1) + math.log(e2))
    else:
        error, drop = min(points, key=lambda p: abs(math.log(p[1] / target)))
        x = math.log(error * target / drop)
    a, b = math.log(lo), math.log(hi)
    return math.exp(min(max(x, a + 0.1 * (b - a)), b - 0.1 * (b - a)))


def _between(lo: float, hi: float) -> float:
    """Geometric bisection: layer errors span decades."""
    return math.sqrt(lo * hi)


# measured latency ratios this close are a tie (A/B noise on a shared machine is a few %): the
# estimate, which a warm cache reproduces exactly, decides, so reruns and exhaustive timing agree
LATENCY_TIE = 0.03


def _better(a: Step, b: Step, objective: str) -> bool:
    """Whether verified plan `a` beats `b` on the objective (_objective; ties as LATENCY_TIE says)."""
    x, y = _objective(a, objective), _objective(b, objective)
    if objective == "latency" and abs(x - y) <= LATENCY_TIE * min(x, y):
        return (a.estimate.latency, x) < (b.estimate.latency, y)
    return x < y


def _best(steps: list[Step], objective: str) -> Step:
    best = steps[0]
    for step in steps[1:]:
        if _better(step, best, objective):
            best = step
    return best


def _objective(step: Step, objective: str) -> float:
    """Plans that pass verification are ranked by what they measured: latency as the A/B ratio to
    the original timed interleaved with them (robust to the machine's load), bytes and FLOPs
    exact. Not by the estimate: summed one-layer timings misjudge whole models (the MNIST MLP at
    -50% latency kept a plan estimated faster and measured 2.0x over a uniform one measured 3.1x);
    a warm run reads the same measurements from the results cache, so it picks the same plan."""
    v = step.verified
    return {"latency": v.latency / v.baseline_latency if v.baseline_latency > 0 else math.inf,
            "memory": v.bytes, "flops": v.flops, "accuracy": -v.metric}[objective]


def _miss_score(m: dict[str, tuple[float, float]]) -> float:
    return sum(reached / limit - 1 if limit > 0 else reached for reached, limit in m.values())


def worst_error(space: Space) -> float:
    """The summed error of each layer's worst candidate: an error budget no plan can exceed."""
    return sum(max((space.weighted_error(c) for c in space.alive(n)), default=0.0) for n in space.candidates)


FRONTIER_POINTS = 10


def frontier(space: Space, baseline: Baseline, found: SearchResult, itemsize: dict[str, int],
             memo=None) -> list[dict]:
    """The estimated latency-metric frontier (report.pareto_png's line): the fastest plan the
    solver finds at each of FRONTIER_POINTS error budgets, no other limit, nothing timed for it
    (an untimed candidate counts at its latency bound), its metric drop read off the verified
    plans (one slope through the origin: measured drop per unit of summed error). Empty without
    a verified plan to read that slope from."""
    steps = [s for s in found.steps if s.verified is not None and s.estimate is not None and s.estimate.error > 0]
    errors = np.array([s.estimate.error for s in steps])
    drops = np.array([baseline.metric - s.verified.metric for s in steps])
    if not len(steps) or errors @ errors == 0:
        return []
    slope = max(float(errors @ drops / (errors @ errors)), 0.0)
    untimed = dataclasses.replace(space, timer=None, method_scale=found.method_scale)
    worst = worst_error(untimed)
    out = []
    for budget in np.geomspace(max(worst, 1e-12) * 1e-3, max(worst, 1e-12), FRONTIER_POINTS):
        choices = solve(untimed, baseline, Limits(None, None, None, math.inf), "latency", float(budget), itemsize,
                        memo=memo)
        if choices:
            e = estimate(untimed, choices, baseline, itemsize)
            out.append({"error_budget": float(budget), "latency_s": e.latency, "estimated_error": e.error,
                        "metric": baseline.metric - slope * e.error,
                        "int8": any(c.choice.int8 for c in choices.values())})
    return out


def pareto_keys(constraints: Constraints) -> tuple[str, ...]:
    """What stage 3 compares: latency and error, plus params/FLOPs when a limit or the objective uses them."""
    keys = ["latency", "error"]
    if constraints.memory is not None or constraints.objective == "memory":
        keys.append("weight_size")
    if constraints.flops is not None or constraints.objective == "flops":
        keys.append("flops")
    return tuple(keys)


def alternatives(space: Space, baseline: Baseline, limits: Limits, objective: str, itemsize: dict[str, int],
                 found: SearchResult, k: int, memo=None) -> list[dict]:
    """The next best distinct plans by the MILP (estimated within the limits), for --top-k."""
    out: list[dict] = []
    excluded = [found.choices]
    space = dataclasses.replace(space, method_scale=found.method_scale)     # as the search weighed them
    worst = worst_error(space)
    budget = sum(space.weighted_error(c) for c in found.choices.values())
    for _ in range(k):
        choices = solve(space, baseline, limits, objective, max(budget, 1e-12), itemsize, exclude=excluded,
                        memo=memo) or \
            solve(space, baseline, limits, objective, worst, itemsize, exclude=excluded, memo=memo)
        if not choices:
            break
        out.append(choices)
        excluded.append(choices)
    return out
