"""3-core Tensor-Train of a Conv kernel in the order (Cin | kh*kw | Cout).

Conv(Cin->Cout, kxk) becomes Conv 1x1 (Cin->r1), Conv kxk (r1->r2, the original
strides, pads and dilations), Conv 1x1 (r2->Cout) with the bias. Zero padding
commutes with a 1x1 convolution without bias, so the pads move to the middle conv.
"""
from __future__ import annotations

import numpy as np

from denseflex_onnx import costs
from denseflex_onnx.errors import UserError
from denseflex_onnx.sketch import trace

from .chain import Chain, conv_geometry, rank_from_text
from .svd import partial_svd

NAME = "conv_tt"
OPS = ("Conv",)
RANK_STEPS = (8, 16, 32, 64, 128, 256)


def applies(layer) -> str | None:
    if layer.op not in OPS:
        return f"conv_tt takes Conv layers, not {layer.op}"
    if costs.prod(layer.weight.shape[2:]) == 1:
        return "1x1 kernel: conv_svd covers it"
    return None


def max_ranks(layer) -> tuple[int, int]:
    cout, cin = layer.weight.shape[:2]
    kk = costs.prod(layer.weight.shape[2:])
    return min(cin, kk * cout), min(cin * kk, cout)


def reachable_ranks(layer, ranks) -> list[int]:
    """What TT-SVD of (Cin | kh*kw | Cout) can give: r1 <= min(Cin, kk*Cout), r2 <= min(r1*kk, Cout)."""
    cout, cin = layer.weight.shape[:2]
    kk = costs.prod(layer.weight.shape[2:])
    r1 = min(ranks[0], cin, kk * cout)
    return [r1, min(ranks[1], r1 * kk, cout)]


def candidates(layer) -> list[dict]:
    """(r1, r2) on multiples of 8 up to each bond's maximum, that save weights."""
    caps = max_ranks(layer)
    steps = [[r for r in RANK_STEPS if r <= c] or [c] for c in caps]
    dense_params = layer.weight.size
    configs = []
    for r1 in steps[0]:
        for r2 in steps[1]:
            config = {"ranks": reachable_ranks(layer, [r1, r2])}
            if config not in configs and cost(layer, config)[0] < dense_params:
                configs.append(config)
    return configs


def cost(layer, config) -> tuple[int, int]:
    cout, cin = layer.weight.shape[:2]
    kk = costs.prod(layer.weight.shape[2:])
    r1, r2 = config["ranks"]
    bias = layer.bias.size if layer.bias is not None else 0
    pixels_in = layer.activation_shape[0] * costs.prod(layer.activation_shape[2:])
    flops = (costs.matmul_flops(pixels_in, cin, r1) + costs.matmul_flops(layer.rows, r1 * kk, r2)
             + costs.matmul_flops(layer.rows, r2, cout))
    return cin * r1 + r1 * kk * r2 + r2 * cout + bias, flops


def decompose(layer, stats=None, max_rank=None, mode: str = "plain"):
    return None


def factorize(layer, config, stats=None, decomposition=None, mode: str = "plain") -> list[np.ndarray]:
    """Three kernels: [r1, Cin, 1..], [r2, r1, *k], [Cout, r2, 1..]."""
    cout, cin = layer.weight.shape[:2]
    spatial = layer.weight.shape[2:]
    r1, r2 = config["ranks"]
    kk = costs.prod(spatial)
    tensor = layer.weight.astype(np.float64).reshape(cout, cin, kk).transpose(1, 2, 0)  # Cin, kk, Cout
    from tensorly.decomposition import tensor_train    # imported where used: the CLI starts faster
    g1, g2, g3 = tensor_train(tensor, rank=[1, r1, r2, 1], svd=partial_svd)
    g1, g2, g3 = (np.asarray(g) for g in (g1, g2, g3))
    r1, r2 = g1.shape[-1], g2.shape[-1]       # tensorly caps ranks at what the shape allows
    m2, c3 = g2.reshape(r1 * kk, r2), g3[..., 0]
    if mode != "plain" and stats is not None:
        m2, c3 = refit(g1[0], m2, c3, kk, stats.gram, layer.weight.reshape(cout, -1).T.astype(np.float64))
    ones = [1] * len(spatial)
    first = g1[0].T.reshape(r1, cin, *ones)
    middle = m2.reshape(r1, kk, r2).transpose(2, 0, 1).reshape(r2, r1, *spatial)
    last = c3.T.reshape(cout, r2, *ones)
    return [k.astype(layer.dtype) for k in (first, middle, last)]


ALS_SWEEPS = 3
# bounds on the refit's systems (the middle core's unknowns, and E1's entries), so one refit
# stays within seconds and a few hundred MB; a core too big for them keeps its TT-SVD values
MAX_UNKNOWNS = 2048
MAX_DESIGN = 1 << 25


def refit(g1: np.ndarray, m2: np.ndarray, c3: np.ndarray, kk: int, gram, w: np.ndarray):
    """Alternating least squares of the middle and last cores on the calibration patches:
    minimize ||X W - X E1 M2 C3|| with E1 = G1 (x) I_kk fixed, X^T X = gram. Each step is an
    exact least-squares solve, so the error never grows; the best sweep is kept."""
    if g1.shape[1] * kk > MAX_UNKNOWNS or g1.size * kk * kk > MAX_DESIGN:
        return m2, c3
    e1 = np.kron(g1, np.eye(kk))                              # [Cin*kk, r1*kk]
    ridge = 1e-9 * max(trace(gram) / len(gram), 1e-30)
    # everything below is in E1's column space: the K x K statistics are touched once
    hgh = e1.T @ gram @ e1
    hgw = e1.T @ gram @ w
    wgw = float(np.sum(w * (gram @ w)))

    def objective(m, c):
        mc = m @ c                                            # ||X W - X E1 M C||^2, expanded
        return wgw - 2 * float(np.sum(hgw * mc)) + float(np.sum(mc * (hgh @ mc)))

    def solve(a, b):
        return np.linalg.solve(a + ridge * np.eye(len(a)), b)

    best = (objective(m2, c3), m2, c3)
    for _ in range(ALS_SWEEPS):
        c3 = solve(m2.T @ hgh @ m2, m2.T @ hgw)
        m2 = solve(hgh, hgw @ c3.T) @ np.linalg.pinv(c3 @ c3.T)
        value = objective(m2, c3)
        if value < best[0]:
            best = (value, m2, c3)
    return best[1], best[2]


def reconstruct(layer, factors) -> np.ndarray:
    """The kernel the three convolutions compute together."""
    first, middle, last = (f.astype(np.float64) for f in factors)
    r1, r2 = first.shape[0], middle.shape[0]
    spatial = middle.shape[2:]
    a = first.reshape(r1, -1)                                   # [r1, Cin]
    b = middle.reshape(r2, r1, -1)                              # [r2, r1, kk]
    c = last.reshape(last.shape[0], r2)                         # [Cout, r2]
    # two matrix products: a plain three-operand einsum loops over all five indices (97 s of
    # a 146 s magika run)
    cb = (c @ b.reshape(r2, -1)).reshape(c.shape[0], r1, -1)       # [Cout, r1, kk]
    kernel = np.tensordot(cb, a, axes=([1], [0])).transpose(0, 2, 1)    # [Cout, Cin, kk]
    return kernel.reshape(last.shape[0], a.shape[1], *spatial)


def rewrite(graph, layer, factors) -> None:
    first, middle, last = factors
    ones = [1] * (first.ndim - 2)
    chain = Chain(graph, layer, NAME)
    h = chain.op("Conv", [chain.input, chain.constant("W1", first)], {"kernel_shape": ones})
    h = chain.op("Conv", [h, chain.constant("W2", middle)], conv_geometry(layer, middle.shape[2:]))
    inputs = [h, chain.constant("W3", last)]
    if layer.bias is not None:
        inputs.append(chain.constant("bias", layer.bias))
    chain.finish("Conv", inputs, {"kernel_shape": ones})


def parse_spec(layer, text: str) -> dict:
    what = f"conv_tt:{text} on {layer.name}"
    caps = max_ranks(layer)
    if "x" in text:
        parts = text.split("x")
        if len(parts) != 2:
            raise UserError(f"{what}: expected conv_tt:R1xR2 (conv_tt:16x32) or a fraction")
        ranks = [rank_from_text(p, c, what) for p, c in zip(parts, caps)]
    else:
        ranks = [rank_from_text(text, c, what) for c in caps]
    if any(r > c for r, c in zip(ranks, caps)):
        raise UserError(f"{what}: ranks {ranks} exceed the layer's maxima {list(caps)}")
    reachable = reachable_ranks(layer, ranks)
    if reachable != ranks:
        if "x" in text:
            raise UserError(f"{what}: r2 is at most r1*kh*kw; use conv_tt:{reachable[0]}x{reachable[1]}")
        ranks = reachable
    return {"ranks": ranks}


def spec(config) -> str:
    return "conv_tt:{}x{}".format(*config["ranks"])
