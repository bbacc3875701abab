"""Channel pruning of a layer pair (denseflex_onnx/pairs.py): keep k of the inner channels.

The producer keeps k output columns (Conv: filters) and their bias, the per-channel constants
between keep k entries, and the consumer keeps the k matching input rows (Conv: every kh*kw
row of a kept channel). With the consumer's input statistics (calibrate.collect: X^T X, sum
and count of its input vectors, im2col patches for a Conv) the kept rows are refitted by
ridge least squares against the original consumer output, and what the removed channels
contributed on average goes into the consumer's bias; without them the rows are sliced as
they are. Nothing else in the graph changes, so keeping every channel is the original model.

Not a per-layer pass: it takes a Pair, named by its producer (PASSES entries with TARGET = "pair").
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from denseflex_onnx import costs
from denseflex_onnx.errors import UserError

from .chain import Chain, conv_geometry

NAME = "prune"
TARGET = "pair"             # what `applies` and the others take: a pairs.Pair, not a Layer
# the refit's ridge, of the mean diagonal of the kept inputs' covariance: at least RIDGE, and
# d / n for n calibration vectors in d dims, the shrinkage calibrate.LayerStats.expected applies
# (as if d isotropic rows were added). MiniLM-L6's FFNs have 1536 inputs and 2.8k calibration
# tokens: at 1e-3 alone the refit fit their noise, its held-out error 10% above d / n's.
RIDGE = 1e-3
# sixteenths above a half: a transformer's FFN loses little there, and a budget often falls
# between two eighths (MiniLM at -25% FLOPs: keep 0.625 everywhere misses by 1%)
# removal_order: batches of channels dropped, and the widest consumer input it inverts
ORDER_STEPS = 128
GREEDY = True
# of the mean diagonal: far below the refit's (d / n), or H is nearly lam I and the order is the
# weights' magnitude alone. MiniLM-L6, keep 864 of 1536 in every FFN, sequential, held-out
# cosine: 95.81 by scores, 96.25 at 0.01, 96.09 at 0.1, 94.67 at 2, 96.20 at 0.001
ORDER_RIDGE = 0.01
MAX_ORDER_INPUTS = 8192
FRACTIONS = (0.25, 0.375, 0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375)


def applies(pair) -> str | None:
    if not hasattr(pair, "consumer"):
        return ("prune takes a layer pair, named by its producer (`denseflex-onnx inspect` lists the "
                "pairs): --layer PRODUCER=prune:K")
    if pair.channels < 2:
        return "a single inner channel: nothing to prune"
    return None


def candidates(pair) -> list[dict]:
    """Fractions of the inner channels, rounded to multiples of 8 where that leaves any."""
    n = pair.channels
    step = 8 if n >= 64 else 1
    keeps = {max(1, int(round(f * n / step)) * step) for f in FRACTIONS}
    return [{"keep": k} for k in sorted(keeps) if 0 < k < n]


def cost(pair, config) -> tuple[int, int]:
    """Params of both layers and the per-channel constants at k channels; FLOPs of both layers."""
    k, n = config["keep"], pair.channels
    p, c = pair.producer, pair.consumer
    p_bias = 0 if p.bias is None else (k if p.bias.size == n else p.bias.size)
    constants = sum(x.value.size // n * k for x in pair.sliced)
    n2 = c.weight.shape[0] if c.op == "Conv" else c.weight.shape[1]
    c_bias = n2                     # always written: it carries the removed channels' mean
    if p.op == "Conv":
        per_filter = costs.prod(p.weight.shape[1:])
        out1 = (p.output_shape[0], k, *p.output_shape[2:])
        flops = costs.conv_flops(out1, p.weight.shape[1], p.weight.shape[2:])
        flops += costs.conv_flops(c.output_shape, k, c.weight.shape[2:])
        params = k * per_filter + p_bias + n2 * k * costs.prod(c.weight.shape[2:]) + c_bias
    else:
        k1 = p.weight.shape[0]
        flops = costs.matmul_flops(p.rows, k1, k) + costs.matmul_flops(c.rows, k, n2)
        params = k1 * k + p_bias + k * n2 + c_bias
    return params + constants, flops


# ------------------------------------------------------------------------------------ the fit

def consumer_matrix(pair) -> np.ndarray:
    """The consumer's weight as x @ M for its input vectors [K (Cin*kh*kw), N2], float64."""
    return consumer_matrix_of(pair, pair.consumer.weight)


def consumer_matrix_of(pair, weight: np.ndarray) -> np.ndarray:
    """A consumer weight in its layer's layout (Conv [Cout, Cin, kh, kw]) as that matrix."""
    w = weight.astype(np.float64)
    return w.reshape(w.shape[0], -1).T if pair.consumer.op == "Conv" else w


def block(pair) -> int:
    """Input rows per inner channel: kh*kw for a Conv consumer, 1 for Gemm/MatMul."""
    return costs.prod(pair.consumer.weight.shape[2:]) if pair.consumer.op == "Conv" else 1


def rows_of(channels: np.ndarray, size: int) -> np.ndarray:
    """The consumer input rows of these channels (channel-major, as weight.reshape(Cout, -1))."""
    return (np.asarray(channels)[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def covariance(stats) -> np.ndarray | None:
    """Cov of the consumer's input vectors, E[x x^T] - mu mu^T, from a full X^T X; None without one.
    Centered because the bias is refitted with the weights (least squares with an intercept)."""
    if stats is None or getattr(stats, "kind", "full") != "full" or stats.count == 0:
        return None
    mean = stats.total / stats.count
    return stats.gram / stats.count - np.outer(mean, mean)


def scores(pair, stats=None) -> np.ndarray:
    """Each inner channel's contribution to the consumer output: ||w2_j||^2 Var[h_j] with
    statistics (the mean part is not lost: it is folded into the bias), else a data-free
    proxy, ||w2_j||^2 (||w1_j||^2 + b1_j^2), the producer's output energy on white input."""
    m, g = consumer_matrix(pair), block(pair)
    row_energy = np.sum(m * m, axis=1)                      # ||row r of M||^2
    if stats is not None and stats.count:
        second = _diagonal(stats.gram) / stats.count
        variance = np.maximum(second - (stats.total / stats.count) ** 2, 0.0)
        return (row_energy * variance).reshape(-1, g).sum(axis=1)
    p = pair.producer
    w1 = p.weight.astype(np.float64)
    energy = np.sum(w1.reshape(w1.shape[0], -1) ** 2, axis=1) if p.op == "Conv" else np.sum(w1 ** 2, axis=0)
    if p.bias is not None:
        energy = energy + np.broadcast_to(p.bias.astype(np.float64) ** 2, energy.shape)
    return row_energy.reshape(-1, g).sum(axis=1) * energy


def _diagonal(gram) -> np.ndarray:
    if isinstance(gram, np.ndarray):
        return np.diag(gram).copy()
    root = gram.rows(None)                                  # a sketch: X~^T X~ = X^T X
    return np.sum(root * root, axis=0)


def select(pair, keep: int, stats=None, order: np.ndarray | None = None) -> np.ndarray:
    """The channels kept, ascending: the last `keep` of `order` (removal_order), or without it
    the `keep` highest scores (ties to the lower index)."""
    if order is not None:
        return np.sort(order[len(order) - keep:])
    s = scores(pair, stats)
    ranked = np.lexsort((np.arange(len(s)), -s))
    return np.sort(ranked[:keep])


def removal_order(pair, stats, ridge: float | None = None) -> np.ndarray | None:
    """The inner channels in the order greedy least-squares removal drops them (first: the one
    whose loss the refit of the others makes up best), or None without a full X^T X.

    Optimal Brain Surgeon on the consumer (Hassibi & Stork 1993; for structured rows,
    Kurtic et al., ZipLM 2023): with H = cov + lam I (refit's objective), dropping the rows G of
    the current M costs tr(M_G^T [H^-1]_GG^-1 M_G) once the kept rows are refitted, and the refit
    is M -= [H^-1]_:G [H^-1]_GG^-1 M_G. Magnitude (scores) ignores that correlated channels stand
    in for each other. Removed ORDER_STEPS times in even batches, a batch the channels cheapest
    to drop alone, so a 1536-channel FFN costs about 130 small updates."""
    cov = covariance(stats)
    n, g = pair.channels, block(pair)
    if cov is None or len(cov) > MAX_ORDER_INPUTS:
        return None
    lam = (ORDER_RIDGE if ridge is None else ridge) * max(float(np.mean(np.diag(cov))), 1e-12)
    h_inv = np.linalg.inv(cov + lam * np.eye(len(cov)))
    m = consumer_matrix(pair).copy()
    alive = np.ones(n, dtype=bool)
    removed: list[int] = []
    per_step = max(1, -(-n // ORDER_STEPS))
    while alive.sum() > 1:
        live = np.flatnonzero(alive)
        rows = rows_of(live, g)
        if g == 1:
            cost = np.sum(m[rows] ** 2, axis=1) / np.maximum(np.diag(h_inv)[rows], 1e-300)
        else:
            cost = np.array([_group_cost(m, h_inv, rows_of([c], g)) for c in live])
        take = live[np.lexsort((live, cost))[:min(per_step, len(live) - 1)]]
        drop = rows_of(take, g)
        block_inv = np.linalg.inv(h_inv[np.ix_(drop, drop)])
        m -= h_inv[:, drop] @ (block_inv @ m[drop])
        h_inv -= h_inv[:, drop] @ block_inv @ h_inv[drop]
        h_inv[drop] = 0.0
        h_inv[:, drop] = 0.0
        m[drop] = 0.0
        alive[take] = False
        removed.extend(int(c) for c in take)
    removed.extend(int(c) for c in np.flatnonzero(alive))
    return np.array(removed, dtype=np.int64)


def _group_cost(m, h_inv, rows) -> float:
    sub = h_inv[np.ix_(rows, rows)]
    return float(np.trace(m[rows].T @ np.linalg.solve(sub, m[rows])))


def refit(m: np.ndarray, bias: np.ndarray, cov: np.ndarray, mean: np.ndarray, rows: np.ndarray,
          ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of x @ M + b refitted to the whole of it, by least squares with an intercept:
    min E||x M + b - x_R M' - b'||^2 + lam ||M' - M_R||^2, lam = ridge * mean diag(cov_RR).

    The ridge pulls toward the plain slice M_R rather than toward 0, so that keeping every row
    gives M back exactly, and directions the data do not determine keep their weights.
    Returns M' [len(rows), N2] and b' = b + mu M - mu_R M'.
    """
    cov_rr = cov[np.ix_(rows, rows)]
    lam = ridge * max(float(np.mean(np.diag(cov_rr))), 1e-12)
    rhs = cov[rows] @ m + lam * m[rows]
    fitted = _solve_spd(cov_rr + lam * np.eye(len(rows)), rhs)
    return fitted, bias + mean @ m - mean[rows] @ fitted


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import scipy.linalg
    try:
        return scipy.linalg.solve(a, b, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        return np.linalg.lstsq(a, b, rcond=None)[0]


def factorize(pair, config, stats=None, decomposition=None, mode: str = "plain", order=None) -> list:
    """[kept channels (int64), producer weight, producer bias or None, consumer weight, consumer bias],
    the weights in the layout of layer.weight (Gemm/MatMul [K, N], Conv [Cout, Cin, kh, kw]).

    `stats`: the consumer's input statistics (LayerStats), or None for the plain slice."""
    keep, n = int(config["keep"]), pair.channels
    if not 1 <= keep <= n:
        raise ValueError(f"keep {keep} outside 1..{n}")
    p, c = pair.producer, pair.consumer
    if keep < n and order is None and GREEDY:
        order = removal_order(pair, stats)
    kept = select(pair, keep, stats, order) if keep < n else np.arange(n)
    g = block(pair)
    rows = rows_of(kept, g)
    m = consumer_matrix(pair)
    n2 = m.shape[1]
    bias = np.zeros(n2) if c.bias is None else np.broadcast_to(c.bias.astype(np.float64), (n2,)).copy()
    cov = covariance(stats)
    if keep == n:
        fitted = m
    elif cov is not None:
        fitted, bias = refit(m, bias, cov, stats.total / stats.count, rows, max(RIDGE, len(cov) / stats.count))
    else:
        fitted = m[rows]
        if stats is not None and stats.count:   # a sketch: no refit, but the mean is known
            dropped = np.setdiff1d(np.arange(len(m)), rows)
            bias = bias + (stats.total / stats.count)[dropped] @ m[dropped]
    if c.op == "Conv":
        w2 = fitted.T.reshape(n2, keep, *c.weight.shape[2:])
    else:
        w2 = fitted
    w1 = p.weight[kept] if p.op == "Conv" else p.weight[:, kept]
    b1 = None if p.bias is None else (p.bias[kept] if p.bias.size == n else p.bias)
    return [kept.astype(np.int64), np.ascontiguousarray(w1), b1, w2.astype(c.dtype), bias.astype(c.dtype)]


# ------------------------------------------------------------------------------------ the graph

def rewrite(graph, pair, factors) -> None:
    kept, w1, b1, w2, b2 = factors
    p, c = pair.producer, pair.consumer
    chain = Chain(graph, p, NAME)
    bias_in = [] if b1 is None else [chain.constant("B", b1)]
    if p.op == "Conv":
        chain.finish("Conv", [chain.input, chain.constant("W", w1), *bias_in], conv_geometry(p, w1.shape[2:]))
    elif p.op == "Gemm" and b1 is not None:
        chain.finish("Gemm", [chain.input, chain.constant("W", w1), *bias_in], {"transA": p.attrs.get("transA", 0)})
    else:                           # Gemm before opset 11 needs its C: a Gemm without one is a MatMul
        x = chain.input
        if p.attrs.get("transA"):
            x = chain.op("Transpose", [x], {"perm": [1, 0]})
        chain.last("MatMul", [x, chain.constant("W", w1)], bias=b1)

    by_output = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    for i, const in enumerate(pair.sliced):
        node = by_output[const.node]
        node.inputs[const.index] = gs.Constant(f"{p.name}/{NAME}/between_{i}",
                                               np.ascontiguousarray(np.take(const.value, kept, axis=const.axis)))
    tensors = graph.tensors()
    for name in pair.tensors:           # the inner tensors now carry k channels
        t = tensors.get(name)
        if t is not None and t.shape is not None:
            shape = list(t.shape)
            shape[pair.axis] = len(kept)
            t.shape = shape

    chain = Chain(graph, c, NAME)
    if c.op == "Conv":
        chain.finish("Conv", [chain.input, chain.constant("W", w2), chain.constant("B", b2)],
                     conv_geometry(c, w2.shape[2:]))
    elif c.op == "Gemm":
        chain.finish("Gemm", [chain.input, chain.constant("W", w2), chain.constant("B", b2)])
    else:
        chain.last("MatMul", [chain.input, chain.constant("W", w2)], bias=b2)


# ------------------------------------------------------------------------------------ specs

def parse_spec(pair, text: str) -> dict:
    """`960` channels kept, or `0.625` of them."""
    what, n = f"prune:{text} on {pair.name}", pair.channels
    try:
        if "." in text:
            fraction = float(text)
            if not 0 < fraction <= 1:
                raise UserError(f"{what}: fraction {text} must be in (0, 1]")
            keep = max(1, int(round(fraction * n)))
        else:
            keep = int(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is neither a channel count (960) nor a fraction (0.625)") from None
    if keep < 1:
        raise UserError(f"{what}: keep at least 1 channel")
    if keep > n:
        raise UserError(f"{what}: keep {keep} is above the pair's {n} inner channels "
                        f"({pair.name} -> {pair.consumer.name})")
    return {"keep": keep}


def spec(config) -> str:
    return f"prune:{config['keep']}"
