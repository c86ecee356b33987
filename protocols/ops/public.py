"""A secret value combined with a public one (passes/public_inputs.py: an attention mask's bias, a
masked mean's weights and token count): local on every backend but for a product's truncation.

`PublicAdd` adds the public value (party 0 adds it to its share); `PublicMul` scales by it
(both parties scale their shares, then truncate as the plan says). The public operand is the
node's second input, named in the graph's `public`; the range passes receive it as a value of
their own kind, bounded by the range the check covered.
"""

from __future__ import annotations

import torch

from ..ir.graph import GraphError
from .registry import LayerCost, Op, register, truncation_of


class _WithPublic(Op):
    """A secret first input, a public second one that the graph declares."""

    reads_public = True

    def check(self, node, graph):
        if len(node.inputs) != 2 or node.weights or node.inputs[1] not in graph.public or node.inputs[0] in graph.public:
            raise GraphError(f"node '{node.name}' ({node.op}) combines a secret value with a public one the graph declares (its second input)")


class PublicAdd(_WithPublic):
    name = "PublicAdd"

    def plain(self, node, args, w):
        return args[0] + args[1]

    def secure(self, node, args, w, ctx):
        return args[0] + args[1]


class PublicMul(_WithPublic):
    name = "PublicMul"

    def plain(self, node, args, w):
        return args[0] * args[1]

    def secure(self, node, args, w, ctx):
        if isinstance(args[1], torch.Tensor):  # a party's, or a simulation's: the public tensor itself
            return ctx.backend.scale(args[0], args[1], truncation_of(node))
        return ctx.backend.mul(args[0], args[1], truncation_of(node))  # a range pass's bound of it

    def cost(self, node, io, pricing):
        step = pricing.truncation(io.batch * io.out(node), truncation_of(node))
        return LayerCost(node.name, node.op, bytes_online=step.bytes_online, rounds=step.rounds, bytes_offline=step.bytes_offline)


# -- ONNX import: Add, Mul (and Div, made a product with the reciprocal) read a public value ---------


def import_with_public(imp, node, a) -> None:
    """An Add or Mul of a secret and a public value (the importer sends every node that reads one here)."""
    public = [i for i in node.input if i in imp.public]
    secret = [i for i in node.input if i not in imp.public and i not in imp.init]
    if node.op_type not in ("Add", "Mul") or len(public) != 1 or len(secret) != 1:
        raise GraphError(
            f"node '{node.name}' ({node.op_type}) reads the public value '{public[0]}' computed from the public inputs; "
            "twinfer adds public values to, or multiplies them with, a secret value"
        )
    imp.emit(node, "PublicAdd" if node.op_type == "Add" else "PublicMul", [secret[0], public[0]], [], {})


register(PublicAdd())
register(PublicMul())
