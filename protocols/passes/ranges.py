"""Value ranges in the plaintext graph: what the fixed-point encoding must hold, layer by layer.

Both backends encode a real x as round(x 2^f) in Z_2^64 (f fractional bits, a session
parameter) and share it additively. Going through a model, that encoding is exact up to
rounding only while:

- every value satisfies |x| < 2^(63-f) (the ring's signed range);
- a product (a Beaver conv/linear/scale/lookup, a square, a public factor) carries 2f
  fractional bits until it is truncated: |y| < 2^(63-2f), else it wraps around,
  deterministically wrong; a window sum an average pool divides carries f;
- a local (two-party) truncation of a value y is wrong, by 2^(64-s) ring units, with
  probability |y|_ring 2^-64: the chance that the two uniform shares' signed sum wraps; an
  exact truncation (the dealer's keys, `backends.base.Truncation`) is never wrong while
  |y|_ring < 2^(bits-1) for its width `bits`;
- a comparison on n bits (the fss backend's DCF) is exact while |v| < 2^(n-1-f);
- a padded max-pool's inputs stay above the pad, -2^(p-f) (p: the backend's pool_pad_bits).

The figures come from the ops' own secure evaluations, run on the analysis backends of
`protocols/numeric/` (so what an op truncates and compares is written once, in the op):
`observed_ranges` on float64 samples (per element, the largest |value| of every activation,
and per layer what its truncations and comparisons see), `interval_ranges` on intervals (a
sound bound for a declared input range; each op's `interval` method), `error_estimate` on
error moments (each op's `error` method), `simulate` on the fixed point itself. The check
of these ranges against a number of fractional bits is `encoding.py`'s. This module never
names an op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..backends.base import DEFAULT_FRACTION_BITS, SERVER_RANK
from ..numeric.base import AnalysisBackend
from ..numeric.error import ErrorBackend
from ..numeric.fixed_point import FixedPointBackend
from ..numeric.interval import IntervalBackend, IntervalValue
from ..numeric.plain import PlainBackend, PlainValue
from ..numeric.records import Records
from ..ops import SecureContext, op_for
from ..ops.embedding import encode_input
from ..ops.registry import FULL_BITS
from ..ir.graph import Graph, GraphError
from .plain import public_operands

FRACTION_BITS = DEFAULT_FRACTION_BITS  # both backends' default fixed-point encoding


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
        name: FULL_BITS if op_for(by_name[name]).compares_with_padding(by_name[name]) else width_for(peak, margin)
        for name, peak in compared.items()
    }  # fmt: skip


FAILURE_PROBABILITY = 1e-4  # most an inference of one sample may risk a failed local truncation (check_encoding)
SOUND_SLACK = 100.0  # an interval bound can be that loose: refused only above FAILURE_PROBABILITY x this, warned above it
FLOAT32_EPS = 2.0**-24  # logits are decoded to float32
_TABLES = ("truncated", "truncated_sum", "divided", "divided_sum", "compared", "floor")


@dataclass
class ValueRanges:
    """What one sample's values reach in each layer, observed (times a margin) or bounded.

    `peaks`: value name -> per-element bound on |value| (one sample's shape); `truncated`:
    node -> largest |value| any of its product truncations sees (2f fractional bits);
    `truncated_sum`: node -> per sample, the sum over its truncated elements of |value| (with
    observed samples: their mean); `divided`, `divided_sum`: the same for the window sums an
    average pool divides (f fractional bits); `compared`: comparison node -> largest |compared
    value|; `floor`: padded MaxPool node -> smallest input value, LayerNorm node -> smallest
    variance; `observed`: value name -> the
    samples' own per-element peaks (observed ranges only), which the error estimate uses: a
    margin is headroom for the range findings and leaves these alone.
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
    divided: dict[str, float] = field(default_factory=dict)
    divided_sum: dict[str, float] = field(default_factory=dict)

    def scaled(self, margin: float) -> ValueRanges:
        """Every magnitude times `margin` (>= 1): headroom over what calibration samples did."""
        if margin < 1:
            raise ValueError(f"the margin multiplies the observed range and must be at least 1, got {margin}")
        times = lambda table: {k: v * margin for k, v in table.items()}  # noqa: E731
        return ValueRanges(
            f"{self.source} x margin {margin:g}", self.input_range, times(self.peaks), times(self.truncated),
            times(self.truncated_sum), times(self.compared), {k: min(v * margin, v) for k, v in self.floor.items()}, self.sound,
            dict(self.observed), times(self.divided), times(self.divided_sum),
        )  # fmt: skip

    def layer_summary(self, graph: Graph) -> dict[str, dict[str, float]]:
        """Per node, as scalars (an artifact's manifest carries these): peak, truncated, truncated_sum,
        divided, divided_sum, compared, floor, and observed (the samples' own peak before a margin, per
        channel: a layer-wide peak for every element makes the error estimate far too pessimistic;
        `layer_peaks` has them per element)."""
        out = {}
        for node in graph.nodes:
            entry = {"peak": float(self.peaks[node.output].max()) if self.peaks[node.output].numel() else 0.0}
            observed = self.observed.get(node.output)
            for key in _TABLES:
                table = getattr(self, key)
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
        for key in _TABLES:
            if key in entry:
                getattr(ranges, key)[node.name] = float(entry[key])
    return ranges


def calibration_ranges(graph: Graph) -> ValueRanges:
    """The ValueRanges of an artifact's calibration (`graph.calibration`, set by
    artifact.apply_calibration: its summary and, where stored, its per-element peaks) for
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


# -- the passes: every op's secure evaluation (or range method) on an analysis backend ------------

Hook = Callable[[Any, Any], Any]


def _evaluate(
    graph: Graph, weights: dict[str, np.ndarray], x: Any, backend: AnalysisBackend, method: str, after: Hook, public: dict[str, Any] | None = None
) -> Any:
    """Every node's `method` ('secure', 'interval' or 'error') on `backend`, recording per node;
    `after(node, output)` sees (and may replace) each output; `public`: the public values the
    graph reads, as the method takes them. Returns the graph's output."""
    ctx = SecureContext(backend)
    shared = {k: backend.share(torch.from_numpy(np.ascontiguousarray(v)), SERVER_RANK, constant=k) for k, v in weights.items()}
    values: dict[str, Any] = {graph.input_name: x, **public_operands(graph, public)}
    last = {name: i for i, node in enumerate(graph.nodes) for name in node.inputs}
    with torch.no_grad():
        for i, node in enumerate(graph.nodes):
            backend.records.node = node.name
            out = getattr(op_for(node), method)(node, [values[n] for n in node.inputs], [shared[k] for k in node.weights], ctx)
            values[node.output] = after(node, out)
            for name in node.inputs:
                if last.get(name) == i and name != graph.output_name:
                    values.pop(name, None)
    return values[graph.output_name]


def public_samples(graph: Graph, n: int, public: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The public values for `n` samples: `public` if given, else those of random masks (the
    server's public program); none for a graph without public inputs."""
    if not graph.public or public is not None:
        return dict(public or {})
    if graph.public_program is None:
        raise GraphError("the graph reads public values, but its public program (the server's) is not at hand")
    program = graph.public_program
    return program.run(program.samples(n))


def _public_bounds(graph: Graph, make: Callable[[float, float, tuple[int, ...]], Any]) -> dict[str, Any]:
    return {name: make(spec.lo, spec.hi, (1, *spec.shape)) for name, spec in graph.public.items()}


class _Peaks:
    """Per value name, the largest |value| per element (one sample's shape), over batches."""

    def __init__(self) -> None:
        self.peaks: dict[str, torch.Tensor] = {}

    def add(self, name: str, magnitude: torch.Tensor) -> None:
        peak = magnitude.amax(dim=0).to(torch.float64) if len(magnitude) else torch.zeros(magnitude.shape[1:], dtype=torch.float64)
        self.peaks[name] = torch.maximum(self.peaks[name], peak) if name in self.peaks else peak


def _ranges(records: Records, peaks: dict[str, torch.Tensor], source: str, input_range, sound: bool) -> ValueRanges:
    t = records.tables()
    observed = {} if sound else dict(peaks)  # a bound's magnitudes are no samples'
    return ValueRanges(
        source, input_range, peaks, t["truncated"], t["truncated_sum"], t["compared"], t["floor"], sound, observed, t["divided"],
        t["divided_sum"],
    )  # fmt: skip


def observed_ranges(
    graph: Graph, weights: dict[str, np.ndarray], samples: np.ndarray, batch: int = 256, source: str | None = None,
    public: dict[str, np.ndarray] | None = None,
) -> ValueRanges:
    """What `samples` do in every layer (float64): per-element peaks, and per layer what its
    truncations see (their mean per sample) and what its comparisons compare; `public`: the
    public values of each sample (public_samples)."""
    if len(samples) == 0:
        raise ValueError("observed_ranges needs at least one sample")
    backend, track = PlainBackend(), _Peaks()
    public = public_samples(graph, len(samples), public)
    after = lambda node, out: (track.add(node.output, out.v.abs()), out)[1]  # noqa: E731
    for start in range(0, len(samples), batch):
        x = torch.from_numpy(np.ascontiguousarray(samples[start : start + batch], dtype=np.float32))
        track.add(graph.input_name, x.abs())
        backend.records.samples += len(x)
        operands = {k: torch.from_numpy(v[start : start + batch]).to(torch.float64) for k, v in public.items()}
        _evaluate(graph, weights, PlainValue(encode_input(graph, x).to(torch.float64)), backend, "secure", after, operands)
    lo, hi = float(np.min(samples)), float(np.max(samples))
    return _ranges(backend.records, track.peaks, source or f"{len(samples)} samples", (lo, hi), sound=False)


def interval_ranges(graph: Graph, weights: dict[str, np.ndarray], input_range: tuple[float, float]) -> ValueRanges:
    """A sound bound on every layer's values for any input in [lo, hi] (interval arithmetic, float64)."""
    lo_in, hi_in = (float(v) for v in input_range)
    shape = (1, *graph.input_shape)
    x = IntervalValue(torch.full(shape, lo_in, dtype=torch.float64), torch.full(shape, hi_in, dtype=torch.float64))
    backend, track = IntervalBackend(), _Peaks()
    backend.records.samples = 1
    track.add(graph.input_name, x.magnitude)
    after = lambda node, out: (track.add(node.output, out.magnitude), out)[1]  # noqa: E731
    bounds = _public_bounds(graph, lambda lo, hi, shape: IntervalValue(torch.full(shape, lo, dtype=torch.float64), torch.full(shape, hi, dtype=torch.float64)))
    _evaluate(graph, weights, x, backend, "interval", after, bounds)
    return _ranges(backend.records, track.peaks, f"interval bound for inputs in [{lo_in:g}, {hi_in:g}]", (lo_in, hi_in), sound=True)


ERROR_SIGMAS = 6.0  # the stated error of an estimate: this many times the estimated RMS error of an output


def error_estimate(graph: Graph, weights: dict[str, np.ndarray], ranges: ValueRanges, f: int, public_rounding: str = "nearest") -> float:
    """The stated error of the outputs when no truncation fails, from the ranges alone:
    ERROR_SIGMAS x their RMS error (numeric/error.py), with each element's magnitude the
    samples' own peak before any margin (a margin is headroom for the range findings, and a
    polynomial's slope at margin x its peak, compounded site after site, would state thousands
    of times what runs show), else its bound; decoding to float32 adds 2^-24 of the peak."""
    backend = ErrorBackend(f, public_rounding)
    backend.floor = ranges.floor  # what a LayerNorm's error depends on: how small its variance gets
    peak_of = lambda name: ranges.observed.get(name, ranges.peaks[name]).to(torch.float64).unsqueeze(0)  # noqa: E731
    x = backend.value(peak_of(graph.input_name), torch.full((1, *graph.input_shape), backend.input_ms, dtype=torch.float64))
    public = _public_bounds(
        graph, lambda lo, hi, shape: backend.value(torch.full(shape, max(abs(lo), abs(hi)), dtype=torch.float64), torch.full(shape, backend.input_ms, dtype=torch.float64))
    )
    out = _evaluate(graph, weights, x, backend, "error", lambda node, out: out._with(peak=peak_of(node.output)), public)
    final = ERROR_SIGMAS * out.ms.sqrt() + ranges.peaks[graph.output_name].to(torch.float64).unsqueeze(0) * FLOAT32_EPS
    return float(final.max())


@dataclass
class Simulation:
    """The fixed-point computation on actual inputs: its outputs (decoded as the client decodes)
    and what each layer truncated and compared (`records`; `records.overflow`: values beyond the ring)."""

    outputs: np.ndarray
    records: Records


def simulate(
    graph: Graph, weights: dict[str, np.ndarray], inputs: np.ndarray, fraction_bits: int, *,
    public_rounding: str = "nearest", pool_pad_bits: int = 62, seed: int = 0, batch: int = 256, public: dict[str, np.ndarray] | None = None,
) -> Simulation:
    """What the parties would compute on `inputs` at `fraction_bits` (numeric/fixed_point.py);
    `public`: each input's public values (public_samples)."""
    backend = FixedPointBackend(fraction_bits, public_rounding=public_rounding, pool_pad_bits=pool_pad_bits, seed=seed)
    public = public_samples(graph, len(inputs), public)
    outputs = []
    for start in range(0, len(inputs), batch):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start : start + batch], dtype=np.float32))
        backend.records.samples += len(x)
        value = backend.share(encode_input(graph, x), 1)
        operands = {k: torch.from_numpy(v[start : start + batch]) for k, v in public.items()}
        out = _evaluate(graph, weights, value, backend, "secure", lambda node, out: out, operands)
        outputs.append(backend.reveal(out, 1).numpy())
    return Simulation(np.concatenate(outputs), backend.records)
