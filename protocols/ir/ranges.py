"""Value ranges in the plaintext graph: what the fixed-point encoding must hold, layer by layer.

Both backends encode a real x as round(x 2^f) in Z_2^64 (f fractional bits, a session
parameter, 16 by default) and share it additively. Going through a model, that encoding is
exact up to rounding only while:

- every value satisfies |x| < 2^(63-f) (the ring's signed range);
- a product (a Beaver conv/linear/scale/lookup, a square, a public factor such as 1/k)
  carries 2f fractional bits until it is truncated: |y| < 2^(63-2f), else it wraps around,
  deterministically wrong;
- the two-party local truncation (SecureML; CrypTen's and fss's alike) of a product y is
  wrong, by 2^(64-2f) in real units, with probability |y| 2^(2f-64): the chance that the two
  uniform shares' signed sum wraps (else it is off by less than 2 units in the last place);
- a comparison on n bits (the fss backend's DCF) is exact while |v| < 2^(n-1-f)
  (`comparison_widths`: the narrowest width that holds margin x the calibration range);
- a padded max-pool's inputs stay above the pad, -2^(p-f) (p: the backend's pool_pad_bits).

`observed_ranges` runs samples through the plaintext graph and keeps, per element, the
largest |value| of every activation and what each layer truncates and compares;
`interval_ranges` bounds the same soundly from a declared input range (interval arithmetic:
center and radius through the affine layers, endpoints through the monotone ones).
`check_encoding` holds the ranges against the limits above for a given f, bounds the
probability that some truncation of one inference fails (the sum of the per-truncation
probabilities), and states the output's error when none fails (6 x its estimated RMS error);
its findings name the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends.base import DEFAULT_FRACTION_BITS, FRACTION_BITS_RANGE
from ..ops import op_for
from ..ops.activation import OP as MASKED_RELU
from ..ops.registry import FULL_BITS
from .graph import Graph, GraphError

FRACTION_BITS = DEFAULT_FRACTION_BITS  # both backends' default fixed-point encoding
COMPARISON_OPS = ("Relu", "MaskedRelu", "Clip", "MaxPool")


def _compared(node, x: torch.Tensor) -> float:
    """The largest |value| the node's comparisons see for input x."""
    peak = float(x.abs().max()) if x.numel() else 0.0
    if node.op == "Clip":
        bounds = [abs(b) for b in (node.attrs.get("min"), node.attrs.get("max")) if b is not None]
        return peak + max(bounds)
    if node.op == "MaxPool":
        return 2 * peak
    return peak


def comparison_ranges(graph: Graph, weights: dict[str, np.ndarray], samples: np.ndarray, batch: int = 256) -> dict[str, float]:
    """Per comparison node, the largest |compared value| over `samples` (real units)."""
    return observed_ranges(graph, weights, samples, batch=batch).compared


def width_for(peak: float, margin: float, fraction_bits: int = FRACTION_BITS) -> int:
    """The smallest width n with margin * peak < 2^(n - 1) ring units (at least 2, at most 64)."""
    ring = max(peak * margin, 2.0**-fraction_bits) * 2.0**fraction_bits
    return int(min(FULL_BITS, max(2, math.floor(math.log2(ring)) + 2)))


def comparison_widths(graph: Graph, weights: dict[str, np.ndarray], samples: np.ndarray, margin: float = 4.0) -> dict[str, int]:
    """Per comparison node, the width that holds margin x its calibration range. A padded
    max-pool compares against its padding value, so it keeps the full width."""
    return widths_from_ranges(graph, comparison_ranges(graph, weights, samples), margin)


def widths_from_ranges(graph: Graph, compared: dict[str, float], margin: float = 4.0) -> dict[str, int]:
    """comparison_widths from ranges already observed (ValueRanges.compared)."""
    if margin < 1:
        raise ValueError(f"the margin multiplies the observed range and must be at least 1, got {margin}")
    by_name = {n.name: n for n in graph.nodes}
    return {
        name: FULL_BITS if _is_padded_pool(by_name[name]) else width_for(peak, margin) for name, peak in compared.items()
    }


# -- value ranges of every layer ------------------------------------------------------------------

AFFINE_OPS = ("Conv", "Gemm", "Affine")  # linear in the activation, with the weights as entries; one truncation
MONOTONE_OPS = ("Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Add", "Concat")
AVERAGING_OPS = ("AveragePool", "GlobalAveragePool")  # times the public 1/k: one truncation
FAILURE_PROBABILITY = 1e-4  # most an inference of one sample may risk a failed truncation (check_encoding)
SOUND_SLACK = 100.0  # an interval bound can be that loose: refused only above FAILURE_PROBABILITY x this, warned above it
FLOAT32_EPS = 2.0**-24  # logits are decoded to float32


@dataclass
class ValueRanges:
    """What one sample's values reach in each layer, observed (times a margin) or bounded.

    `peaks`: value name -> per-element bound on |value| (one sample's shape); `truncated`:
    node -> largest |value| any of its truncations sees; `truncated_sum`: node -> per sample,
    the sum over its truncated elements of |value| (with observed samples: their mean);
    `compared`: comparison node -> largest |compared value|; `floor`: padded MaxPool node ->
    smallest input value; `observed`: value name -> the samples' own per-element peaks
    (observed ranges only), which the error estimate uses: a margin is headroom for the range
    findings and leaves these alone.
    """

    source: str
    input_range: tuple[float, float]
    peaks: dict[str, torch.Tensor]
    truncated: dict[str, float] = field(default_factory=dict)
    truncated_sum: dict[str, float] = field(default_factory=dict)
    compared: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)
    sound: bool = False  # a bound for every input in input_range (else: what samples did)
    observed: dict[str, torch.Tensor] = field(default_factory=dict)

    def scaled(self, margin: float) -> ValueRanges:
        """Every magnitude times `margin` (>= 1): headroom over what calibration samples did."""
        if margin < 1:
            raise ValueError(f"the margin multiplies the observed range and must be at least 1, got {margin}")
        return ValueRanges(
            f"{self.source} x margin {margin:g}", self.input_range, {k: v * margin for k, v in self.peaks.items()},
            {k: v * margin for k, v in self.truncated.items()}, {k: v * margin for k, v in self.truncated_sum.items()},
            {k: v * margin for k, v in self.compared.items()}, {k: min(v * margin, v) for k, v in self.floor.items()}, self.sound,
            dict(self.observed),
        )  # fmt: skip

    def layer_summary(self, graph: Graph) -> dict[str, dict[str, float]]:
        """Per node, as scalars (an artifact's manifest carries these): peak, truncated, truncated_sum, compared, floor,
        and observed (the samples' own peak before a margin, per channel: a layer-wide peak for every
        element makes the error estimate far too pessimistic; `layer_peaks` has them per element)."""
        out = {}
        for node in graph.nodes:
            entry = {"peak": float(self.peaks[node.output].max()) if self.peaks[node.output].numel() else 0.0}
            observed = self.observed.get(node.output)
            for key, table in (("truncated", self.truncated), ("truncated_sum", self.truncated_sum), ("compared", self.compared), ("floor", self.floor)):
                if node.name in table:
                    entry[key] = float(table[node.name])
            out[node.name] = {k: float(f"{v:.6g}") for k, v in entry.items()}
            if observed is not None and observed.numel():
                channels = observed.reshape(observed.shape[0], -1).amax(dim=1) if observed.dim() >= 2 else observed.reshape(1, -1).amax(dim=1)
                out[node.name]["observed"] = [float(f"{v:.6g}") for v in channels.tolist()]
        return out

    def layer_peaks(self, graph: Graph) -> dict[str, np.ndarray]:
        """Per node, the samples' own per-element peaks of its output (before a margin; one sample's
        shape, float32): what an artifact stores beside its summary for the error estimate."""
        observed = self.observed
        return {n.name: np.ascontiguousarray(observed[n.output].numpy(), dtype=np.float32) for n in graph.nodes if n.output in observed}


def ranges_from_summary(
    graph: Graph, summary: dict, input_range: tuple[float, float], source: str,
    element_peaks: dict[str, np.ndarray] | None = None,
) -> ValueRanges:
    """The ValueRanges of `layer_summary`'s scalars (each element bounded by its layer's peak; the
    input's observed peak, not summarised, is its declared range's). The error estimate's observed
    peaks: `element_peaks` (node -> `layer_peaks`' array) where given, else the summary's
    per-channel peaks, else (older artifacts) the layer peaks themselves."""
    peaks = {graph.input_name: torch.full(graph.input_shape, float(max(abs(input_range[0]), abs(input_range[1]))))}
    ranges = ValueRanges(source, input_range, peaks)
    for node in graph.nodes:
        entry = summary.get(node.name)
        if not isinstance(entry, dict) or not isinstance(entry.get("peak"), (int, float)):
            raise GraphError(f"the calibration ranges lack layer '{node.name}'")
        shape = tuple(node.attrs["out_shape"])
        peaks[node.output] = torch.full(shape, float(entry["peak"]))
        observed = _element_peaks(node.name, element_peaks, shape) if element_peaks is not None else _channel_peaks(entry.get("observed"), shape)
        if observed is not None:  # artifacts written before have none: the peaks stand in
            ranges.observed[node.output] = observed
        for key, table in (("truncated", ranges.truncated), ("truncated_sum", ranges.truncated_sum), ("compared", ranges.compared), ("floor", ranges.floor)):
            if key in entry:
                table[node.name] = float(entry[key])
    return ranges


def calibration_ranges(graph: Graph) -> ValueRanges:
    """The ValueRanges of an artifact's calibration (`graph.calibration`, set by
    artifact_format.apply_calibration: its summary and, where stored, its per-element peaks) for
    the graph's input range: the one way the server and the optimizer rebuild them."""
    if graph.calibration is None:
        raise GraphError("the model has no calibration ranges")
    c = graph.calibration
    return ranges_from_summary(graph, c["layers"], graph.input_range, c["source"], c.get("peaks"))


def _element_peaks(name: str, peaks: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
    """Layer `name`'s per-element peaks as float64; a GraphError naming it when absent or misshapen."""
    array = peaks.get(name)
    if array is None:
        raise GraphError(f"the per-element calibration peaks lack layer '{name}'")
    if tuple(array.shape) != shape:
        raise GraphError(f"the per-element calibration peaks of layer '{name}' have shape {tuple(array.shape)}, expected {shape}")
    return torch.from_numpy(np.asarray(array, dtype=np.float64).copy())


def _channel_peaks(values, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A summary's per-channel peaks spread over one sample's shape; None if absent or not per channel of it."""
    channels = shape[0] if len(shape) >= 2 else 1
    if not isinstance(values, list) or len(values) != channels or not all(isinstance(v, (int, float)) for v in values):
        return None
    peaks = torch.tensor(values, dtype=torch.float64)
    return peaks.reshape(channels, *([1] * (len(shape) - 1))).expand(shape).clone() if len(shape) >= 2 else peaks.expand(shape).clone()


def _is_padded_pool(node) -> bool:
    return node.op == "MaxPool" and any(node.attrs.get("padding", [0]))


def _poly_layout(node, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A masked ReLU's kept mask and per-element c0, c1, c2, flattened over one sample."""
    size = int(np.prod(shape))
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.tensor(node.attrs["keep"], dtype=torch.long)] = True
    c = torch.tensor(node.attrs["coeffs"], dtype=torch.float64).repeat_interleave(size // shape[0], dim=0)
    return mask, c[:, 0], c[:, 1], c[:, 2]


def _without_bias(w: list[torch.Tensor]) -> list[torch.Tensor]:
    return w[:1] + [torch.zeros_like(t) for t in w[1:]]


def _truncations(node, args: list[torch.Tensor], w: list[torch.Tensor], out: torch.Tensor) -> list[torch.Tensor]:
    """The values (batch first) that the node's secure evaluation truncates."""
    op = op_for(node)
    if node.op in AFFINE_OPS:
        return [op.plain(node, args, _without_bias(w))]  # the product; the bias is added after truncation
    if node.op == "Embedding" or node.op in AVERAGING_OPS:
        return [out]
    if node.op == MASKED_RELU:
        x = args[0].reshape(len(args[0]), -1).to(torch.float64)
        mask, _, c1, c2 = _poly_layout(node, tuple(node.attrs["out_shape"]))
        r, c2 = x[:, ~mask], c2[~mask]
        # z = sqrt(|c2|) x, its square |c2| x^2 (the sign goes in by an exact negation), c1 x
        return [c2.abs().sqrt() * r, c2.abs() * r * r, c1[~mask] * r]
    return []


class _Tracker:
    """Per-element peaks and per-layer truncation and comparison figures, over batches."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.peaks: dict[str, torch.Tensor] = {}
        self.truncated: dict[str, float] = {}
        self.truncated_total: dict[str, float] = {}
        self.compared: dict[str, float] = {}
        self.floor: dict[str, float] = {}

    def value(self, name: str, magnitude: torch.Tensor) -> None:
        """magnitude: |value| bounds, batch first."""
        peak = magnitude.amax(dim=0).to(torch.float64) if len(magnitude) else torch.zeros(magnitude.shape[1:], dtype=torch.float64)
        self.peaks[name] = torch.maximum(self.peaks[name], peak) if name in self.peaks else peak

    def layer(self, node, args_abs: list[torch.Tensor], truncated: list[torch.Tensor], args_low: torch.Tensor | None = None) -> None:
        if node.op in AFFINE_OPS or node.op in AVERAGING_OPS or node.op in ("Embedding", MASKED_RELU):
            top = max((float(t.abs().max()) for t in truncated if t.numel()), default=0.0)
            self.truncated[node.name] = max(self.truncated.get(node.name, 0.0), top)
            self.truncated_total[node.name] = self.truncated_total.get(node.name, 0.0) + sum(float(t.abs().sum()) for t in truncated)
        if node.op in COMPARISON_OPS:
            self.compared[node.name] = max(self.compared.get(node.name, 0.0), _compared(node, args_abs[0]))
        if _is_padded_pool(node) and args_low is not None and args_low.numel():
            self.floor[node.name] = min(self.floor.get(node.name, 0.0), float(args_low.min()))

    def result(self, source: str, input_range, per_sample: float, sound: bool) -> ValueRanges:
        sums = {k: v / per_sample for k, v in self.truncated_total.items()}
        observed = {} if sound else dict(self.peaks)  # a bound's magnitudes are no samples'
        return ValueRanges(source, input_range, self.peaks, self.truncated, sums, self.compared, self.floor, sound, observed)


def observed_ranges(graph: Graph, weights: dict[str, np.ndarray], samples: np.ndarray, batch: int = 256, source: str | None = None) -> ValueRanges:
    """What `samples` do in every layer (plaintext, float32): per-element peaks, and per layer what
    its truncations see (their mean per sample) and what its comparisons compare."""
    if len(samples) == 0:
        raise ValueError("observed_ranges needs at least one sample")
    tw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    track = _Tracker(graph)
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            x = torch.from_numpy(np.ascontiguousarray(samples[start : start + batch], dtype=np.float32))
            values = {graph.input_name: x}
            track.value(graph.input_name, x.abs())
            for node in graph.nodes:
                args = [values[i] for i in node.inputs]
                w = [tw[k] for k in node.weights]
                out = op_for(node).plain(node, args, w)
                track.layer(node, [a.abs() for a in args], _truncations(node, args, w, out), args[0])
                values[node.output] = out
                track.value(node.output, out.abs())
    lo, hi = float(np.min(samples)), float(np.max(samples))
    return track.result(source or f"{len(samples)} samples", (lo, hi), float(len(samples)), sound=False)


def _poly_interval(lo: torch.Tensor, hi: torch.Tensor, c0, c1, c2) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of c0 + c1 x + c2 x^2 over [lo, hi], elementwise: the endpoints and, inside, the vertex."""
    p = lambda x: c0 + c1 * x + c2 * x * x  # noqa: E731
    candidates = [p(lo), p(hi)]
    vertex = torch.where(c2 != 0, -c1 / (2 * torch.where(c2 != 0, c2, torch.ones_like(c2))), lo)
    inside = (vertex > lo) & (vertex < hi)
    candidates.append(torch.where(inside, p(vertex), candidates[0]))
    stack = torch.stack(candidates)
    return stack.amin(dim=0), stack.amax(dim=0)


def interval_ranges(graph: Graph, weights: dict[str, np.ndarray], input_range: tuple[float, float]) -> ValueRanges:
    """A sound bound on every layer's values for any input in [lo, hi] (interval arithmetic, float64)."""
    lo_in, hi_in = (float(v) for v in input_range)
    tw = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.float64) for k, v in weights.items()}
    low = {graph.input_name: torch.full((1, *graph.input_shape), lo_in, dtype=torch.float64)}
    high = {graph.input_name: torch.full((1, *graph.input_shape), hi_in, dtype=torch.float64)}
    track = _Tracker(graph)
    track.value(graph.input_name, torch.maximum(low[graph.input_name].abs(), high[graph.input_name].abs()))
    with torch.no_grad():
        for node in graph.nodes:
            op = op_for(node)
            w = [tw[k] for k in node.weights]
            lows, highs = [low[i] for i in node.inputs], [high[i] for i in node.inputs]
            if node.op in AFFINE_OPS:
                center, radius = (lows[0] + highs[0]) / 2, (highs[0] - lows[0]) / 2
                absw = [t.abs() for t in w]
                spread = op.plain(node, [radius], absw) - op.plain(node, [torch.zeros_like(radius)], absw)
                middle = op.plain(node, [center], w)
                y_lo, y_hi = middle - spread, middle + spread
                product = op.plain(node, [center], _without_bias(w))
                truncated = [product.abs() + spread]
            elif node.op in MONOTONE_OPS:
                y_lo, y_hi = op.plain(node, lows, w), op.plain(node, highs, w)
                truncated = [torch.maximum(y_lo.abs(), y_hi.abs())] if node.op in AVERAGING_OPS else []
            elif node.op == MASKED_RELU:
                shape = lows[0].shape
                mask, c0, c1, c2 = _poly_layout(node, tuple(shape[1:]))
                a, b = lows[0].reshape(1, -1), highs[0].reshape(1, -1)
                p_lo, p_hi = _poly_interval(a, b, c0, c1, c2)
                y_lo = torch.where(mask, a.clamp(min=0), p_lo).reshape(shape)
                y_hi = torch.where(mask, b.clamp(min=0), p_hi).reshape(shape)
                m, k2 = torch.maximum(a.abs(), b.abs())[:, ~mask], c2[~mask].abs()
                truncated = [k2.sqrt() * m, k2 * m * m, c1[~mask].abs() * m]  # as _truncations: z, z^2, c1 x
            elif node.op == "Embedding":
                table = w[0]
                out_shape = (1, *node.attrs["out_shape"])
                y_lo, y_hi = table.amin(dim=0).expand(out_shape), table.amax(dim=0).expand(out_shape)
                truncated = [torch.maximum(y_lo.abs(), y_hi.abs())]
            else:
                raise GraphError(f"no interval bound for node '{node.name}' (op {node.op})")
            magnitude = [torch.maximum(l.abs(), h.abs()) for l, h in zip(lows, highs)]
            track.layer(node, magnitude, truncated, lows[0])
            low[node.output], high[node.output] = y_lo, y_hi
            track.value(node.output, torch.maximum(y_lo.abs(), y_hi.abs()))
    return track.result(f"interval bound for inputs in [{lo_in:g}, {hi_in:g}]", (lo_in, hi_in), 1.0, sound=True)


# -- the check ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One layer that leaves what the encoding handles; `refuse`: the run must not start."""

    node: str
    op: str
    problem: str
    refuse: bool


@dataclass
class EncodingReport:
    """What check_encoding found for one model, its ranges and a number of fractional bits.

    `failure_probability`: a bound on the probability that one sample's inference has a failed
    truncation (the sum over every truncation of |y| 2^(2f-64)); `error_bound`: the stated
    error of an output when none fails, ERROR_SIGMAS x its estimated RMS error (from the
    encoding of inputs and weights, each truncation's last place, and float32 decoding).
    `suggested_bits`: the most fractional bits with which nothing would be refused, if f is refused.
    """

    fraction_bits: int
    source: str
    failure_probability: float
    error_bound: float
    output_peak: float
    findings: list[Finding]
    suggested_bits: int | None = None

    @property
    def refused(self) -> list[Finding]:
        return [f for f in self.findings if f.refuse]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.refuse]

    def message(self, findings: list[Finding] | None = None) -> str:
        """The findings in words, each naming its layer, with what to change."""
        findings = self.refused if findings is None else findings
        f = self.fraction_bits
        lines = [f"layer '{x.node}' ({x.op}): {x.problem}" for x in findings[:3]]
        more = f"; and {len(findings) - 3} more" if len(findings) > 3 else ""
        text = f"with {f} fractional bits ({self.source}): " + "; ".join(lines) + more
        if self.suggested_bits is not None and self.suggested_bits != f:
            text += (
                f". With --fraction-bits {self.suggested_bits} these values fit (coarser: the last place is "
                f"2^-{self.suggested_bits}); or scale the input down"
            )
        elif findings and findings[0].refuse:
            text += ". No number of fractional bits holds these values: scale the input down"
        return text


def _limits_text(f: int) -> str:
    return f"values must stay below 2^{63 - f} = {2.0 ** (63 - f):.3g} and products below 2^{63 - 2 * f} = {2.0 ** (63 - 2 * f):.3g}"


def _findings(
    graph: Graph, ranges: ValueRanges, f: int, narrow_comparisons: bool, pool_pad_bits: int, max_failure: float
) -> tuple[list[Finding], float]:
    """The deterministic overflows and the truncation failure probability at f fractional bits."""
    findings: list[Finding] = []
    value_limit, product_limit = 2.0 ** (63 - f), 2.0 ** (63 - 2 * f)
    input_peak = float(ranges.peaks[graph.input_name].max())
    if input_peak >= value_limit:
        findings.append(Finding(graph.input_name, "input", f"input values reach {input_peak:.3g}; the encoding holds |x| < 2^{63 - f} = {value_limit:.3g}", True))
    per_element = 2.0 ** (2 * f - 64)
    contributions: dict[str, float] = {}
    for node in graph.nodes:
        peak = float(ranges.peaks[node.output].max()) if ranges.peaks[node.output].numel() else 0.0
        if peak >= value_limit:
            findings.append(Finding(node.name, node.op, f"values reach {peak:.3g}; the encoding holds |x| < 2^{63 - f} = {value_limit:.3g}", True))
        top = ranges.truncated.get(node.name, 0.0)
        if top >= product_limit:
            findings.append(
                Finding(node.name, node.op, f"a product reaches {top:.3g} before truncation; with 2x{f} fractional bits it wraps "
                        f"around beyond 2^{63 - 2 * f} = {product_limit:.3g} (wrong every time)", True)
            )  # fmt: skip
        contributions[node.name] = ranges.truncated_sum.get(node.name, 0.0) * per_element
        if node.name in ranges.compared:
            bits = int(node.attrs.get("bits") or FULL_BITS) if narrow_comparisons else FULL_BITS
            limit = 2.0 ** (bits - 1 - f)
            if ranges.compared[node.name] >= limit:
                findings.append(
                    Finding(node.name, node.op, f"compares values up to {ranges.compared[node.name]:.3g}; a comparison on {bits} bits is "
                            f"exact only below 2^{bits - 1 - f} = {limit:.3g}", True)
                )  # fmt: skip
        if node.name in ranges.floor and ranges.floor[node.name] <= -(2.0 ** (pool_pad_bits - f)):
            findings.append(
                Finding(node.name, node.op, f"inputs reach {ranges.floor[node.name]:.3g}, at or below the padding value "
                        f"-2^{pool_pad_bits - f} this backend pads max-pool windows with", True)
            )  # fmt: skip
    probability = float(sum(contributions.values()))
    refuse_above = max_failure * (SOUND_SLACK if ranges.sound else 1.0)
    if probability > max_failure:
        worst = sorted(contributions, key=contributions.get, reverse=True)
        node = next(n for n in graph.nodes if n.name == worst[0])
        share = contributions[worst[0]] / probability
        findings.append(
            Finding(
                node.name, node.op,
                f"products reach {ranges.truncated.get(node.name, 0.0):.3g} before truncation; the two-party truncation of a "
                f"value y fails (off by 2^{64 - 2 * f}) with probability |y| 2^{2 * f - 64}, which sums to {probability:.2g} "
                f"per sample over the model ({share:.0%} from this layer), above the {max_failure:g} allowed"
                + ("" if probability > refuse_above else " (by an interval bound, which can be loose: a warning)"),
                refuse=probability > refuse_above,
            )
        )  # fmt: skip
    return findings, probability


ERROR_SIGMAS = 6.0  # the stated error: this many times the estimated RMS error of an output


def _error_estimate(graph: Graph, weights: dict[str, np.ndarray], ranges: ValueRanges, f: int) -> float:
    """The stated error of the outputs when no truncation fails: ERROR_SIGMAS x their RMS error.

    Second moments of the errors, per element (float64), with u = 2^-f: encoding an input or a
    weight rounds it to the nearest multiple of u (both backends: mean square u^2/12, E); a
    truncation errs by less than u per share (mean square at most 2u^2/3, T). Affine:
    m' = W^2 m + E sum_fanin(|x| + e)^2 + E (bias) + T, the errors of distinct inputs taken as
    independent; ReLU, Clip: m' <= m; max-pool: the window's sum; shapes: moved; Add and
    averaging: RMS errors add (Minkowski, whatever their correlation); polynomial, evaluated as
    sign(c2) z^2 + c1 x + c0 with z = s x, s = sqrt(|c2|) encoded (E): z errs by s e_x +
    e_s |x| + t_z, mean square m_z = |c2| m + E |x|^2 + T, and z^2 by 2|z| that plus its
    square, so (|c1| + 2|c2||x|)^2 m (x's error through both terms) + m_z^2 + E (1 + |x|^2 +
    4|c2||x|^4) (c0, c1, s) + T (4|c2||x|^2 + 2) (z through 2|z|, z^2, c1 x; the negation
    is exact); lookup: E + T.
    |x| is each element's peak over the samples where the ranges were observed, before any
    margin (a polynomial's slope at margin x its peak compounds site after site into estimates
    thousands of times what runs show), else its bound: the error of inputs like the samples.
    Decoding to float32 adds 2^-24 of the output's peak. An estimate, not a worst case: the
    worst case (every error of a sum of one sign) is far looser, never seen.
    """
    u2 = 2.0 ** (-2 * f)
    enc, trunc = u2 / 12, 2 * u2 / 3
    tw = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.float64) for k, v in weights.items()}
    ms = {graph.input_name: torch.full((1, *graph.input_shape), enc, dtype=torch.float64)}
    peak = {k: ranges.observed.get(k, v).to(torch.float64).unsqueeze(0) for k, v in ranges.peaks.items()}
    with torch.no_grad():
        for node in graph.nodes:
            op = op_for(node)
            w = [tw[k] for k in node.weights]
            m = [ms[i] for i in node.inputs]
            p = [peak[i] for i in node.inputs]
            if node.op in AFFINE_OPS:
                sq = [t * t for t in w]
                ones = [torch.ones_like(w[0])] + [torch.zeros_like(t) for t in w[1:]]
                zero = torch.zeros_like(m[0])
                carried = op.plain(node, [m[0]], sq) - op.plain(node, [zero], sq)
                fanin = op.plain(node, [(p[0] + m[0].sqrt()) ** 2], ones) - op.plain(node, [zero], ones)
                out = carried + enc * fanin + enc * (len(w) > 1) + trunc
            elif node.op in ("Relu", "Clip"):
                out = m[0]
            elif node.op == "MaxPool":
                k = float(np.prod(node.attrs["kernel"]))
                out = k * op.plain(node, m, w)
            elif node.op in ("Flatten", "Reshape", "Concat"):
                out = op.plain(node, m, w)
            elif node.op == "Add":
                out = (m[0].sqrt() + m[1].sqrt()) ** 2 if len(m) > 1 else (m[0].sqrt() + enc**0.5) ** 2
            elif node.op in AVERAGING_OPS:
                k = float(np.prod(node.attrs["kernel"])) if node.op == "AveragePool" else float(np.prod(m[0].shape[2:]))
                window = op.plain(node, [p[0] + m[0].sqrt()], w) * k  # the window's sum of |x|
                out = op.plain(node, [m[0].sqrt()], w) ** 2 + enc * window**2 + trunc
            elif node.op == MASKED_RELU:
                shape = m[0].shape
                mask, _, c1, c2 = _poly_layout(node, tuple(shape[1:]))
                x, d = p[0].reshape(1, -1), m[0].reshape(1, -1)
                xe = x + d.sqrt()
                k2 = c2.abs()
                mz = k2 * d + enc * xe**2 + trunc  # z = s x: s's encoding, x's error, z's truncation
                poly = (c1.abs() + 2 * k2 * x) ** 2 * d + mz * mz + enc * (1 + xe**2 + 4 * k2 * xe**4) + trunc * (4 * k2 * xe**2 + 2)
                out = torch.where(mask, d, poly).reshape(shape)
            elif node.op == "Embedding":
                out = torch.full((1, *node.attrs["out_shape"]), enc + trunc, dtype=torch.float64)
            else:
                raise GraphError(f"no error estimate for node '{node.name}' (op {node.op})")
            ms[node.output] = out
    final = ERROR_SIGMAS * ms[graph.output_name].sqrt() + ranges.peaks[graph.output_name].to(torch.float64).unsqueeze(0) * FLOAT32_EPS
    return float(final.max())


PRECISION_REFUSED, PRECISION_WARNED = 0.1, 0.01  # stated error over the outputs' size


def _precision(graph: Graph, error: float, output_peak: float, f: int) -> Finding | None:
    """A refusal when the stated error exceeds 10% of the outputs' size, a warning above 1%."""
    out = next(n for n in graph.nodes if n.output == graph.output_name)
    size = max(output_peak, 1.0)
    said = f"outputs may be off by about {error:.3g} (from 2^-{f} per input, weight and truncation), {error / size:.0%} of their size {output_peak:.3g}"
    if error > PRECISION_REFUSED * size:
        return Finding(out.name, out.op, f"{said}: too coarse to be an answer", True)
    if error > PRECISION_WARNED * size:
        return Finding(out.name, out.op, f"{said}: use more fractional bits if the range allows", False)
    return None


def check_encoding(
    graph: Graph,
    weights: dict[str, np.ndarray],
    ranges: ValueRanges,
    fraction_bits: int = FRACTION_BITS,
    *,
    narrow_comparisons: bool = False,
    pool_pad_bits: int = 62,
    max_failure: float = FAILURE_PROBABILITY,
) -> EncodingReport:
    """Hold `ranges` against what f fractional bits handle; see the module docstring.

    Refused: a value the encoding cannot hold, a product that wraps, a comparison too narrow, a
    padded max-pool input at the pad, a failure probability per sample above `max_failure`
    (from a sound interval bound, which can be loose: above SOUND_SLACK times that, a warning
    below), and outputs whose stated error exceeds 10% of their size. A warning: a stated error
    above 1% of it.
    """
    args = (narrow_comparisons, pool_pad_bits, max_failure)
    output_peak = float(ranges.peaks[graph.output_name].max())
    findings, probability = _findings(graph, ranges, fraction_bits, *args)
    error = _error_estimate(graph, weights, ranges, fraction_bits)
    precision = _precision(graph, error, output_peak, fraction_bits)
    findings += [precision] if precision is not None else []
    suggested = None
    if any(x.refuse for x in findings):
        range_refused = any(x.refuse for x in findings if x is not precision)
        lo, hi = FRACTION_BITS_RANGE
        candidates = range(fraction_bits - 1, lo - 1, -1) if range_refused else range(fraction_bits + 1, hi + 1)
        for bits in candidates:
            if any(x.refuse for x in _findings(graph, ranges, bits, *args)[0]):
                if range_refused:
                    continue
                break  # more bits only narrow the range further
            at = _precision(graph, _error_estimate(graph, weights, ranges, bits), output_peak, bits)
            if at is None or not at.refuse:
                suggested = bits
                break
            if range_refused:
                break  # fewer bits only lose more precision
    return EncodingReport(fraction_bits, ranges.source, probability, error, output_peak, findings, suggested)



def encoding_report(graph: Graph, weights: dict[str, np.ndarray], ranges: ValueRanges, fraction_bits: int, protocol: str) -> EncodingReport:
    """check_encoding with what `protocol`'s fixed point needs (its comparisons, its max-pool pad)."""
    from ..backends import backend_class  # the backends package imports ops and ir: bound here, not at import

    cls = backend_class(protocol)
    return check_encoding(
        graph, weights, ranges, fraction_bits, narrow_comparisons=cls.narrow_comparisons, pool_pad_bits=cls.pool_pad_bits
    )