"""Attention's ops: MatMul of two activations (Q K^T, probabilities x V), Transpose, Softmax.

MatMul of two secrets is one Beaver product whose masks are both fresh (the dealer's matrix
triples): X - A and Y - B opened together, one round. Transpose is local. Softmax along the
last axis (research note transformers.md, 3): the row's max by a comparison tree, exp of the
differences (`approximations.exp_nonpositive`), their sum (local), one reciprocal of a sum in
[1, n] (the max's own term is 1) and one product.
"""

from __future__ import annotations

import torch

from ..ir.graph import GraphError, Node
from . import approximations as approx
from .registry import LayerCost, Op, check_comparison_bits, register, size, truncation_of


class MatMul(Op):
    """The product of two activations (batched, broadcasting as torch.matmul)."""

    name = "MatMul"

    def check(self, node: Node, graph) -> None:
        if len(node.inputs) != 2 or node.weights:
            raise GraphError(f"node '{node.name}' (MatMul) multiplies two activations; a weight operand is a Gemm")
        if not isinstance(node.attrs.get("convex", False), bool):
            raise GraphError(f"node '{node.name}' (MatMul): convex is true or false, got {node.attrs['convex']!r}")

    def interval(self, node, args, w, ctx):
        """Probabilities times values (`convex`: the left operand is a softmax's, each row of it
        non-negative and summing to 1 within the softmax's error): each output lies between the
        least and the largest value of its column, give or take CONVEX_SLACK of their size. The
        products themselves, as any product's, by the intervals."""
        out = ctx.backend.matmul(args[0], args[1], truncation_of(node))
        if not node.attrs.get("convex"):
            return out
        v = args[1]
        slack = CONVEX_SLACK * v.magnitude.amax(dim=-2, keepdim=True)
        return out.intersect(v.lo.amin(dim=-2, keepdim=True) - slack, v.hi.amax(dim=-2, keepdim=True) + slack)

    def plain(self, node, args, w):
        return torch.matmul(args[0], args[1])

    def secure(self, node, args, w, ctx):
        return ctx.backend.matmul(args[0], args[1], truncation_of(node))

    def cost(self, node, io, pricing):
        left, right = (io.batch * size(s) for s in io.input_shapes)
        outputs = io.batch * io.out(node)
        step = pricing.secret_product(left, right, outputs) + pricing.truncation(outputs, truncation_of(node))
        inner = io.input_shapes[0][-1]
        return LayerCost(
            node.name, node.op, secure_mults=outputs * inner, bytes_online=step.bytes_online, rounds=step.rounds,
            bytes_offline=step.bytes_offline,
        )  # fmt: skip


CONVEX_SLACK = 0.01  # far above a softmax's error (its rows sum to 1 within 1e-4)


def mark_convex_products(graph) -> None:
    """Mark each MatMul whose left operand is a Softmax's output `convex` (public structure): its
    interval is then the span of its right operand's columns, not a sum over them."""
    softmax_outputs = {n.output for n in graph.nodes if n.op == "Softmax"}
    for node in graph.nodes:
        if node.op == "MatMul" and node.inputs[0] in softmax_outputs:
            node.attrs["convex"] = True


class Transpose(Op):
    """A permutation of the axes after the batch's (local on shares)."""

    name = "Transpose"

    def check(self, node: Node, graph) -> None:
        perm = node.attrs.get("perm")
        if not isinstance(perm, list) or sorted(perm) != list(range(len(perm))) or not perm or perm[0] != 0:
            raise GraphError(f"node '{node.name}' (Transpose) permutes the axes after the batch's; perm must keep axis 0 first, got {perm!r}")

    def plain(self, node, args, w):
        return args[0].permute(*node.attrs["perm"])

    def secure(self, node, args, w, ctx):
        return args[0].permute(*node.attrs["perm"])

    def module(self, node, w):
        return None


class Softmax(Op):
    name = "Softmax"
    compares = True

    def check(self, node: Node, graph) -> None:
        """The axis as exported (annotate makes it -1, or refuses another than the last)."""
        check_comparison_bits(node)
        axis = node.attrs.get("axis", -1)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise GraphError(f"node '{node.name}' (Softmax) needs an integer axis, got {axis!r}")

    def plain(self, node, args, w):
        return torch.softmax(args[0], dim=node.attrs.get("axis", -1))

    def annotate(self, node, out):
        if node.attrs.get("axis", -1) % out.dim() != out.dim() - 1:
            raise GraphError(f"node '{node.name}' (Softmax) is supported along the last axis only, got axis {node.attrs['axis']}")
        node.attrs["axis"] = -1

    def secure(self, node, args, w, ctx):
        if node.attrs.get("axis", -1) != -1:
            raise GraphError(f"node '{node.name}' (Softmax) is supported along the last axis only, got axis {node.attrs['axis']}")
        x = args[0]
        n = int(x.shape[-1])
        bits = node.attrs.get("bits")
        e = approx.exp_nonpositive(ctx, x - approx.row_max(ctx, x, bits), bits)
        r = approx.reciprocal(ctx, e.sum(-1, keepdim=True), 1.0, float(n), bits)
        return ctx.backend.mul(e, r, truncation_of(node))

    def cost(self, node, io, pricing):
        return approx.composite_cost(self, node, io, pricing)

    def interval(self, node, args, w, ctx):
        """Probabilities lie in [0, 1]; inside, each step's values are bounded by construction
        (z <= 0 clipped at -16, powers of [-1, 1], exp in [0, 1], sums in [1, n], the seed and
        Newton's iterates of 1/s below 1): recorded as such, not by intervals of each step,
        which lose that z = x - max(x) <= 0."""
        x, records = args[0], ctx.backend.records
        n = int(x.shape[-1])
        width = float((x.hi.amax() - x.lo.amin()).clamp(min=0))
        row = torch.ones((*x.shape[:-1], 1), dtype=torch.float64)
        records.compare(2 * x.magnitude)  # the max tree's differences
        records.compare(torch.tensor(width + approx.EXP_CLIP))
        ones = torch.ones(x.shape, dtype=torch.float64)
        for _ in range(approx.EXP_DEGREE + approx.EXP_SQUARINGS):
            records.truncate(ones)
        records.compare(row * n)
        for _ in range(2 * approx.reciprocal_plan(1.0, float(n))[0]):
            records.truncate(2 * row)
        records.truncate(ones, truncation=truncation_of(node))
        err = approx.exp_error().error * n + approx.reciprocal_plan(1.0, float(n))[1].error
        return type(x)(torch.zeros_like(x.lo) - err, torch.ones_like(x.hi) + err)

    def error(self, node, args, w, ctx):
        """An input error moves a probability by at most half of it (the softmax's Jacobian); the
        methods' errors add (exp's, summed over the row, and the reciprocal's, relative); each of
        the fixed point's roundings is independent of the others: the variable's (through the
        polynomial's slope) and each term's (through its coefficient) are amplified by the
        squarings 2^k-fold, each squaring's by the ones after it, the last products' by 1."""
        x, backend = args[0], ctx.backend
        n = int(x.shape[-1])
        row_ms = x.ms.amax(dim=-1, keepdim=True).expand(x.ms.shape)
        method = approx.exp_error().error * n + approx.reciprocal_plan(1.0, float(n))[1].error
        slope = approx.EXP_CLIP / 2.0 / 2**approx.EXP_SQUARINGS  # of exp(z / 2^k) in the centred variable, at most
        amplified = float(2**approx.EXP_SQUARINGS) ** 2 * (slope * slope + float((approx._exp_coeffs()[1:] ** 2).sum()))
        squarings = sum(4.0**k for k in range(approx.EXP_SQUARINGS))
        fixed = (amplified + squarings + 4) * backend.truncation_ms
        return backend.value(torch.ones_like(x.peak), row_ms / 4 + method * method + fixed)


# -- ONNX import ----------------------------------------------------------------------------------


def _import_transpose(imp, node, a):
    perm = [int(p) for p in a.get("perm", [])]
    if not perm:
        raise GraphError(f"node '{node.name}' (Transpose) has no perm; export with explicit axes")
    imp.emit(node, "Transpose", [node.input[0]], [], {"perm": perm})


def _import_softmax(imp, node, a):
    imp.emit(node, "Softmax", [node.input[0]], [], {"axis": int(a.get("axis", -1))})


register(MatMul())
register(Transpose(), {"Transpose": _import_transpose})
register(Softmax(), {"Softmax": _import_softmax})
