"""Graph-rewrite passes: one module per factorization method, one contract.

Each module answers five questions (DESIGN.md, the pass contract):
    applies(layer) -> None | reason          which layers it can rewrite, and why not
    candidates(layer) -> [config]            its slice of the design space
    cost(layer, config) -> (params, flops)   analytic; tests check it against the built graph
    factorize(layer, config, stats=None, decomposition=None) -> [factors]
                                             plain arrays out; `decompose(layer, stats)` gives a
                                             decomposition that serves many configs
    rewrite(graph, layer, factors) -> None   edits the onnx-graphsurgeon graph in place
and reads and writes its own spec text: parse_spec(layer, text) -> config, spec(config) -> text.
A new method is one new module added to PASSES. A pass with TARGET = "pair" (prune) takes a
pairs.Pair, named by its producer layer, in place of the layer in each of these.
"""
from __future__ import annotations

from . import conv_svd, conv_tt, prune, svd, tt

PASSES = {module.NAME: module for module in (svd, tt, conv_svd, conv_tt, prune)}

__all__ = ["PASSES", "svd", "tt", "conv_svd", "conv_tt", "prune"]
