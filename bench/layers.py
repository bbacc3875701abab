"""Per-layer efficiency: how close each factorized layer comes to what its FLOPs promise.

FC shapes 768x3072, 1024x1024, 4096x1024, 4096x4096 (K x N, y = x @ W + b) and 3x3 convs
64@56x56, 256@14x14, 512@7x7 (Cin = Cout @ H x W, stride 1, pad 1), at batch 64 and 1. For every
pass and a range of ranks, the latency ratio (factorized / dense) is set against the two limits:
the FLOPs ratio and the weight-bytes ratio. `efficiency` = FLOPs ratio / latency ratio: 1.0 means
the factorized layer is exactly as fast as its FLOP count promises. TT is also timed as a chain
of Einsum nodes against the tool's MatMul chain.

Speed is measured as ratios within one run: each group (one layer at one batch) times the dense
layer and every variant in rounds, dense between rounds, so every factorized timing is bracketed
by two dense ones (machine noise cancels in the ratio); the ratio quoted is the median over rounds.
Repeats are bounded by time (profile.Budget); the whole run fits `budget_s`, cutting repeats first
and then the most expensive groups (said in the markdown).

    python bench/layers.py --budget 360
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from denseflex_onnx import costs
from denseflex_onnx.layers import Layer
from denseflex_onnx.passes import conv_svd, conv_tt, svd, tt
from denseflex_onnx.plan import DENSE, Choice
from denseflex_onnx.profile import Budget, cpu_model, time_session
from denseflex_onnx.rewrite import one_layer_model
from denseflex_onnx.runtime import create_session, max_ir_version

PROVIDER = "CPUExecutionProvider"
THREADS = 1
OPSET = 17

FC_SHAPES = ((768, 3072), (1024, 1024), (4096, 1024), (4096, 4096))      # K x N
CONV_SHAPES = ((64, 56), (256, 14), (512, 7))                            # C @ H x H, 3x3
BATCHES = (64, 1)
SVD_FRACTIONS = (16, 8, 4, 2)           # rank = min(K, N) / f, below break-even only
CONV_FRACTIONS = (8, 4, 2)              # of the full rank(s), rounded to multiples of 8
TT_BONDS = (8, 16, 32)                  # on the most balanced 3-mode shape
EINSUM_SHAPES = ((768, 3072), (4096, 4096))   # TT also as an Einsum chain
# layers with at most this many weights get a real decomposition (cheap); bigger ones get random
# factors of the shapes the pass produces, through the pass's own factorize where it takes a
# decomposition (timing does not depend on the values; a full SVD of 4096x4096 takes minutes here)
REAL_FACTORS_MAX_WEIGHTS = 600_000
MIN_RUNS = 3
MAX_RUNS = 200
CHECK_TOLERANCE = 1e-3                  # max |y - y_ref| / max |y_ref|, fp32 vs float64 numpy

# (rounds, max_seconds per measurement), best first. Repeats are cut down to the FLOOR-th setting
# so that every remaining group fits; below it only to fit the current group when nothing else does.
SETTINGS = ((5, 0.25), (5, 0.15), (5, 0.10), (5, 0.06), (5, 0.04), (3, 0.06), (3, 0.04),
            (3, 0.025), (3, 0.015), (2, 0.015), (2, 0.008))
FLOOR = 8


# ----------------------------------------------------------------------------- layers

def fc_layer(k: int, n: int, batch: int, weight: np.ndarray, bias: np.ndarray) -> Layer:
    return Layer(name=f"fc_{k}x{n}", op="MatMul", input="x", output="y", node_outputs=("y",),
                 weight=weight, bias=bias, activation_shape=(batch, k), output_shape=(batch, n),
                 params=weight.size + bias.size, flops=costs.matmul_flops(batch, k, n))


def conv_layer(c: int, hw: int, batch: int, weight: np.ndarray, bias: np.ndarray) -> Layer:
    out = (batch, c, hw, hw)
    return Layer(name=f"conv_{c}at{hw}", op="Conv", input="x", output="y", node_outputs=("y",),
                 weight=weight, bias=bias, activation_shape=(batch, c, hw, hw), output_shape=out,
                 attrs={"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]},
                 params=weight.size + bias.size, flops=costs.conv_flops(out, c, (3, 3)))


class Weights:
    """Random weights, one per shape, shared by the groups that use that shape."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self._kept: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if shape not in self._kept:
            fan_in = costs.prod(shape[1:]) if len(shape) == 4 else shape[0]
            w = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / math.sqrt(fan_in))
            out = shape[0] if len(shape) == 4 else shape[1]
            self._kept[shape] = (w, (0.01 * self.rng.standard_normal(out)).astype(np.float32))
        return self._kept[shape]


def shape_text(layer: Layer) -> str:
    if layer.op == "Conv":
        h, w = layer.activation_shape[2:]
        return f"{layer.weight.shape[1]}@{h}x{w} 3x3"
    k, n = layer.weight.shape
    return f"{k}x{n}"


# ----------------------------------------------------------------------------- random factors

def random_decomposition(rng, rows: int, cols: int, rank: int) -> svd.Decomposition:
    """An svd.Decomposition of the right shapes with a decaying spectrum (no SVD taken)."""
    u = rng.standard_normal((rows, rank)) / math.sqrt(rows)
    vt = rng.standard_normal((rank, cols)) / math.sqrt(cols)
    s = np.geomspace(1.0, 1e-2, rank)
    return svd.Decomposition(u, s, vt, None, s ** 2, float(np.sum(s ** 2)))


class RandomSVD:
    """tensorly's SVD signature, random factors of the requested shapes: TT-SVD's layout, no cost."""

    def __init__(self, rng):
        self.rng = rng

    def for_modes(self, modes):
        """What passes/tt.py asks of its decomposition: an SVD function for these modes."""
        return self

    def __call__(self, matrix, n_eigenvecs=None, **_):
        m, n = matrix.shape
        k = min(m, n, n_eigenvecs or min(m, n))
        return (self.rng.standard_normal((m, k)) / math.sqrt(m), np.geomspace(1.0, 1e-2, k),
                self.rng.standard_normal((k, n)) / math.sqrt(n))


def random_conv_tt(rng, layer: Layer, ranks) -> list[np.ndarray]:
    """The three kernels conv_tt.factorize returns, random: [r1, Cin, 1, 1], [r2, r1, k, k], [Cout, r2, 1, 1]."""
    cout, cin = layer.weight.shape[:2]
    spatial = layer.weight.shape[2:]
    r1, r2 = ranks
    shapes = [(r1, cin, 1, 1), (r2, r1, *spatial), (cout, r2, 1, 1)]
    return [(rng.standard_normal(s) / math.sqrt(costs.prod(s[1:]))).astype(layer.dtype) for s in shapes]


# ----------------------------------------------------------------------------- Einsum chain

def einsum_model(layer: Layer, cores: list[np.ndarray], opset: int = OPSET) -> onnx.ModelProto:
    """The TT-matrix contraction as Einsum nodes: x -> [B, k1..kd], one Einsum per core (last core
    first, as passes/tt.py contracts), -> [B, N], + bias."""
    d = len(cores)
    if d > 4:
        raise ValueError("einsum_model takes 2 to 4 cores")
    ins = [c.shape[1] for c in cores]
    outs = [c.shape[2] for c in cores]
    big_i, big_o, bond = "ijkl", "mnop", " qrs"        # bond[t]: between core t and t+1 (1-based)
    dtype = onnx.helper.np_dtype_to_tensor_dtype(layer.dtype)
    inits = [onnx.numpy_helper.from_array(np.asarray([-1, *ins], dtype=np.int64), "shape_in"),
             onnx.numpy_helper.from_array(np.asarray([-1, math.prod(outs)], dtype=np.int64), "shape_out")]
    nodes = [onnx.helper.make_node("Reshape", ["x", "shape_in"], ["s0"])]
    state = "s0"
    for t in range(d, 0, -1):
        core = cores[t - 1]
        if t == d:
            core = core[..., 0]
        if t == 1:
            core = core[0]
        left = bond[t - 1] if t > 1 else ""
        right = bond[t] if t < d else ""
        equation = (f"b{big_i[:t]}{right}{big_o[t:d]},{left}{big_i[t - 1]}{big_o[t - 1]}{right}"
                    f"->b{big_i[:t - 1]}{left}{big_o[t - 1:d]}")
        name = f"core{t - 1}"
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(core, dtype=layer.dtype), name))
        nodes.append(onnx.helper.make_node("Einsum", [state, name], [f"s{d - t + 1}"], equation=equation))
        state = f"s{d - t + 1}"
    if layer.bias is not None:
        inits.append(onnx.numpy_helper.from_array(layer.bias, "b"))
        nodes.append(onnx.helper.make_node("Reshape", [state, "shape_out"], ["h"]))
        nodes.append(onnx.helper.make_node("Add", ["h", "b"], ["y"]))
    else:
        nodes.append(onnx.helper.make_node("Reshape", [state, "shape_out"], ["y"]))
    graph = onnx.helper.make_graph(
        nodes, f"{layer.name}_tt_einsum",
        [onnx.helper.make_tensor_value_info("x", dtype, list(layer.activation_shape))],
        [onnx.helper.make_tensor_value_info("y", dtype, list(layer.output_shape))], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, max_ir_version())
    return model


# ----------------------------------------------------------------------------- variants

@dataclass
class Variant:
    method: str                      # svd, tt, tt_einsum, conv_svd, conv_tt
    spec: str
    model: onnx.ModelProto
    params: int
    flops: int
    factors: str                     # decomposed | random
    reference: Callable[[np.ndarray], np.ndarray] | None = None   # numpy float64 x -> y
    weight_bytes: int = 0


@dataclass
class Group:
    """One layer at one batch: dense and its factorized variants, timed together."""
    key: str                         # fc-svd, fc-tt, conv
    shape: tuple
    batch: int
    build: Callable[["Group", Weights, np.random.Generator, bool], tuple[Layer, list[Variant]]]
    layer: Layer | None = None
    variants: list[Variant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"fc-svd": "FC svd", "fc-tt": "FC tt", "conv": "conv conv_svd/conv_tt"}[self.key]
        if self.key == "conv":
            return f"{what} {self.shape[0]}@{self.shape[1]}x{self.shape[1]} batch {self.batch}"
        return f"{what} {self.shape[0]}x{self.shape[1]} batch {self.batch}"


def svd_ranks(k: int, n: int) -> tuple[list[int], list[int]]:
    """Ranks min(K,N)/f below break-even, and those skipped at or above it."""
    limit = k * n / (k + n)
    ranks = [min(k, n) // f for f in SVD_FRACTIONS]
    return [r for r in ranks if r < limit], [r for r in ranks if r >= limit]


def round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def build_fc_svd(group: Group, weights: Weights, rng, real: bool):
    k, n = group.shape
    w, b = weights.get((k, n))
    layer = fc_layer(k, n, group.batch, w, b)
    ranks, skipped = svd_ranks(k, n)
    if skipped:
        group.notes.append(f"svd {k}x{n}: rank {', '.join(map(str, skipped))} skipped "
                           f"(at or above break-even {k * n / (k + n):.0f})")
    real = real and w.size <= REAL_FACTORS_MAX_WEIGHTS
    top = max(ranks)
    decomposition = svd.decompose(layer, None, top) if real else random_decomposition(rng, k, n, top)
    variants = []
    for r in ranks:
        config = {"rank": r}
        factors = svd.factorize(layer, config, None, decomposition)
        params, flops = svd.cost(layer, config)
        a, bb = (f.astype(np.float64) for f in factors)
        variants.append(Variant("svd", svd.spec(config), one_layer_model(layer, Choice("svd", config), factors, OPSET),
                                params, flops, "decomposed" if real else "random",
                                lambda x, a=a, bb=bb: (x @ a) @ bb + b, 4 * params))
    return layer, variants


def tt_config(k: int, n: int, bond: int) -> dict:
    ins, outs = tt.factorizations(k, 3)[0], tt.factorizations(n, 3)[0]
    return {"in_modes": list(ins), "out_modes": list(outs), "ranks": tt.reachable_ranks(ins, outs, [bond, bond])}


def build_fc_tt(group: Group, weights: Weights, rng, real: bool):
    k, n = group.shape
    w, b = weights.get((k, n))
    layer = fc_layer(k, n, group.batch, w, b)
    real = real and w.size <= REAL_FACTORS_MAX_WEIGHTS
    with_einsum = (k, n) in EINSUM_SHAPES
    variants = []
    for bond in TT_BONDS:
        config = tt_config(k, n, bond)
        cores = tt.factorize(layer, config, None, None if real else RandomSVD(rng))
        params, flops = tt.cost(layer, config)
        full = tt.reconstruct(layer, cores)
        reference = lambda x, full=full: x @ full + b                     # noqa: E731
        kind = "decomposed" if real else "random"
        variants.append(Variant("tt", tt.spec(config), one_layer_model(layer, Choice("tt", config), cores, OPSET),
                                params, flops, kind, reference, 4 * params))
        if with_einsum:
            variants.append(Variant("tt_einsum", tt.spec(config), einsum_model(layer, cores),
                                    params, flops, kind, reference, 4 * params))
    return layer, variants


def build_conv(group: Group, weights: Weights, rng, real: bool):
    c, hw = group.shape
    w, b = weights.get((c, c, 3, 3))
    layer = conv_layer(c, hw, group.batch, w, b)
    real = real and w.size <= REAL_FACTORS_MAX_WEIGHTS
    kind = "decomposed" if real else "random"
    variants = []
    full = conv_svd.full_rank(layer)
    ranks = sorted({round8(full / f) for f in CONV_FRACTIONS})
    p, cout = layer.matrix_shape
    decomposition = (conv_svd.decompose(layer, None, max(ranks)) if real
                     else random_decomposition(rng, p, cout, max(ranks)))
    for r in ranks:
        config = {"rank": r}
        factors = conv_svd.factorize(layer, config, None, decomposition)
        params, flops = conv_svd.cost(layer, config)
        variants.append(Variant("conv_svd", conv_svd.spec(config),
                                one_layer_model(layer, Choice("conv_svd", config), factors, OPSET),
                                params, flops, kind, None, 4 * params))
    caps = conv_tt.max_ranks(layer)
    seen = []
    for f in CONV_FRACTIONS:
        config = {"ranks": conv_tt.reachable_ranks(layer, [round8(caps[0] / f), round8(caps[1] / f)])}
        if config in seen:
            continue
        seen.append(config)
        factors = conv_tt.factorize(layer, config) if real else random_conv_tt(rng, layer, config["ranks"])
        params, flops = conv_tt.cost(layer, config)
        variants.append(Variant("conv_tt", conv_tt.spec(config),
                                one_layer_model(layer, Choice("conv_tt", config), factors, OPSET),
                                params, flops, kind, None, 4 * params))
    return layer, variants


def plan_groups() -> list[Group]:
    """Most important first: FC svd (batch 64, then 1), convs at batch 1, FC tt (with the Einsum
    chain), then the convs at batch 64 (~15 GFLOP a dense run each)."""
    groups = [Group("fc-svd", s, b, build_fc_svd) for b in BATCHES for s in FC_SHAPES]
    groups += [Group("conv", s, 1, build_conv) for s in CONV_SHAPES]
    groups += [Group("fc-tt", s, b, build_fc_tt) for b in BATCHES for s in FC_SHAPES]
    groups += [Group("conv", s, 64, build_conv) for s in CONV_SHAPES]
    return groups


# ----------------------------------------------------------------------------- cost model

def group_sizes(group: Group) -> tuple[Layer, list[tuple[str, int, int, int]]]:
    """Without building anything: the dense layer's figures and each variant's (method, flops, params, nodes)."""
    if group.key == "conv":
        c, hw = group.shape
        w = np.empty((c, c, 3, 3), np.float32)
        layer = conv_layer(c, hw, group.batch, w, np.empty(c, np.float32))
        full = conv_svd.full_rank(layer)
        out = [("conv_svd", *conv_svd.cost(layer, {"rank": r}), 2)
               for r in sorted({round8(full / f) for f in CONV_FRACTIONS})]
        caps = conv_tt.max_ranks(layer)
        configs = []
        for f in CONV_FRACTIONS:
            config = {"ranks": conv_tt.reachable_ranks(layer, [round8(caps[0] / f), round8(caps[1] / f)])}
            if config not in configs:
                configs.append(config)
        out += [("conv_tt", *conv_tt.cost(layer, cfg), 3) for cfg in configs]
        return layer, [(m, fl, pa, nd) for m, pa, fl, nd in out]
    k, n = group.shape
    layer = fc_layer(k, n, group.batch, np.empty((k, n), np.float32), np.empty(n, np.float32))
    out = []
    if group.key == "fc-svd":
        for r in svd_ranks(k, n)[0]:
            params, flops = svd.cost(layer, {"rank": r})
            out.append(("svd", flops, params, 3))
    else:
        for bond in TT_BONDS:
            params, flops = tt.cost(layer, tt_config(k, n, bond))
            out.append(("tt", flops, params, 8))
            if (k, n) in EINSUM_SHAPES:
                out.append(("tt_einsum", flops, params, 6))
    return layer, out


def run_time(flops: int, weight_bytes: int, act_bytes: int, nodes: int) -> float:
    """A rough guess of one run on this class of machine (corrected by what is measured)."""
    return 15e-6 + 5e-6 * nodes + max(flops / 80e9, (weight_bytes + act_bytes) / 15e9)


def call_time(t: float, max_seconds: float) -> float:
    """One time_session call: warm-up, then at least MIN_RUNS, up to max_seconds or MAX_RUNS."""
    return 2e-4 + Budget().warmup * t + min(max(max_seconds, MIN_RUNS * t), MAX_RUNS * t)


def estimate(group: Group, rounds: int, max_seconds: float, variants: int | None = None) -> float:
    """Seconds the group takes: setup (weights, factors, sessions, checks) and the timing rounds."""
    layer, sizes = group_sizes(group)
    sizes = sizes if variants is None else sizes[:variants]
    act = 4 * (costs.prod(layer.activation_shape) + costs.prod(layer.output_shape))
    dense_t = run_time(layer.flops, 4 * layer.params, act, 1)
    total = (rounds + 1) * call_time(dense_t, max_seconds) + 0.05 + 4 * layer.params / 80e6
    total += layer.weight.size / 100e6                      # random weights and factors
    for method, flops, params, nodes in sizes:
        t = run_time(flops, 4 * params, act * 2, nodes) * (3 if method == "tt_einsum" else 1)
        # one_layer_model builds the dense model, then rewrites it: both weights are handled
        total += rounds * call_time(t, max_seconds) + 0.05 + 4 * (params + layer.params) / 60e6 + t
        if method == "tt":
            total += layer.weight.size * 8 / 0.2e9          # TT-SVD's reshapes, reconstruct for the check
    return total


# ----------------------------------------------------------------------------- timing

def measure(group: Group, sessions, x: dict, rounds: int, budget: Budget, deadline: float):
    """Rounds of: dense, then every variant (order reversed every other round); dense once more
    at the end. Returns dense medians (rounds + 1) and each variant's medians (rounds)."""
    dense, others = sessions[0], sessions[1:]
    d = [time_session(dense, x, PROVIDER, budget).median]
    f = [[] for _ in others]
    for r in range(rounds):
        started = time.monotonic()
        order = range(len(others)) if r % 2 == 0 else reversed(range(len(others)))
        for i in order:
            f[i].append(time_session(others[i], x, PROVIDER, budget).median)
        d.append(time_session(dense, x, PROVIDER, budget).median)
        took = time.monotonic() - started
        if r + 1 < rounds and time.monotonic() + took > deadline:
            group.notes.append(f"{group.describe()}: {r + 1} of {rounds} rounds (budget)")
            break
    return d, f


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(y.astype(np.float64) - ref))) / scale


def run_group(group: Group, weights: Weights, rng, rounds: int, max_seconds: float, deadline: float,
              real: bool, keep: int | None) -> list[dict]:
    layer, variants = group.build(group, weights, rng, real)
    if keep is not None:
        variants = variants[:keep]
    group.layer, group.variants = layer, variants
    x = {"x": rng.standard_normal(layer.activation_shape).astype(np.float32)}
    sessions = [create_session(one_layer_model(layer, DENSE, None, OPSET), PROVIDER, THREADS)]
    checks = []
    for v in variants:
        session = create_session(v.model, PROVIDER, THREADS)
        sessions.append(session)
        check = None
        if v.reference is not None:
            check = rel_error(session.run(None, x)[0], v.reference(x["x"].astype(np.float64)))
        checks.append(check)
    budget = Budget(min_runs=MIN_RUNS, max_runs=MAX_RUNS, max_seconds=max_seconds)
    d, f = measure(group, sessions, x, rounds, budget, deadline)
    done = len(f[0]) if f else 0
    dense_ms = statistics.median(d[:done + 1]) * 1e3
    matmul_chain: dict[str, list[float]] = {}
    rows = []
    for v, times, check in zip(variants, f, checks):
        ratios = [times[r] / ((d[r] + d[r + 1]) / 2) for r in range(done)]
        latency = statistics.median(ratios)
        flops_ratio = v.flops / layer.flops
        bytes_ratio = v.params / layer.params
        row = {"bench": "layers", "kind": "conv" if layer.op == "Conv" else "fc", "shape": shape_text(layer),
               "batch": group.batch, "method": v.method, "spec": v.spec,
               "flops_ratio": flops_ratio, "bytes_ratio": bytes_ratio,
               "latency_ratio": latency, "latency_ratio_min": min(ratios), "latency_ratio_max": max(ratios),
               "efficiency": flops_ratio / latency, "bytes_efficiency": bytes_ratio / latency,
               "dense_ms": dense_ms, "factorized_ms": statistics.median(times) * 1e3,
               "dense_gflop_per_s": layer.flops / statistics.median(d[:done + 1]) / 1e9,
               "factorized_gflop_per_s": v.flops / statistics.median(times) / 1e9,
               "dense_weight_gb_per_s": 4 * layer.params / statistics.median(d[:done + 1]) / 1e9,
               "rounds": done, "factors": v.factors,
               "check_rel_err": check, "check_ok": None if check is None else check < CHECK_TOLERANCE,
               "vs_matmul_chain": None, "vs_matmul_chain_min": None, "vs_matmul_chain_max": None}
        if v.method == "tt":
            matmul_chain[v.spec] = times
        elif v.method == "tt_einsum" and v.spec in matmul_chain:
            per_round = [e / m for e, m in zip(times, matmul_chain[v.spec])]
            row["vs_matmul_chain"] = statistics.median(per_round)
            row["vs_matmul_chain_min"], row["vs_matmul_chain_max"] = min(per_round), max(per_round)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the run

def kind_of(group: Group) -> tuple[str, int]:
    """Groups whose estimates err alike: the same pass family at the same batch."""
    return group.key, group.batch


def covered(groups: list[Group], setting, remaining: float, slowness: dict) -> int:
    """How many of the groups, in order, fit in the time left at this setting."""
    total, count = 0.0, 0
    for group in groups:
        total += slowness_of(slowness, group) * estimate(group, *setting)
        if total > remaining:
            break
        count += 1
    return count


def slowness_of(slowness: dict, group: Group) -> float:
    """Measured / estimated time for groups of this kind; before one has run, the worst seen, at least 1."""
    return slowness.get(kind_of(group), max([1.0, *slowness.values()]))


def choose_setting(rest: list[Group], remaining: float, slowness: dict):
    """The best setting (down to FLOOR) under which all the rest fits; else FLOOR's, if the first
    group fits (later groups may then be skipped); else the best one that fits the first group
    alone; else None."""
    for setting in SETTINGS[:FLOOR]:
        if covered(rest, setting, remaining, slowness) == len(rest):
            return setting
    for setting in SETTINGS[FLOOR - 1:]:
        if covered(rest[:1], setting, remaining, slowness):
            return setting
    return None


def run(budget_s: float = 360.0, log: Callable[[str], None] | None = None) -> dict:
    """Times every group that fits in budget_s seconds; returns {"markdown", "rows"}."""
    start = time.monotonic()
    deadline = start + budget_s - max(3.0, 0.04 * budget_s)
    say = log or (lambda _: None)
    rng = np.random.default_rng(0)
    weights = Weights(0)
    groups = plan_groups()
    real = budget_s >= 120
    slowness: dict = {}            # measured / estimated per kind of group, learnt as groups finish
    rows: list[dict] = []
    skipped: list[str] = []
    used: list[tuple[int, float]] = []
    for index, group in enumerate(groups):
        remaining = deadline - time.monotonic()
        setting, keep = choose_setting(groups[index:], remaining, slowness), None
        if setting is None:                           # fewer variants, least repeats
            rounds, max_seconds = SETTINGS[-1]
            count = len(group_sizes(group)[1])
            for keep in range(count - 1, 0, -1):
                if slowness_of(slowness, group) * estimate(group, rounds, max_seconds, keep) <= remaining:
                    setting = (rounds, max_seconds)
                    skipped.append(f"{group.describe()}: only the first {keep} of {count} variants "
                                   f"(budget: the rest would take longer than the {remaining:.0f} s left)")
                    break
        if setting is None:
            guess = slowness_of(slowness, group) * estimate(group, *SETTINGS[-1])
            skipped.append(f"{group.describe()}: skipped (needs about {guess:.0f} s even at "
                           f"{SETTINGS[-1][0]} rounds, {max(remaining, 0):.0f} s left)")
            say(f"skip {group.describe()}")
            continue
        rounds, max_seconds = setting
        guess = estimate(group, rounds, max_seconds, keep)
        t0 = time.monotonic()
        try:
            group_rows = run_group(group, weights, rng, rounds, max_seconds, deadline, real, keep)
        except Exception as exc:       # one group's failure is reported, the others still run
            skipped.append(f"{group.describe()}: failed: {str(exc).splitlines()[0][:200]}")
            say(f"FAILED {group.describe()}: {exc}")
            continue
        took = time.monotonic() - t0
        seen = slowness.get(kind_of(group))
        ratio = took / guess
        slowness[kind_of(group)] = min(max(ratio if seen is None else 0.5 * seen + 0.5 * ratio, 0.3), 5.0)
        used.append(setting)
        rows.extend(group_rows)
        skipped.extend(n for n in group.notes if n not in skipped)
        say(f"{group.describe()}: {len(group_rows)} variants, {rounds} rounds x {max_seconds:g} s, "
            f"{took:.1f} s (guessed {guess:.1f}), {time.monotonic() - start:.0f}/{budget_s:.0f} s")
    wall = time.monotonic() - start
    return {"markdown": markdown(rows, skipped, used, budget_s, wall, real), "rows": rows}


# ----------------------------------------------------------------------------- report

def g3(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != 0 and (abs(x) >= 1000 or abs(x) < 0.001):
        return f"{x:.2e}"
    return f"{x:.3g}"


def ratio_cell(row, key="latency_ratio") -> str:
    return f"{row[key]:.3g} ({row[key + '_min']:.3g}-{row[key + '_max']:.3g})"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def layer_table(rows: list[dict], what: str) -> str:
    lines = [[r["shape"], str(r["batch"]), f"`{r['spec']}`",
              g3(r["flops_ratio"]), g3(r["bytes_ratio"]), ratio_cell(r), g3(r["efficiency"]),
              g3(r["dense_ms"]), g3(r["factorized_ms"])] for r in rows]
    head = {"fc": "K x N", "conv": "Cin=Cout @ H x W"}[what]
    return table([head, "batch", "spec", "FLOPs ratio", "bytes ratio", "latency ratio (min-max)",
                  "efficiency", "dense ms", "factorized ms"], lines)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown(rows: list[dict], skipped: list[str], used, budget_s: float, wall: float, real: bool) -> str:
    out = ["## Layers", ""]
    rounds = sorted({r for r, _ in used})
    seconds = sorted({s for _, s in used})
    out.append(
        f"One layer at a time, onnxruntime {ort.__version__} on {PROVIDER} with {THREADS} intra-op thread, "
        f"fp32, on {cpu_model()}{cache_text()}. Each group (one layer at one batch) ran in rounds "
        f"({'/'.join(map(str, rounds)) or '-'} rounds): the dense layer, then every variant, dense again; each "
        f"timing is `profile.time_session` ({Budget().warmup} warm-up runs, then at least {MIN_RUNS} runs, up to "
        f"{'/'.join(f'{s:g}' for s in seconds) or '-'} s or {MAX_RUNS} runs; median). A variant's latency ratio is "
        f"its median divided by the mean of the two dense medians around it, taken as the median over rounds "
        f"(min-max over rounds in brackets). FLOPs and weight-bytes ratios are the passes' analytic `cost` "
        f"against the dense layer (bias included in bytes); they are the limits. **efficiency** = FLOPs ratio / "
        f"latency ratio: 1.0 is as fast as the FLOP count promises, below 1 short of it. Budget {budget_s:.0f} s, "
        f"took {wall:.0f} s. The machine is shared with other jobs: read ratios, not absolute times.")
    out.append("")
    decomposed = sorted({r["shape"] for r in rows if r["factors"] == "decomposed"})
    out.append(
        "Factors: " + (f"{', '.join(decomposed)} were decomposed by the pass (layers with at most "
                       f"{REAL_FACTORS_MAX_WEIGHTS:,} weights); all other layers" if decomposed else
                       "all layers (the budget was too short for real decompositions, or no layer was small "
                       "enough)") +
        " got random factors of the shapes the pass produces, through the pass's own `factorize` with a "
        "random decomposition for svd, conv_svd and tt, and random kernels for conv_tt. Timing does not "
        "depend on the values; a full SVD of 4096x4096 takes minutes on this machine. Weights are random "
        "Gaussian. FC layers are MatMul + bias Add; convs are stride 1, pad 1, with bias.")
    out.append("")

    fc_svd = [r for r in rows if r["kind"] == "fc" and r["method"] == "svd"]
    fc_tt = [r for r in rows if r["method"] == "tt"]
    einsum = [r for r in rows if r["method"] == "tt_einsum"]
    conv = [r for r in rows if r["kind"] == "conv"]
    if fc_svd:
        out += ["### FC, SVD (rank min(K,N)/16 .. /2, below break-even)", "", layer_table(fc_svd, "fc"), ""]
    if conv:
        out += ["### Conv 3x3, conv_svd and conv_tt (1/8, 1/4, 1/2 of full rank, multiples of 8)", "",
                layer_table(conv, "conv"), ""]
    if fc_tt:
        out += ["### FC, Tensor-Train as the tool builds it (MatMul chain; most balanced 3-mode shape)", "",
                layer_table(fc_tt, "fc"), ""]
    if einsum:
        lines = []
        tt_by = {(r["shape"], r["batch"], r["spec"]): r for r in fc_tt}
        for e in einsum:
            m = tt_by.get((e["shape"], e["batch"], e["spec"]))
            if m is None or e["vs_matmul_chain"] is None:
                continue
            lines.append([e["shape"], str(e["batch"]), f"`{e['spec']}`", g3(m["factorized_ms"]),
                          g3(e["factorized_ms"]), ratio_cell(e, "vs_matmul_chain"),
                          f"{g3(m['check_rel_err'])} / {g3(e['check_rel_err'])}"])
        out += ["### TT: MatMul chain (the tool's rewrite) vs Einsum chain", "",
                "The same cores contracted in the same order; both outputs checked against numpy "
                "`x @ reconstruct(cores) + b` (float64) before timing. Ratio = Einsum / MatMul chain, per "
                "round, median (min-max).", "",
                table(["K x N", "batch", "spec", "MatMul chain ms", "Einsum chain ms", "Einsum / MatMul",
                       "max rel. error vs numpy (MatMul / Einsum)"], lines), ""]
    summary = summarize(rows)
    if summary:
        out += ["### Summary by method and batch", "", table(
            ["method", "batch", "configs", "faster than dense", "efficiency >= 0.8", "FLOPs ratio (median)",
             "latency ratio (median)", "efficiency (median)", "best latency ratio"], summary), ""]
    out += ["### Findings", ""] + [f"- {line}" for line in findings(rows)] + [""]
    bad = [r for r in rows if r["check_ok"] is False]
    if bad:
        out += ["**Output checks that failed** (max rel. error above "
                f"{CHECK_TOLERANCE:g}): " + "; ".join(f"{r['shape']} b{r['batch']} {r['method']} `{r['spec']}` "
                                                   f"{r['check_rel_err']:.2e}" for r in bad), ""]
    if skipped:
        out += ["Not measured, or measured with less than asked:", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(out).rstrip() + "\n"


def cache_text() -> str:
    """ (L2 2048K, L3 ...) as the OS reports cpu0's caches; empty if it does not."""
    sizes = []
    for index in range(2, 4):
        try:
            base = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
            with open(f"{base}/level") as f:
                level = f.read().strip()
            with open(f"{base}/size") as f:
                sizes.append(f"L{level} {f.read().strip()}")
        except OSError:
            continue
    return f" ({', '.join(sizes)} as the OS reports them)" if sizes else ""


def method_label(row) -> str:
    return "tt (Einsum chain)" if row["method"] == "tt_einsum" else row["method"]


def summarize(rows: list[dict]) -> list[list[str]]:
    out = []
    keys = []
    for r in rows:
        key = (method_label(r), r["batch"])
        if key not in keys:
            keys.append(key)
    for method, batch in sorted(keys, key=lambda k: (["svd", "tt", "tt (Einsum chain)", "conv_svd", "conv_tt"]
                                                      .index(k[0]), -k[1])):
        sel = [r for r in rows if method_label(r) == method and r["batch"] == batch]
        best = min(sel, key=lambda r: r["latency_ratio"])
        out.append([method, str(batch), str(len(sel)), str(sum(r["latency_ratio"] < 1 for r in sel)),
                    str(sum(r["efficiency"] >= 0.8 for r in sel)),
                    f"{min(r['flops_ratio'] for r in sel):.3g}-{max(r['flops_ratio'] for r in sel):.3g} "
                    f"({median(r['flops_ratio'] for r in sel):.3g})",
                    f"{min(r['latency_ratio'] for r in sel):.3g}-{max(r['latency_ratio'] for r in sel):.3g} "
                    f"({median(r['latency_ratio'] for r in sel):.3g})",
                    f"{min(r['efficiency'] for r in sel):.2f}-{max(r['efficiency'] for r in sel):.2f} "
                    f"({median(r['efficiency'] for r in sel):.2f})",
                    f"{best['latency_ratio']:.3g} ({best['shape']}, `{best['spec']}`)"])
    return out


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def listing(rows: list[dict], cell: Callable[[dict], str], limit: int = 6) -> str:
    return ", ".join(cell(r) for r in rows[:limit]) + (" ..." if len(rows) > limit else "")


def findings(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows; nothing here is a fixed claim."""
    if not rows:
        return ["Nothing was measured (budget too short)."]
    lines = []
    spreads = [(r["latency_ratio_max"] - r["latency_ratio_min"]) / r["latency_ratio"] for r in rows
               if r["rounds"] > 1]
    if spreads:
        lines.append(f"Noise: across rounds a latency ratio moved by {100 * median(spreads):.0f}% (median of "
                     f"(max - min) / median; {100 * max(spreads):.0f}% at worst): differences smaller than that "
                     f"are not resolved by this run.")
    own = [r for r in rows if r["method"] != "tt_einsum"]
    dense = {}
    for r in own:
        dense.setdefault((r["kind"], r["shape"], r["batch"]), r)
    parts = []
    for kind in ("fc", "conv"):
        for batch in BATCHES:
            sel = [r for (k, _, b), r in dense.items() if k == kind and b == batch]
            if sel:
                parts.append(f"{kind.upper() if kind == 'fc' else kind} at batch {batch} "
                             f"{median(r['dense_gflop_per_s'] for r in sel):.3g} GFLOP/s"
                             + (f" ({median(r['dense_weight_gb_per_s'] for r in sel):.3g} GB/s of weights)"
                                if kind == "fc" else ""))
    if parts:
        lines.append("The dense layers ran at (median) " + "; ".join(parts) + ".")
    methods = [m for m in ("svd", "conv_svd", "conv_tt", "tt")
               if all(any(r["method"] == m and r["batch"] == b for r in own) for b in BATCHES)]
    if methods:
        cells = [f"{m} {median(r['efficiency'] for r in own if r['method'] == m and r['batch'] == BATCHES[1]):.2f} "
                 f"vs {median(r['efficiency'] for r in own if r['method'] == m and r['batch'] == BATCHES[0]):.2f}"
                 for m in methods]
        lines.append(f"Median efficiency at batch {BATCHES[1]} vs batch {BATCHES[0]}: " + ", ".join(cells) + ".")
    above = [r for r in own if r["efficiency"] > 1.1]
    if above:
        lines.append(f"{plural(len(above), 'config')} beat their FLOPs limit (efficiency above 1.1; "
                     f"{sum(r['batch'] == BATCHES[1] for r in above)} of them at batch {BATCHES[1]}): there the "
                     f"factorized chain ran at more FLOP/s than the dense layer (median "
                     f"{median(r['factorized_gflop_per_s'] for r in above):.3g} against "
                     f"{median(r['dense_gflop_per_s'] for r in above):.3g} GFLOP/s).")
    low = sorted((r for r in own if r["flops_ratio"] < 1 and r["efficiency"] < 0.5), key=lambda r: r["efficiency"])
    if low:
        lines.append("Furthest from the FLOPs limit (efficiency below 0.5, fewer FLOPs than dense): " + listing(
            low, lambda r: f"{r['shape']} b{r['batch']} `{r['spec']}` {r['efficiency']:.2f} (FLOPs "
                           f"{r['flops_ratio']:.2g}x, time {r['latency_ratio']:.2g}x)") + ".")
    for batch in BATCHES:
        tt_rows = [r for r in own if r["method"] == "tt" and r["batch"] == batch]
        if not tt_rows:
            continue
        a = median(r["flops_ratio"] for r in tt_rows)
        b = median(r["bytes_ratio"] for r in tt_rows)
        c = median(r["latency_ratio"] for r in tt_rows)
        off_flops = median(abs(math.log(r["latency_ratio"] / r["flops_ratio"])) for r in tt_rows)
        off_bytes = median(abs(math.log(r["latency_ratio"] / r["bytes_ratio"])) for r in tt_rows)
        if abs(off_flops - off_bytes) < 0.1 * max(off_flops, off_bytes):
            closer = "about as far from both limits"
        else:
            closer = f"closer to the {'FLOPs' if off_flops < off_bytes else 'weight-bytes'} ratio"
        lines.append(f"tt at batch {batch}: weights shrink to a median {b:.3g} of dense, FLOPs go to {a:.3g} and "
                     f"time to {c:.3g}; latency is {closer} (median |log| distance "
                     f"{off_flops:.2f} to the FLOPs ratio, {off_bytes:.2f} to the bytes ratio).")
    pairs = [r for r in rows if r["vs_matmul_chain"] is not None]
    if pairs:
        ratio = median(r["vs_matmul_chain"] for r in pairs)
        slower = sum(r["vs_matmul_chain"] > 1 for r in pairs)
        verdict = ("the MatMul chain that passes/tt.py builds is the faster form here" if ratio > 1 else
                   "the MatMul chain's advantage claimed in passes/tt.py does not show in this run")
        lines.append(f"TT as an Einsum chain took {ratio:.2f}x the MatMul chain's time (median of "
                     f"{plural(len(pairs), 'config')}, {min(r['vs_matmul_chain'] for r in pairs):.2f}-"
                     f"{max(r['vs_matmul_chain'] for r in pairs):.2f}; slower in {slower} of {len(pairs)}): "
                     f"{verdict}.")
    slow = sorted((r for r in own if r["latency_ratio"] > 1 and r["flops_ratio"] < 1),
                  key=lambda r: -r["latency_ratio"])
    if slow:
        lines.append(f"{plural(len(slow), 'config')} ran slower than the dense layer despite fewer FLOPs: " + listing(
            slow, lambda r: f"{r['shape']} b{r['batch']} `{r['spec']}` {r['latency_ratio']:.2f}x at FLOPs "
                            f"ratio {r['flops_ratio']:.2g}") + ".")
    more = [r for r in own if r["flops_ratio"] >= 1]
    if more:
        faster = sum(r["latency_ratio"] < 1 for r in more)
        kinds = ", ".join(sorted({r["method"] for r in more}))
        at_small = sum(r["batch"] == BATCHES[1] and r["latency_ratio"] < 1 for r in more)
        tail = (f"{faster} of them still ran faster than dense ({at_small} at batch {BATCHES[1]})" if faster
                else "none of them ran faster than dense")
        lines.append(f"{plural(len(more), 'config')} ({kinds}) save weights but need at least the dense layer's "
                     f"FLOPs; {tail}.")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for the whole run (default 360)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run(args.budget, log=log)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
