"""Stage 3, space: every pass's candidates per layer, their analytic cost and layer error,
and the pruning that decides what is worth timing.

Pruning, counted stage by stage as in Denseflex:
  (1) drop candidates that reduce neither the weights nor the FLOPs of the dense layer;
  (2) drop candidates Pareto-dominated on (params, FLOPs, layer error), before any timing;
  (3) after timing (profile.py), drop those dominated on (latency, params, FLOPs, error).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import about_layer
from .layers import Layer
from .model import first_line
from .passes import PASSES, svd
from .plan import DENSE, Choice

log = logging.getLogger("denseflex_onnx")

SAVES_NOTHING = "saves nothing"
DOMINATED = "dominated"
DOMINATED_TIMED = "dominated after timing"
NOT_TIMED = "not timed (time budget)"
TIMING_FAILED = "timing failed"
FORCED = "another choice forced (--layer)"
SCORING_FAILED = "scoring failed"
CANNOT_PAY_OFF = "cannot pay off"


@dataclass
class Candidate:
    layer: str
    choice: Choice
    params: int
    flops: int
    error: float = math.nan           # relative output error, X^T X as Factors.fit_stats expects it
    latency: float | None = None      # median seconds of the one-layer model
    latency_bound: bool = False       # `latency` is a lower bound, not timed (profile.measure_space lazy)
    p90: float | None = None
    dropped: str | None = None        # the pruning stage that removed it, if any
    # a pair candidate (prune) also replaces these layers (its consumer), which then stay dense;
    # its params, FLOPs and latency are the whole pair's, `between_params` the per-channel
    # constants between the layers that the dense pair holds besides the two weights
    covers: tuple[str, ...] = ()
    between_params: int = 0

    @property
    def spec(self) -> str:
        return self.choice.spec

    @property
    def is_dense(self) -> bool:
        """The layer as it is (`dense+int8` is not: its weights change)."""
        return not self.choice.changes

    @property
    def weight_size(self) -> float:
        """Its weights in float32 parameters' worth of bytes: an INT8 weight takes a quarter
        (int8.py offers INT8 only for float32 layers)."""
        return self.params / 4 if self.choice.int8 else self.params


@dataclass
class Space:
    candidates: dict[str, list[Candidate]]        # by layer; the dense candidate first
    stage_counts: dict[str, int] = field(default_factory=dict)
    # how much a unit of this layer's error costs end to end, relative to the others (--sensitivity)
    error_scale: dict[str, float] = field(default_factory=dict)
    # the same by method, corrected from measured plans (search.corrected): prune vs factorization
    method_scale: dict[str, float] = field(default_factory=dict)
    # times candidates whose latency is only a bound (profile.measure_space, lazy); None: all timed
    timer: Callable[[list["Candidate"]], None] | None = field(default=None, repr=False, compare=False)

    def time(self, cands) -> None:
        """Replace the latency bounds among `cands` by timings (a bound left untimed is dropped)."""
        pending = [c for c in cands if c.latency_bound]
        if pending and self.timer is not None:
            self.timer(pending)

    def weighted_error(self, cand: Candidate) -> float:
        """What the solver adds up for a layer: its squared relative error (a pair's at its
        consumer's output), weighted. Squared because layer errors reach the output as
        perturbations in nearly independent directions, whose energies add, and a similarity
        metric loses about half that energy (1 - cos(y, y + d) ~ |d|^2 / 2|y|^2). A sum of plain
        relative errors favours a few large errors over many small ones of the same energy by
        sqrt(n): on MiniLM-L6 it chose rank 16 in an FFN projection and lost 8 cosine points
        where the estimate said 1.3."""
        return (cand.error ** 2 * self.error_scale.get(cand.covers[-1] if cand.covers else cand.layer, 1.0)
                * self.method_scale.get(cand.choice.method, 1.0))

    def dense(self, layer: str) -> Candidate:
        return next(c for c in self.candidates[layer] if c.is_dense)

    def delta(self, cand: Candidate, key: str) -> float:
        """What choosing `cand` changes in the model's `key` (latency, params, flops): its value
        less the dense layers it replaces."""
        replaced = sum(getattr(self.dense(name), key) for name in (cand.layer, *cand.covers))
        extra = cand.between_params if key in ("params", "weight_size") else 0
        return getattr(cand, key) - replaced - extra

    def couplings(self) -> dict[str, str]:
        """Producer -> consumer of every pair with a live candidate: when the pair is pruned,
        its consumer must stay dense (the MILP's coupling rows)."""
        return {c.layer: c.covers[0] for cands in self.candidates.values() for c in cands
                if c.covers and c.dropped is None}

    def alive(self, layer: str) -> list[Candidate]:
        return [c for c in self.candidates[layer] if c.dropped is None]

    def all(self) -> list[Candidate]:
        return [c for cands in self.candidates.values() for c in cands]


def pair_grid(pair) -> list[Candidate]:
    """A layer pair's candidates, each keeping some of its inner channels (passes/prune.py)."""
    module = PASSES["prune"]
    if module.applies(pair) is not None:
        return []
    return [pair_candidate(pair, Choice("prune", config, consumer=pair.consumer.name))
            for config in module.candidates(pair)]


def pair_candidate(pair, choice: Choice) -> Candidate:
    return Candidate(pair.name, choice, *PASSES[choice.method].cost(pair, choice.config),
                     covers=(pair.consumer.name,), between_params=sum(c.value.size for c in pair.sliced))


def grid(layer: Layer, methods: list[str] | None = None) -> list[Candidate]:
    """The layer's full design space: dense plus every applicable pass's configs."""
    cands = [Candidate(layer.name, DENSE, layer.params, layer.flops, error=0.0)]
    for name, module in PASSES.items():
        if methods is not None and name not in methods:
            continue
        if module.applies(layer) is not None:
            continue
        for config in module.candidates(layer):
            params, flops = module.cost(layer, config)
            cands.append(Candidate(layer.name, Choice(name, config), params, flops))
    return cands


# A layer below both shares cannot pay for the node a rewrite adds: it is kept dense before
# any statistics or decomposition is computed for it.
NEGLIGIBLE_SHARE = 0.005


def cannot_pay_off(layer: Layer, methods: list[str] | None = None) -> str | None:
    """Why factorizing this layer cannot pay off, from its costs alone, or None.

    Either no candidate of any pass saves weights or FLOPs (pruning stage 1, known before any
    data is seen), or the layer holds a negligible share of the model's FLOPs and weights."""
    if layer.flops_share < NEGLIGIBLE_SHARE and layer.params_share < NEGLIGIBLE_SHARE:
        return (f"negligible: {100 * layer.flops_share:.2f}% of the FLOPs and "
                f"{100 * layer.params_share:.2f}% of the weights")
    if not any(c.params < layer.params or c.flops < layer.flops for c in grid(layer, methods)[1:]):
        return "no candidate saves weights or FLOPs"
    return None


def largest_rank(layer: Layer, methods: list[str] | None = None) -> int:
    """The largest rank an SVD-family candidate takes in the input space: what a sketch of
    the layer's input statistics must hold."""
    return max((c.choice.config.get("rank", 0) for c in grid(layer, methods)[1:]), default=0)


def grid_rank(layer: Layer, method: str) -> int:
    """The largest rank the method's candidates take on this layer (0 if none)."""
    return max((c.choice.config.get("rank", 0) for c in grid(layer, [method])[1:]), default=0)


class Factors:
    """Factors and layer errors for one run, computing each decomposition once.

    Decompositions are kept per (layer, method) for the life of this object, never
    in globals; `stats` are the calibration statistics, `mode` plain|scaled|whitened.
    `held_out`: statistics of calibration samples that `stats` do not hold, where layer errors
    are measured (calibrate.scoring_parts): a fit's error on the samples it was fitted to
    flatters it, the more so the fewer samples per input dimension (MiniLM-L6's FFN, pruned to
    a quarter: 0.21 on its 2.8k calibration tokens, 0.27 on others), and by more for some
    candidates than for others.
    """

    def __init__(self, layers: dict[str, Layer], stats=None, mode: str = "plain", held_out=None, memo=None):
        self.layers = layers
        # (results.Results, which statistics these are): where pure results too costly to redo
        # in a warm run are kept (prune's removal orders: 46% of a warm MiniLM-L6 run)
        self.memo = memo
        self.stats = stats or {}
        self.mode = mode
        self.held_out = held_out or {}
        self._decompositions: dict[tuple[str, str], object] = {}
        self._grid_ranks: dict[tuple[str, str], int] = {}
        self._references: dict[str, float] = {}
        self._fit_stats: dict[str, object] = {}
        self._score_stats: dict[str, object] = {}
        self._held_energies: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
        self._pairs: dict[tuple[str, str], list] = {}       # (producer, spec) -> prune factors
        self._orders: dict[str, object] = {}                # producer -> prune.removal_order

    def fit_stats(self, layer: Layer):
        """The statistics the passes fit to: centered where the bias is corrected, and shrunk
        toward isotropic where the calibration rows are few (LayerStats.expected)."""
        if layer.name not in self._fit_stats:
            stats = self.stats.get(layer.name)
            self._fit_stats[layer.name] = None if stats is None else stats.expected(self._corrects_bias(layer))
        return self._fit_stats[layer.name]

    def score_stats(self, layer: Layer):
        """The statistics layer errors are measured on: the held-out samples' as observed (centered
        like fit_stats), else fit_stats."""
        if layer.name not in self._score_stats:
            held = self.held_out.get(layer.name)
            self._score_stats[layer.name] = self.fit_stats(layer) if held is None else \
                held.observed(self._corrects_bias(layer))
        return self._score_stats[layer.name]

    def _corrects_bias(self, layer: Layer) -> bool:
        return self.mode != "plain" and layer.side != "left"

    def decomposition(self, layer: Layer, method: str, max_rank: int | None = None):
        """The cached decomposition; computed again only when a higher rank is asked of a partial one.

        A partial one always holds at least the largest rank of the method's grid (a randomized SVD's
        leading triplets depend on how many were asked for): the factors of a rank are then the same
        whatever was asked before, so a run that reuses cached results, and `apply --plan`, write
        the same bytes."""
        if max_rank is not None:
            if (layer.name, method) not in self._grid_ranks:
                self._grid_ranks[layer.name, method] = grid_rank(layer, method)
            max_rank = max(max_rank, self._grid_ranks[layer.name, method])
        key = (layer.name, method)
        cached = self._decompositions.get(key)
        if key not in self._decompositions or (cached is not None and max_rank is not None
                                               and len(cached.s) < min(max_rank, *cached_shape(cached))):
            self._decompositions[key] = PASSES[method].decompose(
                layer, self.fit_stats(layer), max_rank, self.mode)
        return self._decompositions[key]

    def factors(self, layer: Layer, choice: Choice, max_rank: int | None = None) -> list[np.ndarray]:
        module = PASSES[choice.method]
        max_rank = max_rank or choice.config.get("rank")
        return module.factorize(layer, choice.config, self.fit_stats(layer),
                                self.decomposition(layer, choice.method, max_rank), self.mode)

    def release(self, layer: Layer, keep: tuple[str, ...] = ("svd", "conv_svd")) -> None:
        """Forget a layer's decompositions except the cheap-to-keep SVD family (they make the
        chosen plans' factors quickly); the others are recomputed if ever needed again."""
        for key in [k for k in self._decompositions if k[0] == layer.name and k[1] not in keep]:
            del self._decompositions[key]
        for key in [k for k in self._held_energies if k[0] == layer.name]:
            del self._held_energies[key]
        self._references.pop(layer.name, None)
        self._fit_stats.pop(layer.name, None)
        self._score_stats.pop(layer.name, None)
        self._orders.pop(layer.name, None)
        for key in [k for k in self._pairs if k[0] == layer.name]:
            del self._pairs[key]

    def rewrite_inputs(self, layer: Layer, choice: Choice) -> tuple[Layer, list[np.ndarray]]:
        """The factors, and the layer as its rewrite should see it.

        In the data-aware modes the bias is corrected: shifted by the mean output difference
        on the calibration data, mean(x) @ (W - W'), so the factorized layer is unbiased
        there. Plain plans stay reproducible without data, so they get no correction.
        """
        factors = self.factors(layer, choice)
        stats = self.stats.get(layer.name)
        if stats is None or not self._corrects_bias(layer):
            return layer, factors
        approx = PASSES[choice.method].reconstruct(layer, factors)
        shift = stats.mean @ as_matrix(layer, layer.weight.astype(np.float64) - approx)
        bias = shift if layer.bias is None else layer.bias.astype(np.float64) + shift
        return dataclasses.replace(layer, bias=bias.astype(layer.dtype)), factors

    def pair_stats(self, pair):
        """The statistics a pruned pair's consumer is refitted on: none for a plain plan, which
        stays reproducible without data (the rows are sliced as they are)."""
        return None if self.mode == "plain" else self.stats.get(pair.consumer.name)

    def pair_factors(self, pair, choice: Choice) -> list:
        key = (pair.name, choice.spec)
        if key not in self._pairs:
            module, stats = PASSES[choice.method], self.pair_stats(pair)
            if pair.name not in self._orders:       # one greedy order serves every keep
                self._orders[pair.name] = self._removal_order(module, pair, stats) if module.GREEDY else None
            self._pairs[key] = module.factorize(pair, choice.config, stats, order=self._orders[pair.name])
        return self._pairs[key]

    def _removal_order(self, module, pair, stats):
        what = None if self.memo is None else {"pair": pair.name, "statistics of": self.memo[1]}
        stored = self.memo[0].get_arrays("removal order", what) if what else None
        if stored is not None and "order" in stored:
            return stored["order"] if stored["order"].size else None
        order = module.removal_order(pair, stats)
        if what:
            self.memo[0].put_arrays("removal order", what, {"order": np.array([] if order is None else order,
                                                                               dtype=np.int64)})
        return order

    def pair_error(self, pair, choice: Choice) -> float:
        """The consumer's relative output error once the pair is pruned and refitted, on the
        consumer's statistics as fit_stats gives them: on one scale with its other candidates."""
        from .passes import prune
        kept, _, _, w2, _ = self.pair_factors(pair, choice)
        diff = prune.consumer_matrix(pair)
        diff[prune.rows_of(kept, prune.block(pair))] -= prune.consumer_matrix_of(pair, w2)
        consumer = self.layers[pair.consumer.name]
        reference = self._reference(consumer)
        return float(np.sqrt(max(output_energy(diff, self.score_stats(consumer)), 0.0)) / reference) \
            if reference > 0 else 0.0

    def error(self, layer: Layer, choice: Choice, max_rank: int | None = None) -> float:
        """Relative output error ||X W - X W'|| / ||X W||, X^T X as fit_stats expects it (X centered
        where the bias is corrected, so plain and data-aware errors are not on one scale)."""
        if choice.method == "dense":
            return 0.0
        d = self.decomposition(layer, choice.method, max_rank)
        if hasattr(d, "relative_error") and getattr(d, "refit", None) is None:
            # SVD family: a cumulative sum, exact, on the held-out statistics too
            if layer.name not in self.held_out:
                return d.relative_error(choice.config["rank"])
            key = (layer.name, choice.method)
            if key not in self._held_energies or len(self._held_energies[key][0]) < len(d.s):
                self._held_energies[key] = svd.energies_on(d, as_matrix(layer, layer.weight.astype(np.float64)),
                                                           self.score_stats(layer).gram)
            energy, total = self._held_energies[key]
            kept = float(np.sum(energy[:choice.config["rank"]]))
            return float(np.sqrt(max(total - kept, 0.0) / total)) if total > 0 else 0.0
        approx = PASSES[choice.method].reconstruct(layer, self.factors(layer, choice))
        diff = as_matrix(layer, layer.weight.astype(np.float64) - approx)
        reference = self._reference(layer)
        return float(np.sqrt(max(output_energy(diff, self.score_stats(layer)), 0.0)) / reference) \
            if reference > 0 else 0.0

    def _reference(self, layer: Layer) -> float:
        """||X W||, X^T X as score_stats gives it."""
        if layer.name not in self._references:
            w = as_matrix(layer, layer.weight.astype(np.float64))
            self._references[layer.name] = float(np.sqrt(max(output_energy(w, self.score_stats(layer)), 0.0)))
        return self._references[layer.name]


def change_of(factors: Factors, cand: Candidate, layers: dict, pairs) -> tuple[Layer, np.ndarray]:
    """The layer whose output a candidate changes (a pair's consumer) and by how much, as the
    matrix D with output change x @ D, from the factors `factors` fits."""
    from .passes import prune
    if cand.covers:
        pair = pairs.pair(cand.layer)
        kept, _, _, w2, _ = factors.pair_factors(pair, cand.choice)
        diff = prune.consumer_matrix(pair)
        diff[prune.rows_of(kept, prune.block(pair))] -= prune.consumer_matrix_of(pair, w2)
        return pair.consumer, diff
    layer = layers[cand.layer]
    approx = PASSES[cand.choice.method].reconstruct(layer, factors.factors(layer, cand.choice))
    return layer, as_matrix(layer, layer.weight.astype(np.float64) - approx)


def relative_output_error(layer: Layer, diff: np.ndarray, stats) -> float:
    """||X D|| / ||X W|| on these statistics."""
    reference = output_energy(as_matrix(layer, layer.weight.astype(np.float64)), stats)
    return float(np.sqrt(max(output_energy(diff, stats), 0.0) / reference)) if reference > 0 else 0.0


def output_energy(m: np.ndarray, stats) -> float:
    """||X M||^2 = tr(M^T X^T X M), from the statistics alone (any X^T X they keep)."""
    return float(np.sum(m * m)) if stats is None else float(np.sum(m * (stats.gram @ m)))


def cached_shape(d) -> tuple[int, int]:
    """The full shape of the matrix an SVD-family decomposition came from."""
    return d.u.shape[0], d.vt.shape[1]


def as_matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The weight as x @ M for the layer's input vectors."""
    if layer.op == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if layer.side == "left" else w


def build(layers: list[Layer], factors: Factors, methods: list[str] | None = None,
          forced: dict[str, Choice] | None = None, on_layer=None, prune: bool = True,
          kept_dense: dict[str, str] | None = None, pairs: list | None = None,
          known_errors: dict[str, dict[str, float]] | None = None, jobs: int = 1,
          working_memory: int | None = None) -> Space:
    """Grid, stage 1, layer errors, stage 2. Forced layers (`--layer`, `--exclude`) get one candidate;
    `kept_dense` layers (cannot_pay_off) their whole grid, dropped unscored with the reason.
    `pairs` (pairs.Pair, none of whose layers is forced) add their prune candidates to their
    producer's list: a pair is one choice, whether or not its layers could pay off alone.
    `known_errors`: per layer (a pair: its producer), errors by spec that an earlier run with the
    same inputs computed (results.py); a layer whose candidates are all known is not decomposed.

    `jobs` layers are scored at once (threads: numpy's LAPACK calls release the GIL), each with
    its own single-threaded BLAS, so the errors are bitwise those of one job; layers start only
    while what they work on (layer_working_bytes) fits `working_memory` together. Layers touch
    only their own entries of `factors`; pairs, which read their consumer's, are scored after.

    `prune=False` keeps the whole grid (every candidate gets timed): the exhaustive
    reference the pruned search is checked against.
    """
    forced = forced or {}
    kept_dense = kept_dense or {}
    known_errors = known_errors or {}
    by_producer = {p.name: p for p in pairs or []}
    space = Space({})
    counts = {"grid": 0, "after_saves_nothing": 0, "after_dominated": 0}

    def one_layer(layer: Layer) -> tuple[list[Candidate], dict]:
        mine = dict.fromkeys(counts, 0)
        if layer.name in forced:
            return _forced_candidates(layer, forced[layer.name], factors, by_producer.get(layer.name)), \
                dict.fromkeys(counts, 1)
        cands = grid(layer, methods)
        mine["grid"] += len(cands)
        if layer.name in kept_dense:
            for c in cands[1:]:
                c.dropped = f"{CANNOT_PAY_OFF} ({kept_dense[layer.name]})"
            mine["after_saves_nothing"] += 1
            mine["after_dominated"] += 1
        else:
            _score(layer.name, cands, lambda c, ranks: factors.error(layer, c.choice, ranks.get(c.choice.method)),
                   (layer.params, layer.flops), prune, mine, known_errors.get(layer.name, {}))
            factors.release(layer)
        return cands, mine

    def one_pair(pair) -> tuple[list[Candidate], dict]:
        mine = dict.fromkeys(counts, 0)
        cands = pair_grid(pair)
        mine["grid"] += len(cands)
        _score(pair.name, cands, lambda c, _: factors.pair_error(pair, c.choice), (pair.params, pair.flops),
               prune, mine, known_errors.get(pair.name, {}))
        factors.release(pair.producer)
        return cands, mine

    for layer, (cands, mine) in _in_parallel(one_layer, layers, jobs, working_memory,
                                              lambda l: layer_working_bytes(l, factors)):
        space.candidates[layer.name] = cands
        counts = {k: counts[k] + mine[k] for k in counts}
        if on_layer:
            on_layer(layer)
    scored = [p for p in by_producer.values() if p.name not in forced and p.consumer.name not in forced]
    for pair, (cands, mine) in _in_parallel(one_pair, scored, jobs, working_memory,
                                             lambda p: layer_working_bytes(p.consumer, factors)):
        space.candidates[pair.name].extend(cands)
        counts = {k: counts[k] + mine[k] for k in counts}
    space.stage_counts = counts
    return space


def layer_working_bytes(layer: Layer, factors: Factors) -> int:
    """About what scoring a layer holds while it runs: float64 copies of its weight, and of its
    X^T X where it is kept whole (calibrate.FULL_GRAM_WORKING_COPIES of them)."""
    from .calibrate import FULL_GRAM_WORKING_COPIES
    k = layer.matrix_shape[0]
    gram = FULL_GRAM_WORKING_COPIES * 8 * k * k if getattr(factors.stats.get(layer.name), "kind", "") == "full" else 0
    return gram + 6 * 8 * layer.weight.size


def _in_parallel(work, items: list, jobs: int, memory: int | None, cost):
    """(item, work(item)) in the items' order, up to `jobs` at once, starting one only while the
    costs of those running fit `memory` (one always runs). Exceptions propagate as from a loop.
    BLAS runs single-threaded whatever `jobs` is, so the results do not depend on it."""
    from threadpoolctl import threadpool_limits
    if jobs <= 1 or len(items) <= 1:
        with threadpool_limits(limits=1, user_api="blas"):
            for item in items:
                yield item, work(item)
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor
    room = threading.Condition()
    running = [0]

    def admitted(item):
        need = cost(item)
        with room:
            room.wait_for(lambda: running[0] == 0 or memory is None or running[0] + need <= memory)
            running[0] += need
        try:
            return work(item)
        finally:
            with room:
                running[0] -= need
                room.notify_all()

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(admitted, item) for item in items]
        try:
            for item, future in zip(items, futures):
                yield item, future.result()
        finally:
            for future in futures:
                future.cancel()


def _forced_candidates(layer: Layer, choice: Choice, factors: Factors, pair) -> list[Candidate]:
    """The dense reference (dropped unless dense is what is forced) and the forced choice."""
    dense = Candidate(layer.name, DENSE, layer.params, layer.flops, error=0.0)
    if not choice.changes:
        return [dense]
    dense.dropped = FORCED
    if choice.consumer:
        cand = pair_candidate(pair, choice)
        cand.error = factors.pair_error(pair, choice)
    else:
        cand = Candidate(layer.name, choice, *_cost(layer, choice))
        cand.error = factors.error(layer, choice)
    return [dense, cand]


def _score(name: str, cands: list[Candidate], error_of, dense_cost: tuple[int, int], prune: bool,
           counts: dict, known: dict[str, float]) -> None:
    """Stage 1 (saves nothing), the errors of what is left, stage 2 (dominated) on one list:
    a layer's grid (dense first) or a pair's candidates (compared among themselves).
    `error_of(candidate, max_ranks)`: max_ranks is the highest rank each SVD-family method
    needs here, so one partial decomposition serves them all; `known` errors by spec are taken
    as they are."""
    params, flops = dense_cost
    for c in cands:
        if not c.is_dense and prune and c.params >= params and c.flops >= flops:
            c.dropped = SAVES_NOTHING
    alive = [c for c in cands if c.dropped is None]
    counts["after_saves_nothing"] += len(alive)
    ranks = _max_ranks(alive)
    try:
        with about_layer(name):
            for c in alive:
                if not c.is_dense:
                    c.error = known[c.spec] if c.spec in known else error_of(c, ranks)
    except (MemoryError, np.linalg.LinAlgError) as exc:    # this layer's weights or data: not the run
        log.warning("%s: its candidates could not be scored (%s: %s); kept dense (--exclude %s "
                    "skips it; --memory-budget if memory ran out)", name, type(exc).__name__,
                    first_line(exc), name)
        for c in alive:
            if not c.is_dense:
                c.dropped = f"{SCORING_FAILED}: {type(exc).__name__}"
        alive = [c for c in alive if c.is_dense]
    for c in dominated(alive, ("params", "flops", "error")) if prune else []:
        c.dropped = DOMINATED
    counts["after_dominated"] += sum(c.dropped is None for c in cands)


def _cost(layer: Layer, choice: Choice) -> tuple[int, int]:
    if choice.method == "dense":
        return layer.params, layer.flops
    return PASSES[choice.method].cost(layer, choice.config)


def _max_ranks(cands: list[Candidate]) -> dict[str, int]:
    """The highest rank each SVD-family method needs: a partial decomposition suffices."""
    out: dict[str, int] = {}
    for c in cands:
        if "rank" in c.choice.config:
            out[c.choice.method] = max(out.get(c.choice.method, 0), c.choice.config["rank"])
    return out


def dominated_by_group(cands: list[Candidate], keys: tuple[str, ...]) -> list[Candidate]:
    """`dominated` within each group that shares a reference: a layer's own candidates (with
    dense), and each pair's candidates among themselves (their figures span two layers)."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(c.covers, []).append(c)
    return [c for group in groups.values() for c in dominated(group, keys)]


def dominated(cands: list[Candidate], keys: tuple[str, ...]) -> list[Candidate]:
    """Candidates some other candidate beats or ties on every key and beats on one.

    The dense candidate is never dropped: "keep it dense" stays a choice.
    """
    values = [tuple(_key(c, k) for k in keys) for c in cands]
    out = []
    for i, c in enumerate(cands):
        if c.is_dense:
            continue
        vi = values[i]
        for j, vj in enumerate(values):
            if cands[j].latency_bound and "latency" in keys:   # a bound beats nothing: it may be low
                continue
            if j != i and all(b <= a for a, b in zip(vi, vj)) and (vj != vi or j < i):
                out.append(c)
                break
    return out


def _key(c: Candidate, key: str) -> float:
    value = getattr(c, key)
    return math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else value
