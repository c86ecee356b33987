"""A trainable torch module built from an ONNX model, one submodule per compiled node.

The optimizer fine-tunes what users hand it as ONNX. onnx2torch would pull torchvision and
another torch build (platform.md), so this rebuilds the few ops twinfer supports from the
compiled graph (protocols/graph.py), with BatchNorm already folded into its conv/linear.
Exported again it gives the same ops, so the artifact's model is the graph that was trained.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from twinfer.protocols.graph import Graph, Node, graph_from_onnx, resolve_reshape


class Affine(nn.Module):
    """x * scale + shift (a BatchNorm that follows no conv/linear)."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.from_numpy(scale.copy()))
        self.shift = nn.Parameter(torch.from_numpy(shift.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class Constant(nn.Module):
    """Adds a learned constant (an Add node with a weight operand)."""

    def __init__(self, value: np.ndarray) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.from_numpy(value.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value


class Reshape(nn.Module):
    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = list(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(resolve_reshape(x.shape, self.shape))


def _conv(node: Node, w: list[np.ndarray]) -> nn.Conv2d:
    a = node.attrs
    out_c, in_per_group, kh, kw = w[0].shape
    conv = nn.Conv2d(
        in_per_group * a["group"], out_c, (kh, kw), tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), a["group"], bias=len(w) > 1
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w[0]))
        if len(w) > 1:
            conv.bias.copy_(torch.from_numpy(w[1]))
    return conv


def _linear(w: list[np.ndarray]) -> nn.Linear:
    out_f, in_f = w[0].shape
    linear = nn.Linear(in_f, out_f, bias=len(w) > 1)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w[0]))
        if len(w) > 1:
            linear.bias.copy_(torch.from_numpy(w[1]))
    return linear


def node_module(node: Node, w: list[np.ndarray]) -> nn.Module | None:
    """The torch module for one node; None for a two-input Add (computed in forward)."""
    a = node.attrs
    if node.op == "Conv":
        return _conv(node, w)
    if node.op == "Gemm":
        return _linear(w)
    if node.op == "Relu":
        return nn.ReLU()
    if node.op == "MaxPool":
        return nn.MaxPool2d(a["kernel"], a["stride"], a["padding"])
    if node.op == "AveragePool":
        return nn.AvgPool2d(a["kernel"], a["stride"], a["padding"], count_include_pad=True)
    if node.op == "GlobalAveragePool":
        return nn.AdaptiveAvgPool2d(1)
    if node.op == "Affine":
        return Affine(w[0], w[1])
    if node.op == "Flatten":
        return nn.Flatten(a["axis"])
    if node.op == "Reshape":
        return Reshape(a["shape"])
    if node.op == "Add":
        return Constant(w[0]) if w else None
    raise ValueError(f"node '{node.name}' ({node.op}) cannot be turned into a trainable module")


def module_key(name: str) -> str:
    """ModuleDict keys may not contain dots; ONNX node names often do."""
    return name.replace(".", "_").replace("/", "_").strip("_") or "node"


class GraphModule(nn.Module):
    """Runs the compiled graph's nodes in order; `layers[module_key(node.name)]` is each node's module."""

    def __init__(self, graph: Graph, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.graph = graph
        self.keys = [module_key(n.name) for n in graph.nodes]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("node names collide after sanitising; rename the model's nodes")
        self.layers = nn.ModuleDict()
        for node, key in zip(graph.nodes, self.keys):
            module = node_module(node, [weights[k] for k in node.weights])
            if module is not None:
                self.layers[key] = module

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes) -> "GraphModule":
        graph, weights = graph_from_onnx(onnx.load_from_string(onnx_bytes))
        return cls(graph, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.graph.input_name: x}
        for node, key in zip(self.graph.nodes, self.keys):
            args = [values[i] for i in node.inputs]
            if key in self.layers:
                values[node.output] = self.layers[key](args[0])
            else:  # Add of two activations (a residual connection)
                values[node.output] = args[0] + args[1]
        return values[self.graph.output_name]
