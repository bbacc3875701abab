"""The input covariance X^T X of a layer too wide to keep it whole: a low-rank sketch.

A Conv with Cin*kh*kw = 65,536 has a 32 GiB X^T X, and even one of 8,192 costs more to
accumulate and decompose than the layer is worth. Data-aware fits need the leading
directions of X^T X most (they decide where the rank goes), so such a layer keeps

    X^T X ~ sigma I + U diag(d) U^T        U [K, l] orthonormal, l << K

built in one pass over the calibration rows (`NystromSketch`), and `LowRankGram` stands in
for the K x K matrix wherever the passes use one (`@` on either side, len, trace, powers),
without ever forming it.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg


class LowRankGram:
    """sigma I + U diag(d) U^T: the leading directions of a covariance exactly, the rest isotropic.

    Acts as the symmetric K x K matrix it stands for: `G @ M`, `M @ G`, `len(G)`, `G.trace()`,
    `G.T`; `power(p)` is G^p in the same form (its eigenvectors are U and the complement).
    """
    __array_ufunc__ = None          # so `ndarray @ G` calls G.__rmatmul__

    def __init__(self, sigma: float, basis: np.ndarray, values: np.ndarray):
        self.sigma = float(sigma)
        self.basis = basis          # [K, l], orthonormal columns
        self.values = values        # [l]: eigenvalues along the basis, minus sigma

    @property
    def shape(self) -> tuple[int, int]:
        k = self.basis.shape[0]
        return k, k

    @property
    def T(self) -> "LowRankGram":
        return self

    @property
    def nbytes(self) -> int:
        return self.basis.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return self.basis.shape[0]

    def __matmul__(self, m: np.ndarray) -> np.ndarray:
        m = np.asarray(m)
        projected = self.basis.T @ m
        scaled = (self.values[:, None] * projected) if m.ndim == 2 else self.values * projected
        return self.sigma * m + self.basis @ scaled

    def __rmatmul__(self, m: np.ndarray) -> np.ndarray:
        m = np.asarray(m)
        return self @ m if m.ndim == 1 else (self @ m.T).T

    def trace(self) -> float:
        return self.sigma * len(self) + float(np.sum(self.values))

    def eigenvalues(self) -> np.ndarray:
        """Along the basis, descending (the complement's are all sigma)."""
        return np.sort(self.sigma + self.values)[::-1]

    def power(self, p: float, ridge: float = 0.0) -> "LowRankGram":
        """(G + ridge I)^p; eigenvalues are clipped at 0 first."""
        along = np.maximum(self.sigma + self.values, 0.0) + ridge
        rest = max(self.sigma, 0.0) + ridge
        return LowRankGram(rest ** p, self.basis, along ** p - rest ** p)

    def minus_outer(self, v: np.ndarray, weight: float) -> "LowRankGram":
        """G - weight v v^T, in the same form: the basis grows by v's direction (centering)."""
        q, _ = np.linalg.qr(np.concatenate([self.basis, v[:, None]], axis=1))
        inner = (q.T @ self.basis) * self.values @ (self.basis.T @ q)
        pv = q.T @ v
        values, vectors = np.linalg.eigh(inner - weight * np.outer(pv, pv))
        return LowRankGram(self.sigma, q @ vectors, values)

    def shrunk(self, weight: float) -> "LowRankGram":
        """(1 - weight) G + weight (tr G / K) I."""
        iso = self.trace() / max(len(self), 1)
        return LowRankGram((1 - weight) * self.sigma + weight * iso, self.basis, (1 - weight) * self.values)

    def rows(self, count: int | None = None) -> np.ndarray:
        """X~ [rows, K] whose X~^T X~ is G's part along its leading `count` directions."""
        values = self.sigma + self.values
        order = np.argsort(values)[::-1][:count]
        return np.sqrt(np.maximum(values[order], 0.0))[:, None] * self.basis[:, order].T


def trace(gram) -> float:
    """tr(X^T X) for a full matrix or a LowRankGram."""
    return gram.trace() if isinstance(gram, LowRankGram) else float(np.trace(gram))


class NystromSketch:
    """X^T X Omega for a fixed random orthonormal Omega [K, l], accumulated over row blocks,
    and the exact trace; `gram()` turns it into a LowRankGram by the stable single-pass
    Nystrom approximation of Tropp, Yurtsever, Udell & Cevher (2017), with the trace the
    leading directions miss spread over the complement.

    Products run in float32 (the sketch, not the model, sets the precision); memory is
    3 K l floats, time 4 K l flops per row (the full X^T X: 2 K^2).
    """

    def __init__(self, k: int, rank: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        omega, _ = np.linalg.qr(rng.standard_normal((k, rank)))
        self.omega = omega.astype(np.float32)
        self.product = np.zeros((k, rank))
        self.squares = 0.0

    @staticmethod
    def bytes_needed(k: int, rank: int) -> int:
        return k * rank * (4 + 8 + 8)            # Omega, X^T X Omega, and one working copy

    def add(self, rows: np.ndarray) -> None:
        rows32 = rows.astype(np.float32, copy=False)
        self.product += rows32.T @ (rows32 @ self.omega)
        self.squares += float(np.einsum("ij,ij->", rows, rows))

    def gram(self) -> LowRankGram:
        k, rank = self.product.shape
        omega = self.omega.astype(np.float64)
        shift = np.sqrt(k) * np.finfo(np.float32).eps * max(float(np.linalg.norm(self.product)), 1e-30)
        shifted = self.product + shift * omega
        core = omega.T @ shifted
        core = (core + core.T) / 2
        try:
            lower = np.linalg.cholesky(core)
            b = scipy.linalg.solve_triangular(lower, shifted.T, lower=True).T      # shifted @ L^-T
        except np.linalg.LinAlgError:
            values, vectors = np.linalg.eigh(core)
            keep = values > values.max() * 1e-10
            b = shifted @ vectors[:, keep] / np.sqrt(values[keep])
        u, s, _ = np.linalg.svd(b, full_matrices=False)
        values = np.maximum(s ** 2 - shift, 0.0)
        rest = k - len(values)
        sigma = max(self.squares - float(values.sum()), 0.0) / rest if rest > 0 else 0.0
        return LowRankGram(sigma, u, values - sigma)
