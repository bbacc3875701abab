"""Tensor-Train matrix (Novikov et al. 2015) of a Gemm/MatMul weight.

W (K x N) with K = k1*...*kd and N = n1*...*nd is held as cores
G_t [r_{t-1}, k_t, n_t, r_t]. In ONNX the cores are contracted right to left as
plain MatMuls over a 3-D state, each core a 2-D constant (prepacked by
onnxruntime, no Transposes): measured faster on ORT CPU than an Einsum chain
(bench/layers.py). Leading dims are taken from the input at run time.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from denseflex_onnx import costs
from denseflex_onnx.errors import UserError

from .chain import Chain
from .svd import partial_svd

NAME = "tt"
OPS = ("Gemm", "MatMul")
BOND_RANKS = (2, 4, 8, 16, 32, 64, 128, 256)
MODES = (2, 3, 4)


def applies(layer) -> str | None:
    if layer.op not in OPS:
        return f"tt takes Gemm and MatMul layers, not {layer.op}"
    if layer.side == "left":
        return "tt takes weights on the right of a MatMul (x @ W) only"
    k, n = layer.weight.shape
    if not factorizations(k, 2) or not factorizations(n, 2):
        return f"weight {k}x{n}: a dimension is prime or too small for a tensor-train shape"
    return None


def factorizations(n: int, d: int) -> list[tuple[int, ...]]:
    """Factorizations of n into d factors >= 2 (ascending), most balanced first."""
    def split(rest: int, parts: int, smallest: int):
        if parts == 1:
            return [(rest,)] if rest >= smallest else []
        return [(f, *tail) for f in range(smallest, int(rest ** (1 / parts)) + 2)
                if rest % f == 0 for tail in split(rest // f, parts - 1, f)]

    return sorted(set(split(n, d, 2)), key=lambda fs: (max(fs) / min(fs), fs))


def max_bonds(in_modes, out_modes) -> list[int]:
    """The largest useful rank of each bond: min of the two sides' sizes."""
    sizes = [k * n for k, n in zip(in_modes, out_modes)]
    return [min(math.prod(sizes[:t + 1]), math.prod(sizes[t + 1:])) for t in range(len(sizes) - 1)]


def reachable_ranks(in_modes, out_modes, ranks) -> list[int]:
    """The bond ranks TT-SVD can give: r_t <= r_{t-1} * k_t * n_t and <= the size right of the bond."""
    sizes = [k * n for k, n in zip(in_modes, out_modes)]
    out, previous = [], 1
    for t, wanted in enumerate(ranks):
        previous = min(int(wanted), previous * sizes[t], math.prod(sizes[t + 1:]))
        out.append(previous)
    return out


def candidates(layer) -> list[dict]:
    """For d = 2..4 modes: the most balanced shapes of K and of N, bonds from BOND_RANKS."""
    k, n = layer.weight.shape
    configs = []
    for d in MODES:
        for ins, outs in itertools.product(factorizations(k, d)[:1], factorizations(n, d)[:1]):
            for r in BOND_RANKS:
                ranks = reachable_ranks(ins, outs, [r] * (d - 1))
                config = {"in_modes": list(ins), "out_modes": list(outs), "ranks": ranks}
                if config not in configs:
                    configs.append(config)
    return configs


def cost(layer, config) -> tuple[int, int]:
    bias = layer.bias.size if layer.bias is not None else 0
    ins, outs, ranks = config["in_modes"], config["out_modes"], config["ranks"]
    return (costs.tt_matrix_params(ins, outs, ranks) + bias,
            costs.tt_matrix_flops(layer.rows, ins, outs, ranks))


class UnfoldingSVDs:
    """The SVD of the first unfolding TT-SVD takes, kept per mode shape.

    TT truncations are not prefixes of one another, but every config with the same modes
    starts from the same first unfolding (and d = 2 has no other): that SVD is computed once.
    Later unfoldings depend on the ranks and are decomposed as they come, truncated.
    """

    def __init__(self):
        self._first: dict[tuple, tuple] = {}

    def for_modes(self, modes: tuple):
        """An SVD function with tensorly's signature whose first call is served from the cache."""
        calls = []

        def svd(matrix, n_eigenvecs: int | None = None, **_):
            calls.append(None)
            if len(calls) > 1:
                return partial_svd(matrix, n_eigenvecs)
            if modes not in self._first:
                self._first[modes] = partial_svd(matrix)
            u, s, vt = self._first[modes]
            k = len(s) if n_eigenvecs is None else min(n_eigenvecs, len(s))
            return u[:, :k], s[:k], vt[:k]

        return svd


def decompose(layer, stats=None, max_rank=None, mode: str = "plain") -> UnfoldingSVDs:
    return UnfoldingSVDs()


def factorize(layer, config, stats=None, decomposition=None, mode: str = "plain") -> list[np.ndarray]:
    """Cores [r_{t-1}, k_t, n_t, r_t] by TT-SVD of W permuted to (k1 n1)(k2 n2)...(kd nd)."""
    ins, outs, ranks = config["in_modes"], config["out_modes"], list(config["ranks"])
    d = len(ins)
    w = layer.weight.astype(np.float64).reshape(*ins, *outs)
    interleaved = w.transpose([i for t in range(d) for i in (t, d + t)])
    tensor = interleaved.reshape([k * n for k, n in zip(ins, outs)])
    from tensorly.decomposition import tensor_train    # imported where used: the CLI starts faster
    svd = decomposition.for_modes((tuple(ins), tuple(outs))) if decomposition is not None else partial_svd
    cores = tensor_train(tensor, rank=[1, *ranks, 1], svd=svd)
    cores = [np.asarray(core).reshape(core.shape[0], k, n, core.shape[-1]) for core, k, n in zip(cores, ins, outs)]
    if mode != "plain" and stats is not None:
        cores = refit(cores, layer.weight.astype(np.float64), stats)
    return [core.astype(layer.dtype) for core in cores]


ALS_SWEEPS = 1
# bounds on each least-squares step (design columns, and rows x columns), so a sweep takes
# well under a second; a core too wide for them keeps its TT-SVD values
MAX_UNKNOWNS = 256
MAX_DESIGN = 1_000_000


def refit(cores: list[np.ndarray], w: np.ndarray, stats) -> list[np.ndarray]:
    """Alternating least squares of the first and last cores on the calibration activations:
    minimize ||X W - X W_tt|| with the other cores fixed (for d = 2, every core). X is
    represented by a sketch X~ (X~^T X~ = X^T X, its leading directions when that is too
    big); each step is an exact solve, and the best sweep is kept."""
    k, n = w.shape
    r_last, k_last, n_last = cores[-1].shape[:3]
    k_first, n_first, r_first = cores[0].shape[1], cores[0].shape[2], cores[0].shape[-1]
    unknowns = max(r_last * k_last, k_first * r_first)
    rows_per_sample = max(n // n_last, n // n_first)
    if unknowns > MAX_UNKNOWNS:
        return cores
    sketch = stats.sketch(max(1, min(k, MAX_DESIGN // (unknowns * rows_per_sample))))     # [m, K]
    target = sketch @ w

    def error(cs):
        return float(np.linalg.norm(target - sketch @ reconstruct_cores(cs)))

    best = (error(cores), [c.copy() for c in cores])
    for _ in range(ALS_SWEEPS):
        cores = _refit_last(cores, sketch, target)
        cores = _refit_first(cores, sketch, target)
        value = error(cores)
        if value < best[0]:
            best = (value, [c.copy() for c in cores])
    return best[1]


def _lstsq(design: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Least squares by the normal equations (few unknowns, many rows), lightly regularized."""
    gram = design.T @ design
    ridge = 1e-10 * max(float(np.trace(gram)) / len(gram), 1e-30)
    return np.linalg.solve(gram + ridge * np.eye(len(gram)), design.T @ rhs)


def _refit_last(cores, sketch, target):
    m = sketch.shape[0]
    k_last, n_last, r = cores[-1].shape[1], cores[-1].shape[2], cores[-1].shape[0]
    head = reconstruct_head(cores[:-1])                           # [K<, N<, r]
    x = sketch.reshape(m, -1, k_last)                             # [m, K<, k_d]
    design = np.tensordot(x, head, axes=([1], [0])).transpose(0, 2, 3, 1).reshape(-1, r * k_last)
    rhs = target.reshape(m, head.shape[1], n_last).reshape(-1, n_last)
    last = _lstsq(design, rhs).reshape(r, k_last, n_last, 1)
    return cores[:-1] + [last]


def _refit_first(cores, sketch, target):
    m = sketch.shape[0]
    k_first, n_first, r = cores[0].shape[1], cores[0].shape[2], cores[0].shape[-1]
    tail = reconstruct_tail(cores[1:])                            # [r, K>, N>]
    x = sketch.reshape(m, k_first, -1)                            # [m, k1, K>]
    design = np.tensordot(x, tail, axes=([2], [1])).transpose(0, 3, 1, 2).reshape(-1, k_first * r)
    rhs = target.reshape(m, n_first, tail.shape[2]).transpose(0, 2, 1).reshape(-1, n_first)
    first = _lstsq(design, rhs).reshape(k_first, r, n_first).transpose(0, 2, 1)[None]
    return [first] + cores[1:]


def reconstruct_head(cores) -> np.ndarray:
    """Cores 1..t contracted: [k1..kt, n1..nt, r_t] as [K_head, N_head, r_t]."""
    full = cores[0][0]                                            # [k1, n1, r1]
    for core in cores[1:]:
        full = np.tensordot(full, core, axes=([2], [0])).transpose(0, 2, 1, 3, 4)   # [(K), kt, (N), nt, r]
        full = full.reshape(full.shape[0] * full.shape[1], full.shape[2] * full.shape[3], full.shape[4])
    return full


def reconstruct_tail(cores) -> np.ndarray:
    """Cores t..d contracted: [r_{t-1}, K_tail, N_tail]."""
    full = cores[-1][..., 0]                                      # [r, kd, nd]
    for core in reversed(cores[:-1]):
        full = np.tensordot(core, full, axes=([3], [0])).transpose(0, 1, 3, 2, 4)   # [r, k, (K), n, (N)]
        full = full.reshape(full.shape[0], full.shape[1] * full.shape[2], full.shape[3] * full.shape[4])
    return full


def reconstruct(layer, factors) -> np.ndarray:
    """The K x N matrix the cores hold."""
    return reconstruct_cores(factors)


def reconstruct_cores(cores) -> np.ndarray:
    ins = [c.shape[1] for c in cores]
    outs = [c.shape[2] for c in cores]
    full = cores[0].astype(np.float64)                        # [1, k1, n1, r1]
    for core in cores[1:]:
        full = np.tensordot(full, core.astype(np.float64), axes=(-1, 0))
    full = full.reshape([m for k, n in zip(ins, outs) for m in (k, n)])
    d = len(cores)
    return full.transpose([2 * t for t in range(d)] + [2 * t + 1 for t in range(d)]).reshape(
        math.prod(ins), math.prod(outs))


def rewrite(graph, layer, factors) -> None:
    cores = factors
    d = len(cores)
    ins = [c.shape[1] for c in cores]
    outs = [c.shape[2] for c in cores]
    r = [1] + [c.shape[-1] for c in cores]
    chain = Chain(graph, layer, NAME)
    x = chain.input
    if layer.attrs.get("transA"):
        x = chain.op("Transpose", [x], {"perm": [1, 0]})
    # last core first, as a right-multiply: [B*k1..k_{d-1}, k_d] @ [k_d, r_{d-1}*n_d]
    state = chain.op("Reshape", [x, chain.shape_constant("shape_in", [-1, ins[-1]])])
    last = cores[-1][..., 0].transpose(1, 0, 2).reshape(ins[-1], r[d - 1] * outs[-1])
    state = chain.op("MatMul", [state, chain.constant(f"core{d - 1}", last)])
    for t in range(d - 2, -1, -1):
        # [.., k_t*r_{t+1}, n_{t+1}..n_d] <- C_t [r_t*n_t, k_t*r_{t+1}] @ state
        tail = math.prod(outs[t + 1:])
        state = chain.op("Reshape", [state, chain.shape_constant(f"shape{t}", [-1, ins[t] * r[t + 1], tail])])
        core = cores[t].transpose(0, 2, 1, 3).reshape(r[t] * outs[t], ins[t] * r[t + 1])
        state = chain.op("MatMul", [chain.constant(f"core{t}", core), state])
    n = math.prod(outs)
    rank = len(layer.activation_shape)
    if rank == 2 or layer.attrs.get("transA"):
        out_shape = chain.shape_constant("shape_out", [-1, n])
    else:
        shape = chain.op("Shape", [chain.input])
        if graph.opset >= 10:
            lead = chain.op("Slice", [shape, chain.shape_constant("start", [0]), chain.shape_constant("end", [-1])])
        else:           # before opset 10 Slice took its bounds as attributes
            lead = chain.op("Slice", [shape], {"starts": [0], "ends": [rank - 1]})
        out_shape = chain.op("Concat", [lead, chain.shape_constant("n", [n])], {"axis": 0})
    chain.last("Reshape", [state, out_shape], bias=layer.bias)


def parse_spec(layer, text: str) -> dict:
    """`7x8x14,8x8x16:16` (modes, then one rank or one per bond) or `0.25`."""
    what = f"tt:{text} on {layer.name}"
    k, n = layer.weight.shape
    if ":" not in text:
        try:
            fraction = float(text)
        except ValueError:
            raise UserError(f"{what}: expected tt:IN,OUT:RANK (tt:7x8x14,8x8x16:16) or a fraction (tt:0.25)") from None
        if not 0 < fraction <= 1:
            raise UserError(f"{what}: fraction must be in (0, 1]")
        ins, outs = factorizations(k, 3)[:1], factorizations(n, 3)[:1]
        if not ins or not outs:
            ins, outs = factorizations(k, 2)[:1], factorizations(n, 2)[:1]
        if not ins or not outs:
            raise UserError(f"{what}: {k}x{n} has no tensor-train shape")
        caps = max_bonds(ins[0], outs[0])
        return {"in_modes": list(ins[0]), "out_modes": list(outs[0]),
                "ranks": reachable_ranks(ins[0], outs[0], [max(1, int(round(fraction * c))) for c in caps])}
    try:
        modes, rank_text = text.rsplit(":", 1)
        in_text, out_text = modes.split(",")
        ins = [int(v) for v in in_text.split("x")]
        outs = [int(v) for v in out_text.split("x")]
        ranks = [int(v) for v in rank_text.split("x")]
    except ValueError:
        raise UserError(f"{what}: expected tt:IN,OUT:RANK, e.g. tt:7x8x14,8x8x16:16") from None
    if len(ins) != len(outs) or len(ins) < 2:
        raise UserError(f"{what}: input and output modes need the same count, at least 2")
    if math.prod(ins) != k or math.prod(outs) != n:
        raise UserError(f"{what}: modes multiply to {math.prod(ins)}x{math.prod(outs)}, the weight is {k}x{n}")
    if len(ranks) == 1:
        ranks = ranks * (len(ins) - 1)
    if len(ranks) != len(ins) - 1 or min(ranks) < 1:
        raise UserError(f"{what}: give one rank or one per bond ({len(ins) - 1})")
    caps = max_bonds(ins, outs)
    if any(r > c for r, c in zip(ranks, caps)):
        raise UserError(f"{what}: bond ranks {ranks} exceed the maxima {caps} of this shape")
    reachable = reachable_ranks(ins, outs, ranks)
    if reachable != ranks:
        raise UserError(f"{what}: bond ranks {ranks} cannot all be reached with these modes "
                        f"(each bond is at most the previous one times k*n); use {'x'.join(map(str, reachable))}")
    return {"in_modes": ins, "out_modes": outs, "ranks": ranks}


def spec(config) -> str:
    return "tt:{},{}:{}".format("x".join(map(str, config["in_modes"])),
                                "x".join(map(str, config["out_modes"])),
                                "x".join(map(str, config["ranks"])))
