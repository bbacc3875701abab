"""SVD of a Gemm/MatMul weight: W (K x N) -> A (K x r) @ B (r x N).

x @ W + b becomes MatMul(MatMul(x, A), B) + b, for any leading dims of x; a
constant on the left (W @ x) becomes A @ (B @ x). One decomposition serves every
rank: truncations are prefixes of the singular triplets.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from denseflex_onnx import costs
from denseflex_onnx.errors import UserError

from .chain import Chain, rank_from_text, split_singular_values

log = logging.getLogger("denseflex_onnx")

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


@dataclass
class Decomposition:
    """SVD of T @ W for a transform T of the input space (identity for plain).

    `energy[i]` is the output error energy on the calibration data that triplet i
    removes, so the error of every rank is a cumulative sum (no reconstruction).
    """
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    untransform: np.ndarray | None   # T^-1, applied to the first factor
    energy: np.ndarray
    total: float                     # tr(W^T G W): the output energy of W itself
    # (A^T G A, A^T G W) for the first factor A of every triplet: the second factor is then
    # refitted by least squares at each rank (scaled mode, where truncation is not the optimum)
    refit: tuple[np.ndarray, np.ndarray] | None = None

    def relative_error(self, rank: int) -> float:
        kept = float(np.sum(self.energy[:rank]))
        return float(np.sqrt(max(self.total - kept, 0.0) / self.total)) if self.total > 0 else 0.0


def matrix(layer) -> np.ndarray:
    """The weight as x @ M (rows of x are input vectors), float64."""
    w = layer.weight.astype(np.float64)
    return w.T if layer.side == "left" else w


def decompose(layer, stats=None, max_rank: int | None = None, mode: str = "plain") -> Decomposition:
    return decompose_matrix(matrix(layer), stats, max_rank, mode)


def decompose_matrix(w: np.ndarray, stats=None, max_rank: int | None = None,
                     mode: str = "plain") -> Decomposition:
    """Plain SVD of W, or data-aware: whitened (SVD-LLM: T = chol(X^T X)^T, so truncation
    minimizes the output error) or scaled (ASVD: T = diag(mean|x|^0.5)).

    `stats.gram` may be a full X^T X or a LowRankGram sketch of it (a symmetric root then
    whitens, and T is never formed as a K x K matrix); either way only `@` is used on it.
    """
    gram = stats.gram if stats is not None else None
    transform = untransform = None
    if gram is not None and mode == "whitened":
        transform, untransform = whitening(gram)
    elif gram is not None and mode == "scaled":
        scale = np.sqrt(np.maximum(stats.mean_abs, 1e-6 * max(float(stats.mean_abs.max()), 1e-12)))
        transform, untransform = Diagonal(scale), Diagonal(1.0 / scale)
    m = w if transform is None else transform @ w
    u, s, vt = truncated_svd(m, max_rank)
    if gram is None:
        return Decomposition(u, s, vt, untransform, s ** 2, float(np.sum(w * w)))
    total = float(np.sum(w * (gram @ w)))
    if mode == "scaled":
        return _refitted(u, s, vt, untransform, w, gram, total)
    # the error energy triplet i removes: s_i^2 v_i^T G v_i with v_i = T^-1 u_i (1 when whitened)
    v = u if untransform is None else untransform @ u
    energy = s ** 2 * np.sum(v * (gram @ v), axis=0)
    return Decomposition(u, s, vt, untransform, energy, total)


def energies_on(d: Decomposition, w: np.ndarray, gram) -> tuple[np.ndarray, float]:
    """(energy per triplet, total) as `d` holds them, for the matrix W it decomposed, on another
    X^T X: triplet i's s_i^2 v_i^T G v_i, v_i = T^-1 u_i, and tr(W^T G W). The triplets' output
    directions are orthonormal, so their energies add on any inputs: the error of every rank is
    again a cumulative sum. Not for a refitted decomposition (its second factors are not the
    triplets')."""
    v = d.u if d.untransform is None else d.untransform @ d.u
    return d.s ** 2 * np.sum(v * (gram @ v), axis=0), float(np.sum(w * (gram @ w)))


def _refitted(u, s, vt, untransform, w, gram, total) -> Decomposition:
    """The scaled SVD with its second factor refitted at every rank: B_r = argmin ||X W - X A_r B||,
    i.e. (A_r^T G A_r)^-1 A_r^T G W. Whitened truncation needs no refit (it is already that
    optimum: Eckart-Young in the metric of X), so this is the scaled mode's alone.

    The energy each rank keeps comes from one Cholesky factor L of A^T G A (that of a leading
    block is the leading block of L): row i of L^-1 A^T G W is what triplet i adds."""
    import scipy.linalg
    a, _ = split_singular_values(u, s, vt, len(s))
    a = untransform @ a
    ga = gram @ a
    z, y = a.T @ ga, ga.T @ w
    z = z + _ridge(z) * np.eye(len(z))
    try:
        root = np.linalg.cholesky(z)
    except np.linalg.LinAlgError:        # a degenerate basis: keep the truncation's own errors
        v = untransform @ u
        return Decomposition(u, s, vt, untransform, s ** 2 * np.sum(v * (gram @ v), axis=0), total)
    energy = np.sum(scipy.linalg.solve_triangular(root, y, lower=True) ** 2, axis=1)
    return Decomposition(u, s, vt, untransform, energy, total, refit=(z, y))


def _ridge(z: np.ndarray) -> float:
    return 1e-12 * max(float(np.trace(z)) / max(len(z), 1), 1e-300)


class Diagonal:
    """diag(values) as an operator: `D @ M` scales rows, without a K x K matrix."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __matmul__(self, m: np.ndarray) -> np.ndarray:
        return self.values[:, None] * m if m.ndim == 2 else self.values * m


def whitening(gram):
    """(T, T^-1) with T^T T = X^T X (+ a small ridge), or (None, None): plain SVD then.

    A full X^T X gets its Cholesky root; a LowRankGram its symmetric square root."""
    from denseflex_onnx.sketch import LowRankGram, trace
    if isinstance(gram, LowRankGram):
        ridge = 1e-6 * max(trace(gram) / len(gram), 1e-12)
        return gram.power(0.5, ridge), gram.power(-0.5, ridge)
    root = cholesky_root(gram)
    if root is None:
        return None, None
    return root.T, scipy_inv_triangular(root.T)


def scipy_inv_triangular(upper: np.ndarray) -> np.ndarray:
    """The inverse of an upper triangular matrix (half the work of a general inverse)."""
    import scipy.linalg
    return scipy.linalg.solve_triangular(upper, np.eye(len(upper)), lower=False)


def cholesky_root(gram: np.ndarray) -> np.ndarray | None:
    """Lower L with L L^T = X^T X + a small ridge; None (plain SVD then) if it fails."""
    if not np.all(np.isfinite(gram)):
        log.warning("calibration activations hold NaN or inf: plain SVD for this layer")
        return None
    ridge = 1e-6 * max(float(np.trace(gram)) / len(gram), 1e-12)
    for scale in (1, 100, 10000):
        try:
            return np.linalg.cholesky(gram + scale * ridge * np.eye(len(gram)))
        except np.linalg.LinAlgError:
            continue
    log.warning("calibration activations give a singular X^T X: plain SVD for this layer")
    return None


def truncated_svd(w: np.ndarray, max_rank: int | None = None):
    """A randomized SVD when few triplets of a big matrix are wanted, else LAPACK's gesdd.

    The randomized result is checked: if what it leaves out holds a direction stronger than
    the weakest triplet it kept (it missed part of the leading subspace), gesdd is used."""
    full = min(w.shape)
    if max_rank is not None and full > 512 and max_rank < full // 2:
        u, s, vt = _randomized_svd(w, max_rank)
        if len(s) == 0 or _residual_norm(w, u, s, vt) <= RANDOMIZED_TOLERANCE * s[-1]:
            return u, s, vt
        log.debug("randomized SVD missed part of the leading subspace; exact SVD instead")
    import scipy.linalg    # imported where used: the CLI starts faster

    try:
        return scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesvd")


# the residual's top singular value may exceed the last kept one by this much (a flat
# spectrum, where the two are nearly equal and either choice loses the same energy)
RANDOMIZED_TOLERANCE = 1.05


def _residual_norm(w: np.ndarray, u: np.ndarray, s: np.ndarray, vt: np.ndarray, steps: int = 8) -> float:
    """||W - U S V^T||_2, by power iteration on the residual (matrix-vector products only)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(w.shape[1])
    norm = 0.0
    for _ in range(steps):
        x /= max(np.linalg.norm(x), 1e-300)
        y = w @ x - u @ (s * (vt @ x))
        x = w.T @ y - vt.T @ (s * (u.T @ y))
        norm = float(np.sqrt(max(np.linalg.norm(x), 0.0)))
    return norm


def partial_svd(matrix, n_eigenvecs: int | None = None, **_):
    """truncated_svd with tensorly's SVD signature, so tensorly's TT-SVD uses it too."""
    u, s, vt = truncated_svd(np.asarray(matrix, dtype=np.float64), n_eigenvecs)
    k = len(s) if n_eigenvecs is None else min(n_eigenvecs, len(s))
    return u[:, :k], s[:k], vt[:k]


def _randomized_svd(w: np.ndarray, rank: int, oversample: int = 16, power_iterations: int = 4):
    """Halko, Martinsson & Tropp (2011); power iterations make it near-optimal for slow spectra."""
    rng = np.random.default_rng(0)
    sketch = w @ rng.standard_normal((w.shape[1], rank + oversample))
    for _ in range(power_iterations):
        sketch, _ = np.linalg.qr(sketch)
        sketch, _ = np.linalg.qr(w.T @ sketch)
        sketch = w @ sketch
    q, _ = np.linalg.qr(sketch)
    u, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vt[:rank]


def factorize(layer, config, stats=None, decomposition=None, mode: str = "plain") -> list[np.ndarray]:
    """[A, B] with x @ A @ B ~ x @ W; for a constant on the left, [A^T, B^T]."""
    rank = config["rank"]
    d = decomposition if decomposition is not None else decompose(layer, stats, rank, mode)
    a, b = truncate(d, rank)
    if layer.side == "left":
        a, b = a.T, b.T        # applied first, then second: B^T @ (A^T @ x)
    return [a.astype(layer.dtype), b.astype(layer.dtype)]


def truncate(d: Decomposition, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The two factors at this rank, [K, r] and [r, N], float64."""
    if rank > len(d.s):
        raise ValueError(f"rank {rank} above the {len(d.s)} triplets decomposed")
    a, b = split_singular_values(d.u, d.s, d.vt, rank)
    a = a if d.untransform is None else d.untransform @ a
    if d.refit is not None:
        z, y = d.refit
        import scipy.linalg
        b = scipy.linalg.solve(z[:rank, :rank], y[:rank], assume_a="pos")
    return a, b


def reconstruct(layer, factors) -> np.ndarray:
    """The weight the factors compute, in the layout of layer.weight."""
    a, b = (f.astype(np.float64) for f in factors)
    return a @ b if layer.side == "right" else b @ a


def rewrite(graph, layer, factors) -> None:
    a, b = factors
    chain = Chain(graph, layer, NAME)
    x = chain.input
    if layer.side == "left":
        h = chain.op("MatMul", [chain.constant("A", a), x])
        chain.finish("MatMul", [chain.constant("B", b), h])
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
