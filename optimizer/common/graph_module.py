"""A trainable torch module built from an ONNX model, one submodule per compiled node.

The optimizer fine-tunes what users hand it as ONNX. onnx2torch would pull torchvision and
another torch build (platform.md), so this rebuilds the few ops twinfer supports from the
compiled graph (each op's `module` in protocols/ops/), with BatchNorm already folded into its
conv/linear.
Exported again it gives the same ops, so the artifact's model is the graph that was trained.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from twinfer.protocols.ir.graph import Graph, GraphError
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.protocols.ops import op_for
from twinfer.protocols.ops.shape import Reshape

__all__ = ["GraphModule", "Reshape", "module_key"]


def module_key(name: str) -> str:
    """ModuleDict keys may not contain dots; ONNX node names often do."""
    return name.replace(".", "_").replace("/", "_").strip("_") or "node"


class GraphModule(nn.Module):
    """Runs the compiled graph's nodes in order; `layers[module_key(node.name)]` is each node's module."""

    def __init__(self, graph: Graph, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        if graph.public_inputs:  # training would need each sample's public values: not yet
            raise GraphError(
                f"the optimizer takes models whose one input is the client's; this one also takes the public input(s) "
                f"{sorted(graph.public_inputs)}: optimise it exported without them"
            )
        self.graph = graph
        self.keys = [module_key(n.name) for n in graph.nodes]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("node names collide after sanitising; rename the model's nodes")
        self.layers = nn.ModuleDict()
        for node, key in zip(graph.nodes, self.keys):
            module = op_for(node).module(node, [weights[k] for k in node.weights])
            if module is not None:
                self.layers[key] = module

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes) -> "GraphModule":
        graph, weights = graph_from_onnx(onnx.load_from_string(onnx_bytes), rewrite=False)  # as exported: its ReLUs become sites
        return cls(graph, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.graph.input_name: x}
        for node, key in zip(self.graph.nodes, self.keys):
            args = [values[i] for i in node.inputs]
            if key in self.layers:
                values[node.output] = self.layers[key](args[0])
            else:  # an op without weights over several activations (a residual Add, a Concat)
                values[node.output] = op_for(node).plain(node, args, [])
        return values[self.graph.output_name]
