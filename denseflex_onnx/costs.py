"""Parameter and FLOP formulas: the one place that counts.

FLOPs are 2 x multiply-accumulates, the convention of CLI.md's `--flops`.
"""
from __future__ import annotations

import math
from typing import Sequence


def prod(dims: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in dims))


def matmul_flops(rows: int, k: int, n: int) -> int:
    """[rows, k] @ [k, n]."""
    return 2 * int(rows) * int(k) * int(n)


def conv_flops(output_shape: Sequence[int], cin_per_group: int, kernel: Sequence[int]) -> int:
    """A convolution producing `output_shape` ([N, Cout, *spatial])."""
    return 2 * prod(output_shape) * int(cin_per_group) * prod(kernel)


def conv_output_shape(input_shape: Sequence[int], cout: int, kernel: Sequence[int],
                      strides: Sequence[int], pads: Sequence[int],
                      dilations: Sequence[int]) -> tuple[int, ...]:
    """Output shape of a Conv with explicit pads ([begin..., end...])."""
    spatial = input_shape[2:]
    nd = len(spatial)
    out = []
    for i in range(nd):
        span = dilations[i] * (kernel[i] - 1) + 1
        out.append((spatial[i] + pads[i] + pads[i + nd] - span) // strides[i] + 1)
    return (int(input_shape[0]), int(cout), *out)


def tt_matrix_params(in_modes: Sequence[int], out_modes: Sequence[int],
                     ranks: Sequence[int]) -> int:
    """Cores [r_{t-1}, k_t, n_t, r_t]; `ranks` holds the inner bonds only."""
    r = [1, *ranks, 1]
    return sum(r[t] * in_modes[t] * out_modes[t] * r[t + 1] for t in range(len(in_modes)))


def tt_matrix_flops(rows: int, in_modes: Sequence[int], out_modes: Sequence[int],
                    ranks: Sequence[int]) -> int:
    """The right-to-left contraction of passes/tt.py: core t contracts (k_t, r_t)
    into (r_{t-1}, n_t) for every combination of the other modes."""
    r = [1, *ranks, 1]
    d = len(in_modes)
    total = 0
    for t in range(d):
        others = rows * prod(in_modes[:t]) * prod(out_modes[t + 1:])
        total += matmul_flops(others, in_modes[t] * r[t + 1], r[t] * out_modes[t])
    return total
