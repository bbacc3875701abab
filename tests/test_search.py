"""The choice stage: the MILP against brute force, limits, misses, the bisection loop."""
import itertools
import math
import os

import numpy as np
import pytest

from denseflex_onnx.constraints import Constraints
from denseflex_onnx.plan import DENSE, Choice
from denseflex_onnx.search import ERROR_FLOOR, MAX_VERIFICATIONS, Baseline, Limits, Verified, choose, estimate, misses, solve
from denseflex_onnx.space import Candidate, Space, dominated


def random_space(rng, layers=3, per_layer=4):
    space = Space({})
    for i in range(layers):
        name = f"l{i}"
        params, flops, lat = int(rng.integers(1000, 5000)), int(rng.integers(10_000, 50_000)), float(rng.uniform(1, 3))
        cands = [Candidate(name, DENSE, params, flops, error=0.0, latency=lat)]
        for r in range(per_layer):
            cands.append(Candidate(name, Choice("svd", {"rank": r + 1}), int(rng.integers(100, params)),
                                   int(rng.integers(1000, flops)), error=float(rng.uniform(0.01, 0.5)),
                                   latency=float(rng.uniform(0.2, lat * 1.3))))
        space.candidates[name] = cands
    return space


def brute_force(space, baseline, limits, objective, error_budget, itemsize):
    """Every combination, the constraints checked one by one: the reference for the MILP."""
    names = sorted(space.candidates)
    dense = {n: space.candidates[n][0] for n in names}
    best, best_value = None, math.inf
    for combo in itertools.product(*(space.candidates[n] for n in names)):
        choices = dict(zip(names, combo))
        e = estimate(space, choices, baseline, itemsize)
        if limits.latency is not None and e.latency > limits.latency + 1e-12:
            continue
        if limits.bytes is not None and e.bytes > limits.bytes + 1e-9:
            continue
        if limits.flops is not None and e.flops > limits.flops + 1e-9:
            continue
        if e.error > error_budget + 1e-12:
            continue
        value = {"latency": e.latency, "memory": e.bytes, "flops": e.flops, "accuracy": e.error}[objective]
        if value < best_value - 1e-12:
            best, best_value = choices, value
    return best, best_value


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("objective", ["latency", "memory", "flops", "accuracy"])
def test_milp_matches_brute_force(seed, objective):
    rng = np.random.default_rng(seed)
    space = random_space(rng)
    itemsize = {n: 4 for n in space.candidates}
    dense = {n: c[0] for n, c in space.candidates.items()}
    total_params = sum(c.params for c in dense.values())
    baseline = Baseline(latency=10.0, bytes=4 * total_params + 1000, flops=200_000, metric=90.0)
    limits = Limits(latency=float(rng.uniform(6, 10)), bytes=baseline.bytes * float(rng.uniform(0.4, 1.0)),
                    flops=None if seed % 2 else baseline.flops * 0.9, accuracy_drop=1.0)
    budget = float(rng.uniform(0.1, 1.0))
    expected, expected_value = brute_force(space, baseline, limits, objective, budget, itemsize)
    got = solve(space, baseline, limits, objective, budget, itemsize)
    if expected is None:
        assert got is None
        return
    assert got is not None
    e = estimate(space, got, baseline, itemsize)
    value = {"latency": e.latency, "memory": e.bytes, "flops": e.flops, "accuracy": e.error}[objective]
    assert value == pytest.approx(expected_value, rel=1e-9, abs=1e-9)
    assert e.error <= budget + 1e-9
    assert limits.latency is None or e.latency <= limits.latency + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_latency_bounds_timed_on_demand_give_the_brute_force_optimum(seed):
    """Model-guided timing: non-dense latencies hidden behind lower bounds (a random share of the
    truth), revealed only when the solver picks one (space.timer). The optimum is the one the
    whole truth gives, and some candidates are never timed."""
    rng = np.random.default_rng(100 + seed)
    space = random_space(rng, layers=4, per_layer=6)
    itemsize = {n: 4 for n in space.candidates}
    baseline = Baseline(latency=12.0, bytes=4 * sum(c[0].params for c in space.candidates.values()) + 1000,
                        flops=300_000, metric=90.0)
    limits = Limits(latency=float(rng.uniform(7, 11)), bytes=None, flops=None, accuracy_drop=1.0)
    budget = float(rng.uniform(0.2, 1.0))
    expected, expected_value = brute_force(space, baseline, limits, "latency", budget, itemsize)
    truth = {id(c): c.latency for c in space.all()}
    for c in space.all():
        if not c.is_dense:
            c.latency, c.latency_bound = truth[id(c)] * float(rng.uniform(0.3, 1.0)), True
    timed = []

    def timer(cands):
        for c in cands:
            c.latency, c.latency_bound = truth[id(c)], False
            timed.append(c)
    space.timer = timer
    got = solve(space, baseline, limits, "latency", budget, itemsize)
    if expected is None:
        assert got is None
        return
    assert got is not None and not any(c.latency_bound for c in got.values())
    assert estimate(space, got, baseline, itemsize).latency == pytest.approx(expected_value, rel=1e-9)
    assert len(timed) < sum(1 for c in space.all() if not c.is_dense)


def test_the_solver_leaves_the_process_stdout_as_it_found_it(capfd):
    """HiGHS's stray C-level prints are silenced while it runs (fd 1 to /dev/null), and what this
    process writes to fd 1 before and after still reaches it."""
    rng = np.random.default_rng(0)
    space = random_space(rng)
    itemsize = {n: 4 for n in space.candidates}
    baseline = Baseline(latency=10.0, bytes=10**6, flops=200_000, metric=90.0)
    os.write(1, b"before|")
    solve(space, baseline, Limits(latency=9.0, bytes=None, flops=None, accuracy_drop=1.0), "latency", 1.0, itemsize)
    os.write(1, b"after")
    print("|printed")
    assert capfd.readouterr().out == "before|after|printed\n"


def test_milp_returns_none_when_nothing_fits():
    space = random_space(np.random.default_rng(0))
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    limits = Limits(latency=0.001, bytes=None, flops=None, accuracy_drop=1.0)
    assert solve(space, baseline, limits, "latency", 10.0, {n: 4 for n in space.candidates}) is None


def test_a_stored_solution_serves_only_the_very_same_problem(tmp_path):
    from denseflex_onnx.results import Results
    space = random_space(np.random.default_rng(3))
    itemsize = {n: 4 for n in space.candidates}
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    limits = Limits(latency=9.0, bytes=None, flops=None, accuracy_drop=1.0)
    memo = Results(tmp_path, {})
    first = solve(space, baseline, limits, "latency", 0.5, itemsize, memo=memo)
    second = Results(tmp_path, {})
    again = solve(space, baseline, limits, "latency", 0.5, itemsize, memo=second)
    assert second.hits == {"solution": 1} and _same_plan(first, again) and _same_plan(first, solve(space, baseline, limits, "latency", 0.5, itemsize))
    other = Results(tmp_path, {})
    tighter = solve(space, baseline, limits, "latency", 0.2, itemsize, memo=other)
    assert other.hits == {} and _same_plan(tighter, solve(space, baseline, limits, "latency", 0.2, itemsize))
    none, later = Results(tmp_path, {}), Results(tmp_path, {})       # that nothing fits is remembered too
    assert solve(space, baseline, Limits(0.001, None, None, 1.0), "latency", 0.5, itemsize, memo=none) is None
    assert solve(space, baseline, Limits(0.001, None, None, 1.0), "latency", 0.5, itemsize, memo=later) is None
    assert none.hits == {} and later.hits == {"solution": 1}


def ranked_plans(space, baseline, limits, objective, error_budget, itemsize):
    """Every feasible combination with its objective value, best first (brute force, no solver)."""
    names = sorted(space.candidates)
    dense = {n: space.candidates[n][0] for n in names}
    feasible = []
    for combo in itertools.product(*(space.candidates[n] for n in names)):
        choices = dict(zip(names, combo))
        e = estimate(space, choices, baseline, itemsize)
        if ((limits.latency is None or e.latency <= limits.latency + 1e-12)
                and (limits.bytes is None or e.bytes <= limits.bytes + 1e-9)
                and (limits.flops is None or e.flops <= limits.flops + 1e-9)
                and e.error <= error_budget + 1e-12):
            value = {"latency": e.latency, "memory": e.bytes, "flops": e.flops, "accuracy": e.error}[objective]
            feasible.append((value, choices))
    feasible.sort(key=lambda item: item[0])
    return feasible


def _same_plan(a, b) -> bool:
    return a.keys() == b.keys() and all(a[n] is b[n] for n in a)


@pytest.mark.parametrize("seed", range(6))
def test_exclude_gives_a_different_plan(seed):
    """`exclude` (the next-best alternatives of --top-k): each solve returns a plan not excluded,
    within every limit and the error budget, and as good as the best of the plans brute force
    finds once the excluded ones are struck out, so the k-th solve is the k-th best plan."""
    rng = np.random.default_rng(seed)
    space = random_space(rng)
    itemsize = {n: 4 for n in space.candidates}
    dense = {n: c[0] for n, c in space.candidates.items()}
    total_params = sum(c.params for c in dense.values())
    baseline = Baseline(latency=10.0, bytes=4 * total_params + 1000, flops=200_000, metric=90.0)
    limits = Limits(latency=9.0, bytes=baseline.bytes * 0.8, flops=baseline.flops * 0.95, accuracy_drop=1.0)
    budget = 0.8
    ranked = ranked_plans(space, baseline, limits, "latency", budget, itemsize)
    assert len(ranked) >= 4, "the space must leave a few feasible plans to rank"
    excluded = []
    for k in range(3):
        got = solve(space, baseline, limits, "latency", budget, itemsize, exclude=list(excluded))
        assert got is not None
        assert set(got) == set(space.candidates)
        assert not any(_same_plan(got, plan) for plan in excluded), f"solve {k + 1} returned an excluded plan"
        e = estimate(space, got, baseline, itemsize)
        assert e.latency <= limits.latency + 1e-9 and e.bytes <= limits.bytes + 1e-9
        assert e.flops <= limits.flops + 1e-9 and e.error <= budget + 1e-9
        left = [(v, plan) for v, plan in ranked if not any(_same_plan(plan, x) for x in excluded)]
        assert e.latency == pytest.approx(left[0][0], rel=1e-9, abs=1e-9), (k, e.latency, left[0][0])
        assert any(_same_plan(got, plan) for _, plan in left)
        excluded.append(got)
    # the three values are the three best, in order (strictly worse each time, up to ties)
    values = [estimate(space, p, baseline, itemsize).latency for p in excluded]
    assert values == pytest.approx([v for v, _ in ranked[:3]], rel=1e-9, abs=1e-9)
    assert values[0] <= values[1] <= values[2]
    # excluding every feasible plan leaves nothing
    assert solve(space, baseline, limits, "latency", budget, itemsize, exclude=[p for _, p in ranked]) is None


def test_dominated_keeps_dense_and_drops_worse_on_every_key():
    a = Candidate("l", Choice("svd", {"rank": 1}), params=10, flops=10, error=0.5)
    b = Candidate("l", Choice("svd", {"rank": 2}), params=20, flops=20, error=0.6)   # worse everywhere
    c = Candidate("l", Choice("svd", {"rank": 3}), params=5, flops=30, error=0.4)    # trade-off
    d = Candidate("l", DENSE, params=100, flops=100, error=0.0)
    assert dominated([a, b, c, d], ("params", "flops", "error")) == [b]


def test_misses_name_each_limit_with_the_reached_value():
    baseline = Baseline(latency=2e-3, bytes=1000, flops=500, metric=95.0)
    limits = Limits(latency=1e-3, bytes=600, flops=None, accuracy_drop=1.0)
    v = Verified(latency=1.5e-3, baseline_latency=2e-3, metric=93.0, bytes=700, flops=300)
    m = misses(v, baseline, limits)
    assert set(m) == {"latency", "memory", "accuracy drop"}
    assert m["latency"] == (pytest.approx(1.5e-3), 1e-3)
    assert m["accuracy drop"] == (pytest.approx(2.0), 1.0)


def test_choose_bisects_the_error_budget_until_accuracy_holds():
    """A verifier whose metric falls with the summed layer error: choose must come back
    under the accuracy limit within 6 verifications and keep the fastest such plan."""
    space = random_space(np.random.default_rng(7), layers=3, per_layer=5)
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    itemsize = {n: 4 for n in space.candidates}
    dense = {n: c[0] for n, c in space.candidates.items()}
    limits = Limits.resolve(Constraints.parse(max_accuracy_drop="1"), baseline)
    calls = []

    def verify(choices):
        e = estimate(space, choices, baseline, itemsize)
        calls.append(e)
        return Verified(e.latency, baseline.latency, baseline.metric - 4.0 * e.error, e.bytes, e.flops)

    result = choose(space, baseline, limits, "latency", itemsize, verify)
    assert 1 <= len(calls) <= 6
    assert result.feasible
    assert baseline.metric - result.verified.metric <= 1.0 + 1e-9
    # every verified plan within its error budget, budgets inside the fixed range [ERROR_FLOOR n, n]
    for step in result.steps:
        assert step.estimate.error <= step.error_budget + 1e-12
        assert ERROR_FLOOR * 3 <= step.error_budget <= 3


def test_choose_reports_infeasible_with_the_nearest_plan():
    space = random_space(np.random.default_rng(1))
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    itemsize = {n: 4 for n in space.candidates}
    dense = {n: c[0] for n, c in space.candidates.items()}
    limits = Limits(latency=0.5, bytes=None, flops=None, accuracy_drop=1.0)

    def verify(choices):
        e = estimate(space, choices, baseline, itemsize)
        return Verified(e.latency, baseline.latency, baseline.metric, e.bytes, e.flops)

    result = choose(space, baseline, limits, "latency", itemsize, verify)
    assert not result.feasible
    assert "latency" in result.misses
    reached, limit = result.misses["latency"]
    assert reached > limit == 0.5


def estimates_rule_everything_out(error_cost: float):
    """A space whose estimated latencies all miss the limit (10% below the fastest plan's), and a
    verifier that measures the whole model at half its estimate, losing `error_cost` points per
    unit of summed layer error."""
    space = random_space(np.random.default_rng(1))
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    itemsize = {n: 4 for n in space.candidates}
    dense = {n: c[0] for n, c in space.candidates.items()}
    fastest = min(estimate(space, dict(zip(sorted(space.candidates), combo)), baseline, itemsize).latency
                  for combo in itertools.product(*(space.candidates[n] for n in sorted(space.candidates))))
    limits = Limits(latency=0.9 * fastest, bytes=None, flops=None, accuracy_drop=1.0)

    def verify(choices):
        e = estimate(space, choices, baseline, itemsize)
        return Verified(0.5 * e.latency, baseline.latency, baseline.metric - error_cost * e.error, e.bytes, e.flops)

    return space, baseline, itemsize, limits, verify


def test_a_plan_the_estimates_rule_out_but_the_measured_model_meets_is_feasible():
    """Layer sums can be pessimistic (each one-layer model pays its own session overhead): when
    no plan fits the estimated latency but the closest plan, measured whole, meets every limit,
    it is the answer, not an infeasible run."""
    space, baseline, itemsize, limits, verify = estimates_rule_everything_out(0.0)
    assert solve(space, baseline, limits, "latency", 1e9, itemsize) is None
    result = choose(space, baseline, limits, "latency", itemsize, verify)
    assert result.feasible and result.misses == {}
    assert result.verified.latency <= limits.latency


def test_when_the_estimates_rule_everything_out_the_measured_plans_are_judged_by_the_real_limits():
    """Among the relaxed search's verified plans, those whose measured figures meet every limit are
    judged by the user's objective; every step's misses are against the real limits."""
    space, baseline, itemsize, limits, verify = estimates_rule_everything_out(2.0)
    result = choose(space, baseline, limits, "memory", itemsize, verify)
    for step in result.steps:
        assert step.misses == misses(step.verified, baseline, limits)
    met = [s for s in result.steps if not s.misses]
    assert len({s.verified.bytes for s in met}) >= 2          # a real choice among measured plans
    assert result.feasible
    assert result.verified.bytes == min(s.verified.bytes for s in met)


def pair_space(rng):
    """Four layers l0..l3, pairs l0 -> l1 and l1 -> l2 (l1 is in both), with random figures."""
    space = random_space(rng, layers=4, per_layer=3)
    for producer, consumer, between in (("l0", "l1", 64), ("l1", "l2", 0)):
        p, c = space.dense(producer), space.dense(consumer)
        for keep in (8, 16, 24):
            share = float(rng.uniform(0.2, 0.9))
            space.candidates[producer].append(Candidate(
                producer, Choice("prune", {"keep": keep}, consumer), int(share * (p.params + c.params)) + between // 2,
                int(share * (p.flops + c.flops)), error=float(rng.uniform(0.01, 0.5)),
                latency=float(rng.uniform(0.3, 1.1)) * (p.latency + c.latency), covers=(consumer,),
                between_params=between))
    return space


def pair_brute_force(space, baseline, limits, error_budget):
    """Every assignment, a pruned pair's consumer required dense and counted inside the pair's
    figures; the model's latency and bytes summed from what each layer holds."""
    names = sorted(space.candidates)
    dense_latency = sum(space.dense(n).latency for n in names)
    between_all = sum({c.layer: c.between_params for n in names for c in space.candidates[n] if c.covers}.values())
    dense_params = sum(space.dense(n).params for n in names) + between_all
    best, best_latency = None, math.inf
    for combo in itertools.product(*(space.candidates[n] for n in names)):
        choices = dict(zip(names, combo))
        covered = {c.covers[0] for c in combo if c.covers}
        if any(not choices[n].is_dense for n in covered):
            continue
        held = [c for n, c in choices.items() if n not in covered]
        latency = baseline.latency - dense_latency + sum(c.latency for c in held)
        between_kept = between_all - sum(c.between_params for c in held if c.covers)
        params = sum(c.params for c in held) + between_kept
        model_bytes = baseline.bytes + 4 * (params - dense_params)
        error = sum(c.error ** 2 for c in combo)     # energies add (Space.weighted_error)
        if model_bytes > limits.bytes + 1e-9 or error > error_budget + 1e-12:
            continue
        if latency < best_latency - 1e-12:
            best, best_latency = choices, latency
    return best, best_latency


@pytest.mark.parametrize("seed", range(10))
def test_a_pruned_pair_is_one_choice_and_its_consumer_stays_dense(seed):
    rng = np.random.default_rng(100 + seed)
    space = pair_space(rng)
    itemsize = {n: 4 for n in space.candidates}
    total = sum(space.dense(n).params for n in space.candidates) + 64
    baseline = Baseline(latency=10.0, bytes=4 * total + 1000, flops=10**6, metric=90.0)
    limits = Limits(latency=None, bytes=baseline.bytes * float(rng.uniform(0.5, 0.95)), flops=None, accuracy_drop=1.0)
    budget = float(rng.uniform(0.2, 1.2))
    expected, expected_latency = pair_brute_force(space, baseline, limits, budget)
    got = solve(space, baseline, limits, "latency", budget, itemsize)
    if expected is None:
        assert got is None
        return
    covered = {c.covers[0] for c in got.values() if c.covers}
    assert all(got[n].is_dense for n in covered)
    assert estimate(space, got, baseline, itemsize).latency == pytest.approx(expected_latency, rel=1e-9)


def family_space(rng):
    """Four layers of full rank 16, every SVD rank 1..15; pairs l0 -> l1 and l2 -> l3 of 32 inner
    channels, every even keep. FLOPs and latency in proportion to rank (x1.5) and keep."""
    space = Space({})
    for i in range(4):
        name, flops = f"l{i}", int(rng.integers(10_000, 50_000))
        space.candidates[name] = [Candidate(name, DENSE, flops // 10, flops, error=0.0, latency=flops * 1e-6)]
        for r in range(1, 16):
            f = int(1.5 * flops * r / 16)
            space.candidates[name].append(Candidate(name, Choice("svd", {"rank": r}), f // 10, f,
                                                    error=0.3 * (1 - r / 16) ** 2, latency=f * 1e-6))
    for producer, consumer in (("l0", "l1"), ("l2", "l3")):
        both = space.dense(producer).flops + space.dense(consumer).flops
        for k in range(2, 32, 2):
            f = both * k // 32
            space.candidates[producer].append(Candidate(
                producer, Choice("prune", {"keep": k}, consumer), f // 10, f, error=0.2 * (1 - k / 32) ** 2,
                latency=f * 1e-6, covers=(consumer,)))
    sizes = {n: {"rank": 16} for n in space.candidates}
    sizes["l0"]["keep"] = sizes["l2"]["keep"] = 32
    return space, sizes


def family_baseline(space):
    dense = [space.dense(n) for n in space.candidates]
    return Baseline(latency=sum(c.latency for c in dense), bytes=4 * sum(c.params for c in dense),
                    flops=sum(c.flops for c in dense), metric=90.0)


@pytest.mark.parametrize("seed", range(4))
def test_uniform_plans_take_the_highest_fraction_the_limit_allows(seed):
    from denseflex_onnx.search import UNIFORM_FRACTIONS, uniform_plans
    space, sizes = family_space(np.random.default_rng(seed))
    baseline = family_baseline(space)
    limit = baseline.flops * float(np.random.default_rng(seed).uniform(0.3, 0.9))
    plans = {p.label.split()[0]: p for p in uniform_plans(space, sizes, baseline, Limits(None, None, limit, 1.0),
                                                        {n: 4 for n in space.candidates})}
    # by hand: the FLOPs of a fraction f everywhere, the highest f under the limit
    by_rank = {f: sum(next(c.flops for c in space.candidates[n] if c.choice.config.get("rank") == round(16 * f))
                      for n in space.candidates) for f in UNIFORM_FRACTIONS}
    by_keep = {f: sum(next(c.flops for c in space.candidates[p] if c.choice.config.get("keep") == round(32 * f))
                      for p in ("l0", "l2")) for f in UNIFORM_FRACTIONS}
    for family, flops in (("rank", by_rank), ("keep", by_keep)):
        allowed = [f for f, v in flops.items() if v <= limit]
        if not allowed:
            assert family not in plans
            continue
        plan = plans[family]
        assert plan.label == f"{family} {max(allowed):g} everywhere"
        assert sum(c.flops for c in plan.choices.values() if not (c.is_dense and any(
            c.layer in o.covers for o in plan.choices.values()))) == flops[max(allowed)]


def test_measured_uniform_plans_correct_how_pruning_is_weighed_and_aim_the_first_budget():
    """A model whose real drop is 1 point per unit of SVD error and 5 per unit of pruning error:
    the two uniform plans, verified first, measure that ratio; with it the first searched plan
    already keeps the accuracy limit, and the result is no worse than either uniform plan."""
    space, sizes = family_space(np.random.default_rng(0))
    baseline = family_baseline(space)
    itemsize = {n: 4 for n in space.candidates}
    limits = Limits(None, None, 0.7 * baseline.flops, accuracy_drop=1.0)
    from denseflex_onnx.search import uniform_plans
    uniform = uniform_plans(space, sizes, baseline, limits, itemsize)
    assert sorted(p.label.split()[0] for p in uniform) == ["keep", "rank"]

    def verify(choices):
        e = estimate(space, choices, baseline, itemsize)
        drop = sum(c.error ** 2 * (5.0 if c.choice.method == "prune" else 1.0) for c in choices.values())
        return Verified(e.latency, baseline.latency, baseline.metric - drop, int(e.bytes), int(e.flops))

    result = choose(space, baseline, limits, "latency", itemsize, verify, uniform=uniform)
    assert result.method_scale["prune"] == pytest.approx(5.0)
    assert [s.label is not None for s in result.steps[:2]] == [True, True]
    searched = [s for s in result.steps if s.label is None]
    assert searched and "accuracy drop" not in searched[0].misses
    assert result.feasible and baseline.metric - result.verified.metric <= 1.0
    met = [s for s in result.steps if s.label and not s.misses]
    assert all(result.verified.latency <= s.verified.latency + 1e-12 for s in met)


@pytest.mark.parametrize("seed", range(5))
def test_a_budget_below_what_the_limits_allow_jumps_to_the_least_error_plan(seed):
    """When the error budget is tighter than any plan within the limits allows, the next plan
    verified is the one with the least summed error within them (brute force), not a plan from
    the middle of the budget range; then, nothing better being estimated, the search stops, and
    since that plan lost the accuracy the closest plan is one that keeps it, nearer the limit."""
    rng = np.random.default_rng(200 + seed)
    space = random_space(rng, layers=3, per_layer=4)
    for cands in space.candidates.values():
        for c in cands[1:]:
            c.error = float(rng.uniform(0.3, 0.9))       # every choice costs much
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    itemsize = {n: 4 for n in space.candidates}
    dense_flops = sum(space.dense(n).flops for n in space.candidates)
    limits = Limits(None, None, baseline.flops - 0.3 * dense_flops, accuracy_drop=1.0)
    least, least_error = brute_force(space, baseline, limits, "accuracy", math.inf, itemsize)
    assert least is not None and least_error > ERROR_FLOOR * 3      # the first budget tried is below it

    def verify(choices):         # every plan loses far more than the limit
        e = estimate(space, choices, baseline, itemsize)
        return Verified(e.latency, baseline.latency, baseline.metric - 100 * e.error, e.bytes, e.flops)

    result = choose(space, baseline, limits, "latency", itemsize, verify)
    assert not result.feasible
    assert result.steps[0].estimate.error == pytest.approx(least_error, rel=1e-9)
    assert "accuracy drop" in result.steps[0].misses
    # then the relaxed search (FLOPs as the objective, no limit): half the verifications
    assert 2 <= len(result.steps) <= 1 + MAX_VERIFICATIONS // 2
    assert "accuracy drop" not in result.misses and "flops" in result.misses
    kept = [s for s in result.steps if "accuracy drop" not in s.misses]
    assert result.verified.flops == min(s.verified.flops for s in kept)


def test_the_result_is_the_plan_that_measured_best_not_the_one_estimated_best():
    """Whole models do not run at their summed one-layer latencies: a uniform plan estimated
    slower than the searched ones but measured 3x faster than any of them must be the result."""
    space, sizes = family_space(np.random.default_rng(0))
    baseline = family_baseline(space)
    itemsize = {n: 4 for n in space.candidates}
    limits = Limits(0.9 * baseline.latency, None, None, accuracy_drop=1.0)
    from denseflex_onnx.search import uniform_plans
    uniform = uniform_plans(space, sizes, baseline, limits, itemsize)

    def verify(choices):
        e = estimate(space, {n: c for n, c in choices.items() if c.latency is not None}, baseline, itemsize)
        measured = 0.1 * baseline.latency if any(p.choices == choices for p in uniform) else 0.3 * baseline.latency
        return Verified(measured, baseline.latency, baseline.metric - 0.5, int(e.bytes), int(e.flops))

    result = choose(space, baseline, limits, "latency", itemsize, verify, uniform=uniform)
    assert uniform and result.feasible and result.verified.latency == pytest.approx(0.1 * baseline.latency)
    assert any(s.label is None for s in result.steps)          # the search's plans were verified too


def test_the_next_budget_is_read_off_the_measured_plans_in_log_log():
    """drop = 40 x error^2 exactly: from a plan below the aimed drop and one far above it, the
    secant in log-log lands on the error whose drop is AIM x the limit; from the far one alone,
    proportional scaling would aim 20x lower than that."""
    from denseflex_onnx.search import AIM, Step, _aimed, Estimate
    baseline = Baseline(1.0, 1000, 1000, 90.0)
    limits = Limits(None, None, None, accuracy_drop=1.0)
    drop = lambda e: 40.0 * e ** 2

    def step(e):
        return Step(None, None, {}, Estimate(1.0, 1000, 1000, e), verified=Verified(1.0, 1.0, 90.0 - drop(e), 1, 1))

    aimed = _aimed([step(0.05), step(1.0)], baseline, limits, 1e-6, 100.0)
    assert drop(aimed) == pytest.approx(AIM * limits.accuracy_drop, rel=1e-9)
    alone = _aimed([step(1.0)], baseline, limits, 1e-6, 100.0)
    assert alone == pytest.approx(AIM / 40.0) and alone < aimed / 5


def test_a_plan_that_lost_the_accuracy_caps_the_relaxed_search():
    """The relaxed search starts from what the first one measured: a plan estimated at error e
    that lost the accuracy bounds its budgets below e, so its plans are not worse ones again."""
    from denseflex_onnx.search import Step
    space = random_space(np.random.default_rng(11), layers=3, per_layer=5)
    baseline = Baseline(10.0, 100_000, 200_000, 90.0)
    itemsize = {n: 4 for n in space.candidates}
    limits = Limits(None, None, None, accuracy_drop=1.0)
    worst = {n: max(space.alive(n), key=lambda c: c.error) for n in space.candidates}
    e = estimate(space, worst, baseline, itemsize)
    lost = Step(None, None, worst, e, verified=Verified(1.0, 10.0, 80.0, 1, 1), misses={"accuracy drop": (10.0, 1.0)})

    def verify(choices):
        est = estimate(space, choices, baseline, itemsize)
        return Verified(est.latency, baseline.latency, baseline.metric - 20.0 * est.error, int(est.bytes), int(est.flops))

    result = choose(space, baseline, limits, "latency", itemsize, verify, 2, measured=[lost])
    assert result.steps and all(s.error_budget < e.error for s in result.steps)


def test_plans_measured_within_noise_of_each_other_are_ranked_by_their_estimate():
    from denseflex_onnx.search import LATENCY_TIE, Estimate, Step, _best

    def step(measured, estimated):
        return Step(None, None, {}, Estimate(estimated, 1, 1, 0.1), verified=Verified(measured, 1.0, 90.0, 1, 1))

    near = [step(0.500, 0.30), step(0.500 * (1 + LATENCY_TIE / 2), 0.20)]
    assert _best(near, "latency") is near[1]          # a tie: the estimate decides, whatever the order
    assert _best(near[::-1], "latency") is near[1]
    apart = [step(0.500, 0.30), step(0.600, 0.20)]
    assert _best(apart, "latency") is apart[0]        # measured apart: the measurement decides
