"""SVD of a Gemm/MatMul weight: W (K x N) -> A (K x r) @ B (r x N).

x @ W + b becomes MatMul(MatMul(x, A), B) + b, for any leading dims of x; a
constant on the left (W @ x) becomes A @ (B @ x). One decomposition serves every
rank: truncations are prefixes of the singular triplets.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from denseflex_onnx import costs
from denseflex_onnx.errors import UserError

from .chain import Chain, rank_from_text, split_singular_values

NAME = "svd"
OPS = ("Gemm", "MatMul")


def applies(layer) -> str | None:
    if layer.op not in OPS:
        return f"svd takes Gemm and MatMul layers, not {layer.op}"
    if min(layer.weight.shape) < 2:
        return "weight has a dimension of 1: nothing to factorize"
    return None


def full_rank(layer) -> int:
    return int(min(layer.weight.shape))


def break_even(layer) -> float:
    """Rank at which the two factors hold as many weights as W."""
    k, n = layer.weight.shape
    return k * n / (k + n)


def candidates(layer) -> list[dict]:
    """Ranks below break-even: multiples of 8 and powers of two."""
    limit = break_even(layer)
    ranks = {r for r in range(8, int(limit) + 1, 8)} | {2 ** i for i in range(0, 32) if 2 ** i <= limit}
    return [{"rank": r} for r in sorted(ranks) if r < limit]


def cost(layer, config) -> tuple[int, int]:
    k, n = layer.matrix_shape
    r = config["rank"]
    bias = layer.bias.size if layer.bias is not None else 0
    return r * (k + n) + bias, costs.matmul_flops(layer.rows, k, r) + costs.matmul_flops(layer.rows, r, n)


def decompose(layer, stats=None, max_rank: int | None = None):
    """(U, S, Vt) of the weight in float64, enough triplets for ranks up to max_rank."""
    w = layer.weight.astype(np.float64)
    return truncated_svd(w, max_rank)


def truncated_svd(w: np.ndarray, max_rank: int | None = None):
    """A randomized SVD when few triplets of a big matrix are wanted, else LAPACK's gesdd."""
    full = min(w.shape)
    if max_rank is not None and full > 512 and max_rank < full // 4:
        return _randomized_svd(w, max_rank)
    try:
        return scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesvd")


def _randomized_svd(w: np.ndarray, rank: int, oversample: int = 16, power_iterations: int = 4):
    """Halko, Martinsson & Tropp (2011); power iterations make it near-optimal for slow spectra."""
    rng = np.random.default_rng(0)
    sketch = w @ rng.standard_normal((w.shape[1], rank + oversample))
    for _ in range(power_iterations):
        sketch, _ = np.linalg.qr(sketch)
        sketch, _ = np.linalg.qr(w.T @ sketch)
        sketch = w @ sketch
    q, _ = np.linalg.qr(sketch)
    u, s, vt = scipy.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def factorize(layer, config, stats=None, decomposition=None) -> list[np.ndarray]:
    """[A, B] with A @ B ~ W (for a left constant, A @ B ~ W as well, A [M, r])."""
    rank = config["rank"]
    u, s, vt = decomposition if decomposition is not None else decompose(layer, stats, rank)
    if rank > len(s):
        raise ValueError(f"rank {rank} above the {len(s)} triplets decomposed")
    a, b = split_singular_values(u, s, vt, rank)
    return [a.astype(layer.dtype), b.astype(layer.dtype)]


def rewrite(graph, layer, factors) -> None:
    a, b = factors
    chain = Chain(graph, layer, NAME)
    x = chain.input
    if layer.side == "left":
        h = chain.op("MatMul", [chain.constant("B", b), x])
        chain.finish("MatMul", [chain.constant("A", a), h])
        return
    if layer.attrs.get("transA"):
        x = chain.op("Transpose", [x], {"perm": [1, 0]})
    h = chain.op("MatMul", [x, chain.constant("A", a)])
    chain.last("MatMul", [h, chain.constant("B", b)], bias=layer.bias)


def parse_spec(layer, text: str) -> dict:
    rank = rank_from_text(text, full_rank(layer), f"svd:{text} on {layer.name}")
    if rank > full_rank(layer):
        raise UserError(f"svd:{text} on {layer.name}: rank {rank} is above the layer's full rank "
                        f"{full_rank(layer)} (min of {layer.weight.shape})")
    return {"rank": rank}


def spec(config) -> str:
    return f"svd:{config['rank']}"
