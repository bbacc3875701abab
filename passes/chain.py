"""What every pass needs to put a chain of nodes in place of a layer."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


class Chain:
    """Builds the nodes that replace one layer, named `<layer>/<method>/...`.

    Creating a Chain detaches the layer's old nodes; `finish` routes the last
    tensor into the layer's original output, so its readers and name stay.
    """

    def __init__(self, graph: gs.Graph, layer, method: str):
        self.graph = graph
        self.prefix = f"{layer.name}/{method}"
        self.dtype = layer.dtype
        tensors = graph.tensors()
        self.input: gs.Tensor = tensors[layer.input]
        self.output: gs.Tensor = tensors[layer.output]
        for node in graph.nodes:
            if node.outputs and node.outputs[0].name in layer.node_outputs:
                node.outputs.clear()
        self._count = 0

    def constant(self, suffix: str, array: np.ndarray, dtype=None) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{suffix}",
                           np.ascontiguousarray(array, dtype=dtype or self.dtype))

    def shape_constant(self, suffix: str, dims) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{suffix}", np.asarray(dims, dtype=np.int64))

    def op(self, op: str, inputs: list, attrs: dict | None = None, out: gs.Tensor | None = None) -> gs.Tensor:
        name = f"{self.prefix}/{op}_{self._count}"
        self._count += 1
        out = out if out is not None else gs.Variable(f"{name}/out")
        self.graph.nodes.append(gs.Node(op=op, name=name, attrs=attrs or {}, inputs=inputs, outputs=[out]))
        return out

    def finish(self, last_op: str, inputs: list, attrs: dict | None = None) -> None:
        """The chain's last node writes the layer's original output tensor."""
        self.op(last_op, inputs, attrs, out=self.output)

    def last(self, op: str, inputs: list, bias: np.ndarray | None = None, attrs: dict | None = None) -> None:
        """The chain's last node, then the bias Add if there is one, into the layer's output."""
        if bias is None:
            self.finish(op, inputs, attrs)
        else:
            self.finish("Add", [self.op(op, inputs, attrs), self.constant("bias", bias)])


def conv_geometry(layer, kernel_shape) -> dict:
    """Attributes of the conv that keeps the layer's strides, dilations and padding."""
    attrs = {"kernel_shape": list(kernel_shape), "strides": list(layer.attrs["strides"]),
             "dilations": list(layer.attrs["dilations"])}
    if "auto_pad" in layer.attrs:
        attrs["auto_pad"] = layer.attrs["auto_pad"]
    else:
        attrs["pads"] = list(layer.attrs["pads"])
    return attrs


def split_singular_values(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int):
    """W ~ (U sqrt(S)) (sqrt(S) Vt): both factors carry half the scale, which keeps fp16 in range."""
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def rank_from_text(text: str, full: int, what: str) -> int:
    """A number with a decimal point is a fraction of full rank; an integer is a rank."""
    from denseflex_onnx.errors import UserError
    try:
        if "." in text:
            fraction = float(text)
            if not 0 < fraction <= 1:
                raise UserError(f"{what}: fraction {text} must be in (0, 1]")
            return max(1, int(round(fraction * full)))
        rank = int(text)
    except ValueError:
        raise UserError(f"{what}: {text!r} is neither a rank (64) nor a fraction (0.25)") from None
    if rank < 1:
        raise UserError(f"{what}: rank must be at least 1")
    return rank
