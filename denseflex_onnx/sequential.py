"""Sequential calibration: each rewritten layer fitted to the inputs it really receives.

Fitted independently, every layer matches the original layer on the original model's inputs,
and the errors of the layers before it compound on the way (six transformer blocks). Fitted
sequentially, in stages of graph depth, a layer sees X~, its input in the model whose earlier
stages are already rewritten, and is fitted against the original output X W:

    min ||X W + b - X~ W' - b'||                  (W' of the pass's form: rank r, TT, pruned rows)

Since X~ W* with W* = (X~c^T X~c)^-1 X~c^T Xc W is the projection of X W onto X~'s columns,
that is the pass's usual fit of W* on X~'s statistics (Pythagoras), with b* = b + mu W - mu~ W*.
So every pass fits sequentially unchanged: given the anchored layer (W*, b*) and X~'s
statistics. Where a residual Add follows the layer (y + R: a transformer's attention output and
FFN output), the target is X W + b + (R - R~), so the layer also makes up what the residual
stream lost upstream, its part that X~ predicts; X~^T (R - R~) is accumulated beside the rest.
Only X~^T X~ and X~^T X are accumulated (calibrate.collect_anchored), never the
activations. At X~ = X, W* = W: the first stage is the independent fit.

Stages: a layer's depth is one more than the deepest rewritten layer upstream of its input (a
pair counts as one unit, at its producer). Depths are merged into at most MAX_STAGES stages,
because each stage runs the original and the partly rewritten model over the calibration data.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx

from .layers import Layer

log = logging.getLogger("denseflex_onnx")

MAX_STAGES = 8
# of the mean variance of X~, toward W (so that X~ = X gives W back exactly). MiniLM-L6, whitened
# svd:192 in every layer, 128 calibration sentences, held-out cosine: 90.04 at 1e-3, 90.61 at 1,
# 90.46 at 10, 89.19 at 1000 (independent calibration: 90.96)
RIDGE = 1.0
# where a residual Add follows the layer, fit X~ W' + R~ to the original's X W + R: the layer
# also takes back what the residual stream lost upstream (Kwon et al. 2022 tune their masks
# against the residual block's output the same way)
RESIDUAL_GAP = True


def depths(graph: onnx.GraphProto, units: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Per unit (name -> (input tensor, output tensor)): how many rewritten units lie upstream
    of its input on the longest path. Nodes are in topological order (ONNX requires it)."""
    by_output = {out: name for name, (_, out) in units.items()}
    upstream: dict[str, frozenset] = {}
    for node in graph.node:
        above = frozenset().union(*(upstream.get(i, frozenset()) for i in node.input if i))
        for out in node.output:
            upstream[out] = above | {by_output[out]} if out in by_output else above
    memo: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in memo:
            memo[name] = 0      # a cycle cannot occur in a valid graph; this guards the recursion
            above = upstream.get(units[name][0], frozenset()) - {name}
            memo[name] = 1 + max((depth(u) for u in above), default=-1)
        return memo[name]

    return {name: depth(name) for name in units}


def stages(levels: dict[str, int], max_stages: int = MAX_STAGES) -> list[list[str]]:
    """Units grouped by depth, consecutive depths merged evenly when there are more than
    `max_stages` of them (a merged stage is fitted on the inputs of the stage before it)."""
    distinct = sorted(set(levels.values()))
    per = -(-len(distinct) // max_stages) if distinct else 1
    group = {d: i // per for i, d in enumerate(distinct)}
    out: dict[int, list[str]] = {}
    for name in sorted(levels, key=lambda n: (levels[n], n)):
        out.setdefault(group[levels[name]], []).append(name)
    return [out[k] for k in sorted(out)]


def anchored(layer: Layer, matrix_of, anchored_stats, ridge: float | None = None) -> Layer:
    """The layer with W* and b* in place of W and b (module docstring), from calibrate.Anchored.

    `matrix_of(layer, w)`: the weight as x @ M (space.as_matrix); only right-side weights and
    Conv (whose input rows are the im2col patches) are anchored."""
    a = anchored_stats
    n = max(a.count, 1)
    mu_t, mu = a.total_tilde / n, a.total / n
    cov = a.gram_tilde / n - np.outer(mu_t, mu_t)
    cross = a.cross / n - np.outer(mu_t, mu)
    m = matrix_of(layer, layer.weight.astype(np.float64))
    target = cross @ m
    gap_mean = np.zeros(m.shape[1])
    if RESIDUAL_GAP and a.gap_cross is not None and a.gap_cross.shape == (len(cov), m.shape[1]):
        gap_mean = a.gap_total / n
        target = target + a.gap_cross / n - np.outer(mu_t, gap_mean)
    # as if d rows where X~ = X were added (the shrinkage of calibrate.LayerStats.expected): with
    # few rows per input dimension the regression onto X~ would fit the calibration rows' noise
    d = len(cov)
    weight = d / (d + a.count)
    lam = max(RIDGE if ridge is None else ridge, weight / (1 - weight)) * max(float(np.mean(np.diag(cov))), 1e-12)
    import scipy.linalg
    try:
        m_star = scipy.linalg.solve(cov + lam * np.eye(len(cov)), target + lam * m, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError):
        m_star = np.linalg.lstsq(cov + lam * np.eye(len(cov)), target + lam * m, rcond=None)[0]
    n_out = m.shape[1]
    bias = np.zeros(n_out) if layer.bias is None else np.broadcast_to(layer.bias.astype(np.float64), (n_out,))
    b_star = bias + mu @ m + gap_mean - mu_t @ m_star
    if layer.op == "Conv":
        weight = m_star.T.reshape(layer.weight.shape)
    else:
        weight = m_star
    return dataclasses.replace(layer, weight=weight.astype(layer.dtype), bias=b_star.astype(layer.dtype))


def residual(graph: onnx.GraphProto, layer: Layer) -> str | None:
    """The tensor a residual Add sums with the layer's output, where that Add is its only
    reader and the other term is computed (not a constant): a transformer's attention output
    projection and FFN output, a ResNet's last Conv of a block."""
    readers = [node for node in graph.node if layer.output in node.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].input) != 2:
        return None
    if any(o.name == layer.output for o in graph.output):
        return None
    other = next((i for i in readers[0].input if i != layer.output), None)
    constants = {t.name for t in graph.initializer} | {o for node in graph.node if node.op_type == "Constant"
                                                       for o in node.output}
    return other if other and other not in constants else None


def can_anchor(layer: Layer) -> bool:
    """Main-graph layers whose input rows are x (right side) or im2col patches (Conv)."""
    return not layer.scope and layer.side == "right" and not layer.attrs.get("transA")
