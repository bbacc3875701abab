"""SVD of a Conv kernel seen as a (Cin*kh*kw) x Cout matrix.

Conv(Cin->Cout, kxk) becomes Conv(Cin->r, kxk, the original strides, pads and
dilations) then Conv 1x1 (r->Cout) with the bias. 1-D and 2-D.
"""
from __future__ import annotations

import numpy as np

from denseflex_onnx import costs
from denseflex_onnx.errors import UserError

from .chain import Chain, conv_geometry, rank_from_text
from . import svd

NAME = "conv_svd"
OPS = ("Conv",)
# onnxruntime's CPU Conv works on blocks of 8 channels (16 on AVX-512): other ranks add reorders
CHANNEL_BLOCK = 8


def applies(layer) -> str | None:
    if layer.op not in OPS:
        return f"conv_svd takes Conv layers, not {layer.op}"
    if full_rank(layer) < 2:
        return "kernel matrix has rank 1 at most: nothing to factorize"
    return None


def full_rank(layer) -> int:
    cout = layer.weight.shape[0]
    return int(min(cout, costs.prod(layer.weight.shape[1:])))


def candidates(layer) -> list[dict]:
    """Ranks below break-even, multiples of 8 where the layer allows, else powers of two."""
    p, cout = layer.matrix_shape
    limit = p * cout / (p + cout)
    ranks = [r for r in range(CHANNEL_BLOCK, int(limit) + 1, CHANNEL_BLOCK) if r < limit]
    if not ranks:
        ranks = [2 ** i for i in range(0, 3) if 2 ** i < limit]
    return [{"rank": r} for r in ranks]


def cost(layer, config) -> tuple[int, int]:
    p, cout = layer.matrix_shape
    r = config["rank"]
    bias = layer.bias.size if layer.bias is not None else 0
    return r * (p + cout) + bias, costs.matmul_flops(layer.rows, p, r) + costs.matmul_flops(layer.rows, r, cout)


def kernel_matrix(layer) -> np.ndarray:
    """[Cin*kh*kw, Cout]: im2col patches @ this matrix is the convolution."""
    return layer.weight.reshape(layer.weight.shape[0], -1).T


def decompose(layer, stats=None, max_rank: int | None = None, mode: str = "plain"):
    """The SVD of the kernel matrix; data-aware modes use im2col patch statistics."""
    return svd.decompose_matrix(kernel_matrix(layer).astype(np.float64), stats, max_rank, mode)


def factorize(layer, config, stats=None, decomposition=None, mode: str = "plain") -> list[np.ndarray]:
    """[first kernel [r, Cin, *k], 1x1 kernel [Cout, r, 1...]]."""
    rank = config["rank"]
    d = decomposition if decomposition is not None else decompose(layer, stats, rank, mode)
    a, b = svd.truncate(d, rank)                      # a [P, r], b [r, Cout]
    spatial = layer.weight.shape[2:]
    first = a.T.reshape(rank, *layer.weight.shape[1:])
    second = b.T.reshape(b.shape[1], rank, *([1] * len(spatial)))
    return [first.astype(layer.dtype), second.astype(layer.dtype)]


def reconstruct(layer, factors) -> np.ndarray:
    first, second = (f.astype(np.float64) for f in factors)
    w = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
    return w.reshape(layer.weight.shape)


def rewrite(graph, layer, factors) -> None:
    first, second = factors
    chain = Chain(graph, layer, NAME)
    h = chain.op("Conv", [chain.input, chain.constant("W1", first)], conv_geometry(layer, first.shape[2:]))
    inputs = [h, chain.constant("W2", second)]
    if layer.bias is not None:
        inputs.append(chain.constant("bias", layer.bias))
    chain.finish("Conv", inputs, {"kernel_shape": [1] * (first.ndim - 2)})


def parse_spec(layer, text: str) -> dict:
    rank = rank_from_text(text, full_rank(layer), f"conv_svd:{text} on {layer.name}")
    if rank > full_rank(layer):
        raise UserError(f"conv_svd:{text} on {layer.name}: rank {rank} is above the layer's full rank "
                        f"{full_rank(layer)}")
    return {"rank": rank}


def spec(config) -> str:
    return f"conv_svd:{config['rank']}"
