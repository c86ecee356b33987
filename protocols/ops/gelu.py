"""GeLU, x Phi(x): ReLU(x) minus a small even correction (`approximations.gelu`).

Exporters write it as the ONNX Gelu op (opset 20) or, before, spelled out with Erf:
x * 0.5 * (1 + erf(x / sqrt 2)); `passes/onnx_patterns.py` finds that spelling and gives it here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir.graph import GraphError
from . import approximations as approx
from .registry import Op, check_comparison_bits, register

GELU_MIN = -0.17  # GeLU's least value, -0.1700 at x = -0.7518


class Gelu(Op):
    name = "Gelu"
    compares = True

    def check(self, node, graph) -> None:
        check_comparison_bits(node)

    def plain(self, node, args, w):
        return F.gelu(args[0])

    def secure(self, node, args, w, ctx):
        return approx.gelu(ctx, args[0], node.attrs.get("bits"))

    def cost(self, node, io, pricing):
        return approx.composite_cost(self, node, io, pricing)

    def module(self, node, w):
        return torch.nn.GELU()

    def interval(self, node, args, w, ctx):
        """GeLU of the endpoints (it is monotone above its minimum), the error either side; inside, the
        comparisons of x and |x| - 4, and the centred variable's powers in [-1, 1]."""
        x, records = args[0], ctx.backend.records
        records.compare(x.magnitude + approx.GELU_CLIP)
        ones = torch.ones_like(x.lo)
        for _ in range(approx.GELU_DEGREE + 1):
            records.truncate(ones)
        exact = lambda t: t * 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))  # noqa: E731
        err = approx.gelu_error().error
        lo = torch.where(x.hi < -0.7518, exact(x.hi), torch.where(x.lo > -0.7518, exact(x.lo), torch.full_like(x.lo, GELU_MIN)))
        return type(x)(lo - err, exact(x.hi).clamp(min=0) + err)

    def error(self, node, args, w, ctx):
        """GeLU's slope is at most 1.13: an input error passes on at most that much; the method's
        error adds, and the fixed point's roundings, independent: the centred variable's (through
        the correction's slope, below 1/2), each power's (weighed by its coefficient), the sum's."""
        x, backend = args[0], ctx.backend
        coeffs = approx._gelu_coeffs()
        method = approx.gelu_error().error
        ms = 1.13**2 * x.ms + method * method + (float((coeffs[1:] ** 2).sum()) + 1.25) * backend.truncation_ms
        return backend.value(x.peak, ms)


def _import_gelu(imp, node, a):
    if a.get("approximate", "none") not in ("none", b"none"):
        raise GraphError(f"node '{node.name}' (Gelu) uses approximate={a.get('approximate')!r}; export the erf form")
    imp.emit(node, "Gelu", [node.input[0]], [], {})


register(Gelu(), {"Gelu": _import_gelu})
