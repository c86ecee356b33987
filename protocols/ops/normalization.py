"""LayerNorm, ReduceMean and ReduceSum: normalisation over the last axis, means and sums (pooling).

LayerNorm (research note transformers.md, 4): the mean is local (a sum, divided by the
public count); the variance one square; 1 / sqrt(variance + eps) by `approximations.rsqrt`
over the variance range the node declares (`variance_range`: the method's error is stated
there; a variance below it is normalised less finely, never wrongly signed); then one product
with it and one with the server's secret scale (gamma), plus its secret shift (beta).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..ir.graph import GraphError, Node
from . import approximations as approx
from .registry import LayerCost, Op, check_comparison_bits, register, truncation_of

VARIANCE_RANGE = (2.0**-12, 2.0**14)  # where LayerNorm's rsqrt is accurate (attribute variance_range)


def _variance_range(node: Node) -> tuple[float, float]:
    lo, hi = node.attrs.get("variance_range", VARIANCE_RANGE)
    return float(lo), float(hi)


class LayerNorm(Op):
    name = "LayerNorm"
    compares = True

    def check(self, node: Node, graph) -> None:
        check_comparison_bits(node)
        eps, vr = node.attrs.get("epsilon"), node.attrs.get("variance_range", VARIANCE_RANGE)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
            raise GraphError(f"node '{node.name}' (LayerNorm) needs an epsilon in [0, 1), got {eps!r}")
        if (
            not isinstance(vr, (list, tuple)) or len(vr) != 2 or not all(isinstance(v, (int, float)) for v in vr)
            or not 0 < vr[0] < vr[1] <= 2.0**30
        ):  # fmt: skip
            raise GraphError(f"node '{node.name}' (LayerNorm) needs a variance_range [lo, hi] with 0 < lo < hi <= 2^30, got {vr!r}")
        if len(node.inputs) != 1 or len(node.weights) != 2:
            raise GraphError(f"node '{node.name}' (LayerNorm) reads one activation and two weights (scale, shift)")

    def plain(self, node, args, w):
        return F.layer_norm(args[0], (args[0].shape[-1],), w[0], w[1], float(node.attrs["epsilon"]))

    def secure(self, node, args, w, ctx):
        x, backend = args[0], ctx.backend
        n = int(x.shape[-1])
        centred = x - backend.divide(x.sum(-1, keepdim=True), n)
        variance = backend.divide(backend.square(centred).sum(-1, keepdim=True), n) + float(node.attrs["epsilon"])
        backend.note_least(variance)  # the range check's: how small the variance gets sets the error
        normed = backend.mul(centred, approx.rsqrt(ctx, variance, *_variance_range(node), node.attrs.get("bits")))
        return backend.mul(normed, w[0], truncation_of(node)) + w[1]

    def cost(self, node, io, pricing):
        return approx.composite_cost(self, node, io, pricing)

    @staticmethod
    def _bound(n: int, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """|output| per element: |x - mean| / sigma is at most sqrt(n - 1), times the rsqrt's seed
        margin (a variance below the range is normalised by its floor's seed), times |gamma|, plus |beta|."""
        return (1.5 * math.sqrt(n) * gamma + beta).to(torch.float64)

    def interval(self, node, args, w, ctx):
        """[-bound, bound] (`_bound`); inside, the centred values, their squares and sums, the
        seed's comparisons and Newton's iterates as each step bounds them."""
        x, records = args[0], ctx.backend.records
        n = int(x.shape[-1])
        lo, hi = _variance_range(node)
        centred = torch.maximum(x.hi.amax(-1, keepdim=True) - x.lo, x.hi - x.lo.amin(-1, keepdim=True)).expand(x.shape)
        square = centred * centred
        variance = square.amax(-1, keepdim=True)
        records.truncate(x.magnitude.sum(-1, keepdim=True), multiple=1)
        records.truncate(square)
        records.truncate(square.sum(-1, keepdim=True), multiple=1)
        records.compare(variance + hi)
        records.least(lo)  # no interval bounds a variance away from 0: the error is stated for the declared range's floor
        seed = torch.full_like(variance, 1.5 / math.sqrt(lo))
        for _ in range(approx.rsqrt_plan(lo, hi)[0]):
            records.truncate(seed * seed)
            records.truncate(torch.full_like(variance, 2.0))
            records.truncate(1.5 * seed)
        records.truncate(centred * seed)
        records.truncate(torch.full_like(x.lo, 1.5 * math.sqrt(n)) * w[0].magnitude, truncation=truncation_of(node))
        bound = self._bound(n, w[0].magnitude, w[1].magnitude).expand(x.shape)
        return type(x)(-bound, bound)

    def error(self, node, args, w, ctx):
        """An input error moves (x - mean) / sigma by itself over sigma: sigma at least the square root
        of the smallest variance the ranges saw (the declared range's floor where they bound none);
        the rsqrt errs relatively (its method), the normalised values reaching sqrt(n); its iterate
        1 / sigma is rounded to the fixed point's unit (three roundings), which each centred value
        (at most twice the element's peak) multiplies; gamma multiplies all of it."""
        x, backend = args[0], ctx.backend
        n = int(x.shape[-1])
        lo, hi = _variance_range(node)
        floor = max(float(backend.floor.get(node.name, lo)), 2.0 ** -(2 * backend.fraction_bits))
        row_ms = x.ms.amax(dim=-1, keepdim=True)
        relative = approx.rsqrt_plan(lo, hi)[1].error
        gamma2 = w[0].peak * w[0].peak
        normed_ms = row_ms / floor + relative * relative * n + 36 * x.peak * x.peak * backend.truncation_ms + 2 * backend.truncation_ms
        return backend.value(self._bound(n, w[0].peak, w[1].peak).expand(x.peak.shape), gamma2 * normed_ms + w[0].ms * n + w[1].ms + backend.truncation_ms)


class ReduceMean(Op):
    """The mean over axes after the batch's (mean pooling): a local sum, one division."""

    name = "ReduceMean"

    def check(self, node: Node, graph) -> None:
        axes = node.attrs.get("axes")
        if not isinstance(axes, list) or not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            raise GraphError(f"node '{node.name}' ({node.op}) reduces over axes after the batch's, got axes {axes!r}")

    def _axes(self, node: Node, rank: int) -> list[int]:
        axes = sorted({a % rank for a in node.attrs["axes"] if -rank <= a < rank})
        if len(axes) != len(node.attrs["axes"]) or 0 in axes:
            raise GraphError(f"node '{node.name}' ({node.op}) reduces over axes after the batch's of {rank}, got {node.attrs['axes']}")
        return axes

    def plain(self, node, args, w):
        return args[0].mean(dim=self._axes(node, args[0].dim()), keepdim=bool(node.attrs.get("keepdims", 1)))

    def secure(self, node, args, w, ctx):
        x = args[0]
        count = 1
        for axis in reversed(self._axes(node, len(x.shape))):
            count *= int(x.shape[axis])
            x = x.sum(axis, keepdim=bool(node.attrs.get("keepdims", 1)))
        return ctx.backend.divide(x, count, truncation_of(node))

    def cost(self, node, io, pricing):
        step = pricing.truncation(io.batch * io.out(node), truncation_of(node))
        return LayerCost(node.name, node.op, bytes_online=step.bytes_online, rounds=step.rounds, bytes_offline=step.bytes_offline)


class ReduceSum(ReduceMean):
    """The sum over axes after the batch's (a masked mean's numerator): local."""

    name = "ReduceSum"

    def plain(self, node, args, w):
        return args[0].sum(dim=self._axes(node, args[0].dim()), keepdim=bool(node.attrs.get("keepdims", 1)))

    def secure(self, node, args, w, ctx):
        x = args[0]
        for axis in reversed(self._axes(node, len(x.shape))):
            x = x.sum(axis, keepdim=bool(node.attrs.get("keepdims", 1)))
        return x

    def cost(self, node, io, pricing):
        return Op.cost(self, node, io, pricing)


# -- ONNX import ----------------------------------------------------------------------------------


def _import_layer_norm(imp, node, a):
    if int(a.get("axis", -1)) != -1 or len(node.input) < 2:
        raise GraphError(f"node '{node.name}' (LayerNormalization) normalises the last axis only, got axis {a.get('axis')}")
    if len(node.output) > 1 and any(node.output[1:]):
        raise GraphError(f"node '{node.name}' (LayerNormalization) exports its mean or variance; only the output is supported")
    scale = imp.init.get(node.input[1])
    shift = imp.init.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    if scale is None or shift is None:
        raise GraphError(f"node '{node.name}' (LayerNormalization) needs a constant scale and shift")
    weights = [imp.weight(node, node.input[1], "scale"), imp.weight(node, "", "shift", shift)]
    imp.emit(node, "LayerNorm", [node.input[0]], weights, {"epsilon": float(a.get("epsilon", 1e-5))})


def _import_reduce(imp, node, a):
    axes = a.get("axes")
    if axes is None and len(node.input) > 1:  # opset 13 (ReduceSum) and 18: axes as an input
        axes = imp.ints.get(node.input[1])
    if axes is None:
        raise GraphError(f"node '{node.name}' ({node.op_type}) needs explicit axes")
    imp.emit(node, node.op_type, [node.input[0]], [], {"axes": [int(v) for v in axes], "keepdims": int(a.get("keepdims", 1))})


register(LayerNorm(), {"LayerNormalization": _import_layer_norm})
register(ReduceMean(), {"ReduceMean": _import_reduce})
register(ReduceSum(), {"ReduceSum": _import_reduce})
