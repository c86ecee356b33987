"""Smooth functions on shares, built from the backend's comparisons and products: what softmax,
LayerNorm and GeLU are made of, on every backend alike (research note transformers.md).

Each function runs on whatever backend the op was handed (the parties' or an analysis
backend), so what it compares and truncates is written once. Each states its error: the
largest error of the method itself over its domain, computed once in float64 by running the
same steps on a dense grid (`Approximation.error`), to which the fixed point adds its own.

- `row_max`: the maximum along the last axis, a tree of max(a, b) = b + ReLU(a - b).
- `exp_nonpositive`: exp(z) for z <= 0: z clipped at -EXP_CLIP (one comparison), then
  exp(z / 4) as a degree-8 polynomial on [-4, 0], then two squarings.
- `piecewise_linear`: a function interpolated between public knots from one comparison round
  over all knots (segment by segment, so that no product outgrows the function's values); the
  seed of the Newton iterations below.
- `reciprocal`, `rsqrt`: Newton's iterations from a piecewise-linear seed, the seed dense
  enough (up to 8 knots an octave, one more comparison each in its one round) that the fewest
  iterations reach a relative error below NEWTON_TARGET: one, for the domains used here.
- `gelu`: ReLU(x) - d(|x|) with d = ReLU - GeLU even and small (SIGMA's split): ReLU(x),
  ReLU(x - 4) and ReLU(-x - 4) in one comparison round give min(|x|, 4), then d as a degree-8
  polynomial in min(|x|, 4) / 2 - 1 (a centred variable keeps the coefficients below 1).

Polynomials take their powers in ceil(log2 degree) rounds: the powers 1..m known, the next m
are one product of stacked operands. Comparisons take the width `bits` the op's node carries
(the range check's, which holds twice what its interval method records it compares), the
full ring where it has none.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..numeric.priced import PricedBackend, shape_value
from .registry import LayerCost, SecureContext

EXP_CLIP = 16.0  # exp(-16) = 1.1e-7: below 2^-16, the finest a 16-bit fixed point holds
EXP_SQUARINGS = 2  # exp(z) = exp(z / 4)^4
EXP_DEGREE = 8
GELU_CLIP = 4.0  # d(4) = 1.3e-4, and d falls below 1.5e-6 by 5
GELU_DEGREE = 8
NEWTON_TARGET = 2.0**-18  # relative error of reciprocal and rsqrt, before the fixed point's (2^-16 at 16 bits)


# -- steps ------------------------------------------------------------------------------------------


def compare(ctx: SecureContext, x: Any, bits: int | None = None) -> Any:
    """ReLU of every element (one comparison each, counted) on `bits` bits (None: the full ring)."""
    ctx.count(x.nelement())
    return ctx.backend.relu(x, bits)


def compare_stacked(ctx: SecureContext, parts: list[Any], bits: int | None = None) -> list[Any]:
    """ReLU of several tensors of one shape in one comparison round (stacked along the batch)."""
    out = compare(ctx, ctx.backend.cat(parts, dim=0) if len(parts) > 1 else parts[0], bits)
    return _split(out, parts[0].shape[0], len(parts))


def _split(x: Any, rows: int, parts: int) -> list[Any]:
    return [x.index_select(0, torch.arange(i * rows, (i + 1) * rows)) for i in range(parts)]


def powers(ctx: SecureContext, t: Any, degree: int) -> list[Any]:
    """[t, t^2, ..., t^degree] in ceil(log2 degree) product rounds."""
    out = [t]
    if degree >= 2:
        out.append(ctx.backend.square(t))
    while len(out) < degree:
        m, rows = len(out), t.shape[0]
        k = min(m, degree - m)  # t^(m+1) .. t^(m+k) = t^m * t^(1..k)
        left = ctx.backend.cat([out[m - 1]] * k, dim=0) if k > 1 else out[m - 1]
        right = ctx.backend.cat(out[:k], dim=0) if k > 1 else out[0]
        out.extend(_split(ctx.backend.mul(left, right), rows, k))
    return out


def polynomial(ctx: SecureContext, t: Any, coeffs: np.ndarray) -> Any:
    """sum_k c_k t^k: the powers' rounds, then public factors (local)."""
    total = None
    for c, term in zip(coeffs[1:], powers(ctx, t, len(coeffs) - 1)):
        scaled = ctx.backend.scale(term, float(c))
        total = scaled if total is None else total + scaled
    return total + float(coeffs[0])


def weighted_sum(ctx: SecureContext, parts: list[Any], factors) -> Any:
    """sum_j factors_j parts_j for parts of one shape: stacked along the batch, times one public
    tensor of factors, summed back (one local product however many parts: for many small parts,
    such as a seed's segments, far fewer calls than a product each)."""
    rows = parts[0].shape[0]
    stacked = ctx.backend.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    column = torch.tensor([float(f) for f in factors], dtype=torch.float64).repeat_interleave(rows)
    scaled = ctx.backend.scale(stacked, column.reshape(-1, *([1] * (len(parts[0].shape) - 1))))
    return scaled.reshape(len(parts), *parts[0].shape).sum(0)


# -- the functions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Approximation:
    """A method's largest error over its domain (absolute, or relative where `relative`)."""

    error: float
    relative: bool = False


def row_max(ctx: SecureContext, x: Any, bits: int | None = None) -> Any:
    """max along the last axis (keeping it, of size 1): ceil(log2 n) comparison rounds."""
    n = x.shape[-1]
    while n > 1:
        half = n // 2
        even = torch.arange(0, 2 * half, 2)
        a, b = x.index_select(-1, even), x.index_select(-1, even + 1)
        top = b + compare(ctx, a - b, bits)
        x = ctx.backend.cat([top, x.index_select(-1, torch.tensor([n - 1]))], dim=-1) if n % 2 else top
        n = half + n % 2
    return x


@functools.lru_cache(maxsize=None)
def _exp_coeffs() -> np.ndarray:
    """exp(z / 2^EXP_SQUARINGS) for z in [-EXP_CLIP, 0] in powers of s = 2 z / EXP_CLIP + 1 (least
    squares at Chebyshev nodes)."""
    s = np.cos(np.linspace(0.0, np.pi, 2001))
    return np.polynomial.polynomial.polyfit(s, np.exp((s - 1.0) * EXP_CLIP / 2.0 / 2**EXP_SQUARINGS), EXP_DEGREE)


def exp_plain(z: np.ndarray) -> np.ndarray:
    """The method of `exp_nonpositive` in float64."""
    zc = np.maximum(z, -EXP_CLIP)
    y = np.polynomial.polynomial.polyval(2.0 * zc / EXP_CLIP + 1.0, _exp_coeffs())
    for _ in range(EXP_SQUARINGS):
        y = y * y
    return y


@functools.lru_cache(maxsize=None)
def exp_error() -> Approximation:
    z = np.linspace(-2 * EXP_CLIP, 0.0, 200001)
    return Approximation(float(np.abs(exp_plain(z) - np.exp(z)).max()))


def exp_nonpositive(ctx: SecureContext, z: Any, bits: int | None = None) -> Any:
    """exp(z) for z <= 0 (error `exp_error`): one comparison round, 3 + EXP_SQUARINGS product rounds."""
    clipped = compare(ctx, z + EXP_CLIP, bits) - EXP_CLIP  # max(z, -16)
    y = polynomial(ctx, ctx.backend.scale(clipped, 2.0 / EXP_CLIP) + 1.0, _exp_coeffs())
    for _ in range(EXP_SQUARINGS):
        y = ctx.backend.square(y)
    return y


def _knots(lo: float, hi: float, step: float) -> np.ndarray:
    """Geometric knots from lo to at least hi, `step` apart (a ratio)."""
    count = max(1, math.ceil(math.log(hi / lo) / math.log(step) - 1e-9))
    return lo * step ** np.arange(count + 1)


def _slopes(knots: np.ndarray, fn) -> tuple[float, np.ndarray]:
    """The interpolant's value at the first knot and its slope on each segment (the first also
    below the first knot; flat beyond the last)."""
    y = fn(knots)
    return float(y[0]), np.diff(y) / np.diff(knots)


def pl_plain(x: np.ndarray, knots: np.ndarray, fn) -> np.ndarray:
    y0, slopes = _slopes(knots, fn)
    clipped = np.clip(x, knots[0], knots[-1])
    out = y0 + slopes[0] * np.minimum(x - knots[0], 0.0)
    for j, s in enumerate(slopes):
        out = out + s * np.clip(clipped - knots[j], 0.0, knots[j + 1] - knots[j])
    return out


def piecewise_linear(ctx: SecureContext, x: Any, knots: np.ndarray, fn, bits: int | None = None) -> Any:
    """fn interpolated between `knots` (linear below the first, flat beyond the last) from one
    comparison round over len(knots) copies of x. Segment j adds its slope times
    ReLU(x - t_j) - ReLU(x - t_j+1), a difference exact in the ring and at most the segment's
    width: each product stays as small as the function's own steps, however wide the domain.
    The knots sit on the fixed point's grid, so that each segment's width is exact there, at
    least one unit apart (as many at every precision: the cost model's count is the session's)."""
    grid = float(1 << ctx.backend.fraction_bits)
    units = np.maximum(np.round(knots * grid), 1.0)
    for i in range(1, len(units)):
        units[i] = max(units[i], units[i - 1] + 1.0)
    knots = units / grid
    y0, slopes = _slopes(knots, fn)
    ramps = compare_stacked(ctx, [x - float(t) for t in knots], bits)
    parts = [x - float(knots[0]) - ramps[0]] + [ramps[j] - ramps[j + 1] for j in range(len(slopes))]  # min(x - t_0, 0), then each segment
    factors = [float(slopes[0])] + [float(v) for v in slopes]
    # A factor far below 1 keeps its significant bits if its part is halved m times first (a local
    # division) and the factor encoded as 2^m c: one division and one product per m, not per part.
    shifts = [max(0, math.floor(-math.log2(abs(c)))) if c else 0 for c in factors]
    total = None
    for shift in sorted(set(shifts)):
        group = [i for i, m in enumerate(shifts) if m == shift]
        stacked = [parts[i] for i in group]
        if shift:
            stacked = _split(ctx.backend.divide(ctx.backend.cat(stacked, dim=0), 1 << shift), rows=parts[0].shape[0], parts=len(group))
        term = weighted_sum(ctx, stacked, [factors[i] * (1 << shift) for i in group])
        total = term if total is None else total + term
    return total + y0


KNOTS_PER_OCTAVE = (2, 4, 8)  # the seeds' densities a plan chooses from


def _newton_plan(lo: float, hi: float, fn, update) -> tuple[int, Approximation, float]:
    """(Newton steps, the error they reach, the seed's knot ratio): the fewest steps that bring the
    relative error below NEWTON_TARGET over [lo, hi] (float64, as the parties compute it), then the
    fewest knots. A step is two or three rounds; a knot one comparison per element, in the seed's
    single round: denser seeds are cheaper."""
    x = np.geomspace(lo, hi, 20001)
    best = None
    for per in KNOTS_PER_OCTAVE:
        step = 2.0 ** (1.0 / per)
        y = pl_plain(x, _knots(lo, hi, step), fn)
        for steps in range(8):
            err = float(np.abs(y / fn(x) - 1.0).max())
            if err < NEWTON_TARGET:
                break
            y = update(x, y)
        else:
            continue
        if best is None or steps < best[0]:
            best = (steps, Approximation(err, relative=True), step)
    if best is None:
        raise ValueError(f"Newton's method does not reach {NEWTON_TARGET:g} on [{lo:g}, {hi:g}] in 8 steps")
    return best


def _inverse(x):
    return 1.0 / x


def _inverse_sqrt(x):
    return 1.0 / np.sqrt(x)


@functools.lru_cache(maxsize=None)
def reciprocal_plan(lo: float, hi: float) -> tuple[int, Approximation, float]:
    return _newton_plan(lo, hi, _inverse, lambda x, y: y * (2.0 - x * y))


def reciprocal(ctx: SecureContext, s: Any, lo: float, hi: float, bits: int | None = None) -> Any:
    """1 / s for s in [lo, hi] (lo > 0): a seed, then Newton's y (2 - s y), two rounds a step."""
    steps, _, step = reciprocal_plan(lo, hi)
    y = piecewise_linear(ctx, s, _knots(lo, hi, step), _inverse, bits)
    for _ in range(steps):
        y = ctx.backend.mul(y, -ctx.backend.mul(s, y) + 2.0)
    return y


@functools.lru_cache(maxsize=None)
def rsqrt_plan(lo: float, hi: float) -> tuple[int, Approximation, float]:
    return _newton_plan(lo, hi, _inverse_sqrt, lambda x, y: y * (1.5 - 0.5 * x * y * y))


def rsqrt(ctx: SecureContext, v: Any, lo: float, hi: float, bits: int | None = None) -> Any:
    """1 / sqrt(v) for v in [lo, hi]: a seed, then Newton's y (1.5 - v/2 y^2), three rounds a step."""
    steps, _, step = rsqrt_plan(lo, hi)
    y = piecewise_linear(ctx, v, _knots(lo, hi, step), _inverse_sqrt, bits)
    half = ctx.backend.scale(v, 0.5)
    for _ in range(steps):  # (v/2 y) y, not v/2 y^2: y^2 of a large variance would keep few bits
        y = ctx.backend.mul(y, -ctx.backend.mul(ctx.backend.mul(half, y), y) + 1.5)
    return y


def _gelu_gap(a: np.ndarray) -> np.ndarray:
    """d(a) = ReLU(a) - GeLU(a) = a Phi(-a) for a >= 0."""
    return a * 0.5 * (1.0 - np.vectorize(math.erf)(a / math.sqrt(2.0)))


@functools.lru_cache(maxsize=None)
def _gelu_coeffs() -> np.ndarray:
    """d(a) for a in [0, GELU_CLIP] in powers of s = 2a / GELU_CLIP - 1."""
    s = np.cos(np.linspace(0.0, np.pi, 2001))
    return np.polynomial.polynomial.polyfit(s, _gelu_gap((s + 1.0) * GELU_CLIP / 2.0), GELU_DEGREE)


def gelu_plain(x: np.ndarray) -> np.ndarray:
    """The method of `gelu` in float64."""
    a = np.minimum(np.abs(x), GELU_CLIP)
    return np.maximum(x, 0.0) - np.polynomial.polynomial.polyval(2.0 * a / GELU_CLIP - 1.0, _gelu_coeffs())


@functools.lru_cache(maxsize=None)
def gelu_error() -> Approximation:
    x = np.linspace(-3 * GELU_CLIP, 3 * GELU_CLIP, 120001)
    exact = x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return Approximation(float(np.abs(gelu_plain(x) - exact).max()))


def gelu(ctx: SecureContext, x: Any, bits: int | None = None) -> Any:
    """GeLU (error `gelu_error`): one comparison round (3 per element), ceil(log2 8) = 3 product rounds."""
    relu, above, below = compare_stacked(ctx, [x, x - GELU_CLIP, -x - GELU_CLIP], bits)
    clipped = relu + relu - x - above - below  # min(|x|, 4) = |x| - ReLU(|x| - 4)
    s = ctx.backend.scale(clipped, 2.0 / GELU_CLIP) - 1.0
    return relu - polynomial(ctx, s, _gelu_coeffs())


# -- what a composite op costs ------------------------------------------------------------------


def composite_cost(op: Any, node: Any, io: Any, pricing: Any) -> LayerCost:
    """The LayerCost of an op built from primitives: its secure evaluation run on shapes, each
    step priced by `pricing` (numeric/priced.py), its comparisons counted as the parties count them."""
    backend = PricedBackend(pricing)
    ctx = SecureContext(backend)
    args = [shape_value((io.batch, *shape)) for shape in io.input_shapes]
    weights = [backend.share(torch.empty(io.weight(k), device="meta"), 0, constant=k) for k in node.weights]
    op.secure(node, args, weights, ctx)
    total = backend.total
    return LayerCost(
        node.name, node.op, bytes_online=total.bytes_online, rounds=total.rounds, bytes_offline=total.bytes_offline,
        comparisons=ctx.counts["comparisons"],
    )  # fmt: skip
