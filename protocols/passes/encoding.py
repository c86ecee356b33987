"""The session's fixed point, checked: fraction bits, a truncation per layer, and the stated error.

`check_encoding` holds a model's value ranges (protocols/passes/ranges.py) against what f
fractional bits handle (see that module's docstring for the limits), with the truncations that
`plan_truncations` chooses: the local (two-party) truncation is free but wrong, by a whole
2^(64-s) units, with probability |y| 2^-64 per value y (ring units); an exact one (the dealer's
keys) costs a round (none on fss where a ReLU reads the product) and is never wrong within its
width. By default (`--truncation auto`) the layers that carry the most risk are made exact until
what is left is below EXACT_BELOW per sample: exact where it pays. The stated error is a
simulation of the fixed point on the caller's own inputs where the caller holds model and
inputs (`twinfer infer`, the demo, `private_inference`), else the per-op estimate from the
ranges. `encoding_report` adds what a protocol's fixed point needs and, with `fraction_bits`
'auto', chooses f (`choose_fraction_bits`). `SessionEncoding` is what a server settles for a
session and tells its client.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends.base import FRACTION_BITS_RANGE, Truncation
from ..ops import op_for
from ..ops.registry import FULL_BITS, comparison_bits
from ..ir.graph import Graph, GraphError, Node, check_input_range
from .ranges import FRACTION_BITS, SOUND_SLACK, FAILURE_PROBABILITY, ValueRanges, error_estimate

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
    local truncation (the sum over the layers left local of |y| 2^-64, ring units); `error_bound`:
    the stated error of an output when none fails (`error_source`: 'simulation' of the fixed
    point on the caller's own inputs, or 'estimated', ERROR_SIGMAS x the estimated RMS error).
    `truncations`: the layers truncated exactly (the rest locally), with their widths.
    `suggested_bits`: the most fractional bits with which nothing would be refused, if f is
    refused; `chosen`: why f was chosen, where it was chosen (--fraction-bits auto).
    """

    fraction_bits: int
    source: str
    failure_probability: float
    error_bound: float
    output_peak: float
    findings: list[Finding]
    suggested_bits: int | None = None
    truncations: dict[str, Truncation] = field(default_factory=dict)
    truncation_layers: dict[str, str] = field(default_factory=dict)  # every layer that truncates -> 'local'
    error_source: str = "estimated"
    chosen: str = ""
    widths: dict[str, int] = field(default_factory=dict)  # comparisons narrowed from the ranges (narrow-comparison backends)

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
            text += f". With --fraction-bits {self.suggested_bits} these values fit (the last place is 2^-{self.suggested_bits})"
        elif findings and findings[0].refuse:
            text += ". No number of fractional bits holds these values: scale the input down (or declare a narrower --input-range)"
        return text

    def error_said(self) -> str:
        """Where the stated error comes from, in words."""
        return f"simulated on {self.source}" if self.error_source == "simulated" else f"estimated from {self.source}"

    def truncation_kinds(self) -> dict[str, str]:
        """Per layer that truncates: 'local', 'exact (n bits)' or 'exact, fused (n bits)' (fss: in its ReLU's round)."""
        return self.truncation_layers | {
            name: f"exact{', fused' if t.fused else ''} ({t.bits} bits)" for name, t in self.truncations.items()
        }



TRUNCATION_POLICIES = ("auto", "local", "exact")
# Where the local truncation's risk pays for exact ones (--truncation auto): the layers that
# carry the most of it are made exact until what is left is below this, per sample (an interval
# bound, which can be loose, SOUND_SLACK times this).
EXACT_BELOW = 1e-6
_WIDTH_HEADROOM = 2.0  # an exact truncation's width holds twice the largest value it is planned for


def _ring_width(value: float, frac: int) -> int:
    """The width n with |value| 2^frac x headroom < 2^(n - 1) ring units (2..64)."""
    ring = max(value * _WIDTH_HEADROOM, 2.0**-frac) * 2.0**frac
    return int(min(FULL_BITS, max(2, math.floor(math.log2(ring)) + 2)))


def local_failures(graph: Graph, ranges: ValueRanges, f: int) -> dict[str, float]:
    """Per layer that truncates, the probability that one of its local truncations fails, per sample."""
    out = {}
    for node in graph.nodes:
        if node.name in ranges.truncated or node.name in ranges.divided:
            out[node.name] = ranges.truncated_sum.get(node.name, 0.0) * 2.0 ** (2 * f - 64) + ranges.divided_sum.get(node.name, 0.0) * 2.0 ** (f - 64)
    return out


def _fusable(graph: Graph) -> dict[str, str]:
    """Layer -> the one reader that may take its exact truncation into its own round (a ReLU)."""
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    out = {}
    for node in graph.nodes:
        them = readers.get(node.output, [])
        if node.output != graph.output_name and len(them) == 1 and op_for(them[0]).takes_fused_truncation:
            out[node.name] = them[0].name
    return out


def plan_truncations(
    graph: Graph, ranges: ValueRanges, f: int, policy: str = "auto", *, fuses: bool = False, typical: ValueRanges | None = None
) -> dict[str, Truncation]:
    """The layers to truncate exactly at f fractional bits, with the width each needs.

    'local': none; 'exact': every layer that truncates; 'auto': the layers whose local
    truncations carry the most risk, until the risk left is below EXACT_BELOW per sample. Where
    the backend `fuses` and only a ReLU reads the layer, its exact truncation is left to that
    ReLU (no round of its own; the width then also holds what the ReLU compares). The risk is
    `typical`'s (what likely inputs do) where given, the widths always `ranges`' (all they must hold)."""
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy must be one of {', '.join(TRUNCATION_POLICIES)}, got {policy!r}")
    typical = typical or ranges
    risks = local_failures(graph, typical, f)
    if policy == "local":
        chosen: list[str] = []
    elif policy == "exact":
        chosen = list(risks)
    else:
        target = EXACT_BELOW * (SOUND_SLACK if typical.sound else 1.0)
        left, chosen = sum(risks.values()), []
        for name in sorted(risks, key=risks.get, reverse=True):
            if left <= target:
                break
            chosen.append(name)
            left -= risks[name]
    fusable = _fusable(graph) if fuses else {}
    plan = {}
    for name in chosen:
        bits = max(_ring_width(ranges.truncated.get(name, 0.0), 2 * f), _ring_width(ranges.divided.get(name, 0.0), f))
        fused = name in fusable and name in ranges.truncated and name not in ranges.divided
        if fused:
            bits = max(bits, _ring_width(ranges.compared.get(fusable[name], 0.0), 2 * f))
        plan[name] = Truncation("exact", bits, fused)
    return plan


def plan_widths(graph: Graph, ranges: ValueRanges, f: int) -> dict[str, int]:
    """A width for each comparison that has none yet (an artifact's stay): what holds twice the
    largest value `ranges` say it compares, at f fractional bits; the full ring where it compares
    against a padding constant. For backends that compare on a node's width (fss), the keys of a
    comparison shrink with it."""
    out = {}
    for node in graph.nodes:
        if node.name in ranges.compared and not node.attrs.get("bits"):
            out[node.name] = FULL_BITS if op_for(node).compares_with_padding(node) else _ring_width(ranges.compared[node.name], f)
    return out


def apply_plan(graph: Graph, truncations: dict[str, Truncation], widths: dict[str, int] | None = None) -> Graph:
    """A copy of `graph` whose layers carry their truncation (the `truncation` attribute) and their
    comparison width (`bits`), both public structure that travels to the client."""
    widths = widths or {}
    nodes = []
    for node in graph.nodes:
        attrs = {k: v for k, v in node.attrs.items() if k != "truncation"}
        if node.name in truncations:
            attrs["truncation"] = truncations[node.name].as_attr()
        if node.name in widths:
            attrs["bits"] = int(widths[node.name])
        nodes.append(Node(node.name, node.op, node.inputs, node.output, node.weights, attrs))
    return dataclasses.replace(graph, nodes=nodes)


def _findings(
    graph: Graph, ranges: ValueRanges, f: int, narrow_comparisons: bool, pool_pad_bits: int, max_failure: float,
    plan: dict[str, Truncation], typical: ValueRanges, widths: dict[str, int],
) -> tuple[list[Finding], float]:
    """The deterministic overflows, the exact truncations' widths and the local truncations'
    failure probability at f fractional bits."""
    findings: list[Finding] = []
    value_limit, product_limit = 2.0 ** (63 - f), 2.0 ** (63 - 2 * f)
    input_peak = float(ranges.peaks[graph.input_name].max())
    if input_peak >= value_limit:
        findings.append(Finding(graph.input_name, "input", f"input values reach {input_peak:.3g}; the encoding holds |x| < 2^{63 - f} = {value_limit:.3g}", True))
    risks = local_failures(graph, typical, f)
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
        exact = plan.get(node.name)
        if exact is not None:
            risks.pop(node.name, None)
            held = 2.0 ** (exact.bits - 1)
            reach = max(top * 2.0 ** (2 * f), ranges.divided.get(node.name, 0.0) * 2.0**f)
            if reach >= held:
                findings.append(
                    Finding(node.name, node.op, f"its exact truncation holds {exact.bits}-bit values, but they reach {reach:.3g} ring "
                            "units", True)
                )  # fmt: skip
        if node.name in ranges.compared and not _reads_fused(graph, node, plan):
            bits = widths.get(node.name, comparison_bits(node)) if narrow_comparisons else FULL_BITS
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
    probability = float(sum(risks.values()))
    refuse_above = max_failure * (SOUND_SLACK if typical.sound else 1.0)
    if probability > max_failure:
        worst = max(risks, key=risks.get)
        node = next(n for n in graph.nodes if n.name == worst)
        findings.append(
            Finding(
                node.name, node.op,
                f"products reach {max(typical.truncated.get(worst, 0.0), typical.divided.get(worst, 0.0)):.3g} before truncation; "
                f"the local two-party truncation of a value y fails (off by 2^{64 - f} units) with probability |y| 2^-64 (ring "
                f"units), which sums to {probability:.2g} per sample over the layers truncated locally "
                f"({risks[worst] / probability:.0%} from this layer), above the {max_failure:g} allowed: use --truncation auto "
                "or exact" + ("" if probability > refuse_above else " (by an interval bound, which can be loose: a warning)"),
                refuse=probability > refuse_above,
            )
        )  # fmt: skip
    return findings, probability


def _reads_fused(graph: Graph, node, plan: dict[str, Truncation]) -> bool:
    """A ReLU whose input's exact truncation is fused into it compares at the product's width (checked there)."""
    producer = next((n for n in graph.nodes if n.output == node.inputs[0]), None) if node.inputs else None
    return producer is not None and producer.name in plan and plan[producer.name].fused


PRECISION_REFUSED, PRECISION_WARNED = 0.1, 0.01  # stated error over the outputs' size


def _precision(graph: Graph, error: float, output_peak: float, f: int, source: str) -> Finding | None:
    """A refusal when the stated error exceeds 10% of the outputs' size, a warning above 1%."""
    out = next(n for n in graph.nodes if n.output == graph.output_name)
    size = max(output_peak, 1.0)
    said = f"outputs may be off by about {error:.3g} ({source}, at 2^-{f}), {error / size:.0%} of their size {output_peak:.3g}"
    if not math.isfinite(error) or error > PRECISION_REFUSED * size:
        return Finding(out.name, out.op, f"{said}: too coarse to be an answer", True)
    if error > PRECISION_WARNED * size:
        return Finding(out.name, out.op, f"{said}: use more fractional bits if the range allows", False)
    return None


ErrorFn = Callable[[int], float]


def check_encoding(
    graph: Graph,
    weights: dict[str, np.ndarray],
    ranges: ValueRanges,
    fraction_bits: int = FRACTION_BITS,
    *,
    narrow_comparisons: bool = False,
    pool_pad_bits: int = 62,
    max_failure: float = FAILURE_PROBABILITY,
    truncation: str = "local",
    fuses: bool = False,
    public_rounding: str = "nearest",
    error: ErrorFn | None = None,
    error_source: str = "estimated",
    typical: ValueRanges | None = None,
) -> EncodingReport:
    """Hold `ranges` against what f fractional bits handle, with the truncations `truncation`
    plans (plan_truncations); see the module docstring. `typical`: what likely inputs do (the
    local truncations' risk, the outputs' size), where `ranges` is a sound bound on all of them.

    Refused: a value the encoding cannot hold, a product that wraps, an exact truncation or a
    comparison too narrow, a padded max-pool input at the pad, a failure probability per sample
    of the local truncations above `max_failure` (from a sound interval bound, which can be
    loose: above SOUND_SLACK times that, a warning below), and outputs whose stated error
    exceeds 10% of their size. A warning: a stated error above 1% of it. `error(f)`: the stated
    error at f (a simulation's), else error_estimate's.
    """
    typical = typical or ranges
    error = error or (lambda bits: error_estimate(graph, weights, typical, bits, public_rounding))
    output_peak = float(typical.peaks[graph.output_name].max())

    def at(bits: int) -> tuple[list[Finding], float, dict[str, Truncation], float, Finding | None]:
        plan = plan_truncations(graph, ranges, bits, truncation, fuses=fuses, typical=typical)
        found, probability = _findings(graph, ranges, bits, narrow_comparisons, pool_pad_bits, max_failure, plan, typical, widths(bits))
        stated = error(bits)
        return found, probability, plan, stated, _precision(graph, stated, output_peak, bits, error_source)

    widths = (lambda bits: plan_widths(graph, ranges, bits)) if narrow_comparisons else (lambda bits: {})  # noqa: E731
    findings, probability, plan, stated, precision = at(fraction_bits)
    findings += [precision] if precision is not None else []
    suggested = None
    if any(x.refuse for x in findings):
        suggested = _suggest(fraction_bits, any(x.refuse for x in findings if x is not precision), at)
    layers = {name: "local" for name in local_failures(graph, ranges, fraction_bits)}
    source = ranges.source if typical is ranges else f"{typical.source}; {ranges.source}"
    return EncodingReport(
        fraction_bits, source, probability, stated, output_peak, findings, suggested, plan, layers, error_source,
        widths=widths(fraction_bits),
    )  # fmt: skip


def _suggest(f: int, range_refused: bool, at) -> int | None:
    """The nearest fractional bits with nothing refused: fewer when a range is refused, more for precision."""
    lo, hi = FRACTION_BITS_RANGE
    for bits in (range(f - 1, lo - 1, -1) if range_refused else range(f + 1, hi + 1)):
        found, _, _, _, precision = at(bits)
        if any(x.refuse for x in found):
            if range_refused:
                continue
            return None  # more bits only narrow the range further
        if precision is None or not precision.refuse:
            return bits
        if range_refused:
            return None  # fewer bits only lose more precision
    return None


AUTO = "auto"


def choose_fraction_bits(graph: Graph, ranges: ValueRanges, check: Callable[[int], EncodingReport], policy: str = "auto") -> EncodingReport:
    """--fraction-bits auto: the largest f up to the default (16) at which every value fits and
    the stated error is within 1% of the outputs' size, and, with --truncation auto, every
    truncation can stay local (their risk below EXACT_BELOW: the fixed point for free); failing
    that, the largest such f with exact truncations where they pay; above 16 where the outputs
    need finer bits. `check(f)` is the check at f (cached here: a simulation may be behind it)."""
    lo, hi = FRACTION_BITS_RANGE
    reports: dict[int, EncodingReport] = {}

    def at(bits: int) -> EncodingReport:
        if bits not in reports:
            reports[bits] = check(bits)
        return reports[bits]

    def descending(accept: Callable[[EncodingReport], bool]) -> EncodingReport | None:
        for bits in range(FRACTION_BITS, lo - 1, -1):
            report = at(bits)
            if accept(report):
                return report
            if report.findings and all(is_precision(x) for x in report.findings):
                return None  # only the precision fails: fewer bits are coarser still
        return None

    said = lambda r: f"a stated error of {r.error_bound:.3g}"  # noqa: E731
    if policy == "auto" and (free := descending(lambda r: not r.findings and not r.truncations)) is not None:
        free.chosen = (
            f"the default {FRACTION_BITS} holds every value with {said(free)}, every truncation local"
            if free.fraction_bits == FRACTION_BITS else
            f"the most that hold every value with every truncation local (16 bits would need exact ones) and {said(free)}"
        )  # fmt: skip
        return free
    if (clean := descending(lambda r: not r.findings)) is not None:
        exact = f", exact truncation in {len(clean.truncations)} layers" if clean.truncations else ""
        clean.chosen = f"the most that hold every value with {said(clean)} (within 1% of the outputs){exact}"
        return clean
    default = at(FRACTION_BITS)
    for bits in range(FRACTION_BITS + 1, hi + 1):  # the default is too coarse for these outputs: finer
        report = at(bits)
        if not report.findings:
            report.chosen = f"the default {FRACTION_BITS} states {default.error_bound:.3g}, above 1% of the outputs; {bits} states {report.error_bound:.3g}"
            return report
        if any(x.refuse and not is_precision(x) for x in report.findings):
            break
    for bits in range(FRACTION_BITS, lo - 1, -1):  # nothing is clean: the most bits refusing nothing, with its warnings
        if not at(bits).refused:
            at(bits).chosen = f"the most that refuse nothing ({at(bits).warnings[0].problem.split(':')[0]})"
            return at(bits)
    return default


def is_precision(finding: Finding) -> bool:
    """Whether a finding is the outputs' precision (more bits fix it), not a range (fewer bits do)."""
    return "outputs may be off by about" in finding.problem


def encoding_report(
    graph: Graph, weights: dict[str, np.ndarray], ranges: ValueRanges, fraction_bits: int | str, protocol: str, *,
    truncation: str = "auto", error: Callable[[int], float] | None = None, error_source: str = "estimated",
    typical: ValueRanges | None = None,
) -> EncodingReport:
    """check_encoding with what `protocol`'s fixed point needs (its comparisons, its max-pool pad,
    its public encoding, whether it fuses a truncation into a ReLU); `fraction_bits` 'auto' chooses."""
    from ..backends import backend_class  # the backends package imports ops and ir: bound here, not at import

    cls = backend_class(protocol)
    options = dict(
        narrow_comparisons=cls.narrow_comparisons, pool_pad_bits=cls.pool_pad_bits, truncation=truncation, fuses=cls.fuses_truncation,
        public_rounding=cls.public_rounding, error=error, error_source=error_source, typical=typical,
    )  # fmt: skip
    check = lambda bits: check_encoding(graph, weights, ranges, bits, **options)  # noqa: E731
    if fraction_bits == AUTO:
        return choose_fraction_bits(graph, ranges, check, truncation)
    return check(int(fraction_bits))


@dataclass(frozen=True)
class SessionEncoding:
    """What a server settles for a session and tells its client at the handshake (public model
    metadata): the fixed point, the inputs it holds, each layer's truncation and the error it
    states. The client refuses its own input outside `input_range` before sharing it."""

    fraction_bits: int
    input_range: tuple[float, float]
    stated_error: float
    error_source: str
    failure_probability: float
    truncation: dict[str, str]  # layer -> 'local' / 'exact (n bits)' / 'exact, fused (n bits)'
    chosen: str = ""  # why these fractional bits, where they were chosen
    plan: dict[str, dict] = field(default_factory=dict)  # layer -> its Truncation attribute (the graph carries it to the client)
    # (lo, hi, error): the error stated for inputs within narrower ranges than input_range: a client
    # states that of the narrowest holding its own input (which the server never sees)
    errors: tuple[tuple[float, float, float], ...] = ()
    widths: dict[str, int] = field(default_factory=dict)  # layer -> its comparison width (the graph carries it to the client)

    @classmethod
    def of(cls, report: EncodingReport, input_range: tuple[float, float]) -> "SessionEncoding":
        return cls(
            report.fraction_bits, tuple(input_range), report.error_bound, report.error_said(),
            report.failure_probability, report.truncation_kinds(), report.chosen,
            {name: t.as_attr() for name, t in report.truncations.items()}, widths=dict(report.widths),
        )  # fmt: skip

    def truncations(self) -> dict[str, Truncation]:
        return {name: Truncation.from_attr(attr) for name, attr in self.plan.items()}

    def for_inputs(self, inputs: np.ndarray) -> "SessionEncoding":
        """The encoding with the error stated for the narrowest of `errors`' ranges holding these inputs."""
        low, high = float(np.min(inputs)), float(np.max(inputs))
        for lo, hi, error in sorted(self.errors, key=lambda e: e[1] - e[0]):
            if lo <= low and high <= hi:
                return dataclasses.replace(self, stated_error=error, error_source=f"simulated on inputs drawn from [{lo:.3g}, {hi:.3g}]")
        return self

    def to_json(self) -> str:
        """The handshake's message (the plan travels in the graph's attributes)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("plan", "widths")}
        return json.dumps(fields | {"input_range": list(self.input_range), "errors": [list(e) for e in self.errors]})

    @classmethod
    def from_json(cls, text: str) -> "SessionEncoding":
        """The server's message, checked (it is the peer's): a GraphError naming what is wrong."""
        try:
            raw = json.loads(text)
            encoding = cls(
                int(raw["fraction_bits"]), check_input_range(raw["input_range"], "the encoding's input_range"),
                float(raw["stated_error"]), str(raw["error_source"]), float(raw["failure_probability"]),
                {str(k): str(v) for k, v in dict(raw["truncation"]).items()}, str(raw.get("chosen", "")),
                errors=tuple((float(lo), float(hi), float(error)) for lo, hi, error in raw.get("errors", [])),
            )  # fmt: skip
        except GraphError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise GraphError(f"malformed session encoding: {err}") from None
        lo, hi = FRACTION_BITS_RANGE
        bad_errors = any(not (lo < hi and error >= 0) for lo, hi, error in encoding.errors)
        if not lo <= encoding.fraction_bits <= hi or not (encoding.stated_error >= 0) or not (0 <= encoding.failure_probability <= 1) or bad_errors:
            raise GraphError(f"session encoding out of range: {raw}")
        return encoding

    def describe(self) -> str:
        """One line for a server's log at start: the fixed point, the inputs it holds, its stated error."""
        exact = sum(kind.startswith("exact") for kind in self.truncation.values())
        lo, hi = self.input_range
        return (
            f"{self.fraction_bits} fractional bits ({self.chosen or 'as configured'}); inputs held: [{lo:g}, {hi:g}]; "
            f"stated error {self.stated_error:.3g} ({self.error_source}); {exact} of {len(self.truncation)} layers truncate exactly"
        )

    def summary(self) -> dict[str, Any]:
        """The figures every run's summary and --json carry."""
        exact = sum(kind.startswith("exact") for kind in self.truncation.values())
        return {
            "fraction_bits": self.fraction_bits,
            "fraction_bits_chosen": self.chosen,
            "stated_error": self.stated_error,
            "stated_error_source": self.error_source,
            "truncation_failure_per_sample": self.failure_probability,
            "truncation": dict(self.truncation),
            "exact_truncations": exact,
            "input_range_held": list(self.input_range),
        }


SIMULATIONS = 2  # runs of the fixed-point simulation behind a stated error, with different roundings
SIMULATED_MARGIN = 2.0  # the stated error: this many times the largest error the simulations show
SIMULATED_SAMPLES = 1024  # inputs simulated at most (the first ones)


def simulated_error(
    graph: Graph, weights: dict[str, np.ndarray], inputs: np.ndarray, protocol: str, runs: int = SIMULATIONS,
    public: dict[str, np.ndarray] | None = None,
) -> Callable[[int], float]:
    """f -> the stated error of these inputs (`public`: their public values, else drawn) at f
    fractional bits: SIMULATED_MARGIN x the largest |output - plaintext| over SIMULATIONS runs of
    the fixed point (ranges.simulate: everything but the shares, whose randomness only draws each
    truncation's rounding), at least one last place."""
    import torch

    from ..backends import backend_class
    from .plain import run_plain
    from .ranges import public_samples, simulate

    cls = backend_class(protocol)
    x = inputs[:SIMULATED_SAMPLES]
    public = {k: v[:SIMULATED_SAMPLES] for k, v in public_samples(graph, len(inputs), public).items()}
    with torch.no_grad():
        reference = run_plain(
            graph, {k: torch.from_numpy(v).double() for k, v in weights.items()}, torch.from_numpy(np.ascontiguousarray(x)).double(),
            {k: torch.from_numpy(v).double() for k, v in public.items()},
        ).numpy()  # fmt: skip
    cache: dict[int, float] = {}

    def error(bits: int) -> float:
        if bits not in cache:
            worst = 0.0
            for seed in range(runs):
                run = simulate(
                    graph, weights, x, bits, public_rounding=cls.public_rounding, pool_pad_bits=cls.pool_pad_bits, seed=seed, public=public
                )
                diff = np.abs(run.outputs.astype(np.float64) - reference)
                worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else math.inf)
            cache[bits] = max(SIMULATED_MARGIN * worst, 2.0**-bits)
        return cache[bits]

    return error



ERROR_SCALES = tuple(2.0**-k for k in range(1, 9))  # the narrower ranges a server states an error for (SessionEncoding.errors)
SYNTHETIC_SAMPLES = 32  # uniform draws from a range, besides its two ends and its middle as constant inputs
SYNTHETIC_MARGIN = 2.0  # what such inputs do, times this: the typical ranges of a model without calibration


def narrower_ranges(input_range: tuple[float, float]) -> list[tuple[float, float]]:
    """The ranges a server states an error for besides the one it holds: ERROR_SCALES of it, and of
    its non-negative part where it straddles 0 (images, say)."""
    lo, hi = input_range
    out = [(lo * s, hi * s) for s in ERROR_SCALES]
    if lo < 0 < hi:
        out += [(0.0, hi * s) for s in (1.0, *ERROR_SCALES)]
    return out


def synthetic_inputs(graph: Graph, input_range: tuple[float, float], n: int = SYNTHETIC_SAMPLES, seed: int = 0) -> np.ndarray:
    """Inputs a server without samples can simulate: uniform in the range per element, and the
    range's two ends and middle as constant inputs (an embedding model: integer ids)."""
    from ..ops.embedding import embedding_node

    lo, hi = (float(v) for v in input_range)
    rng = np.random.default_rng(seed)
    shape = (n, *graph.input_shape)
    node = embedding_node(graph)
    if node is not None:
        first, last = max(0, math.ceil(lo)), min(int(node.attrs["rows"]) - 1, math.floor(hi))
        return rng.integers(first, max(first, last) + 1, shape).astype(np.float32)
    ends = np.stack([np.full(graph.input_shape, v, np.float32) for v in (lo, hi, (lo + hi) / 2)])
    return np.concatenate([rng.uniform(lo, hi, shape).astype(np.float32), ends])


def synthetic_ranges(
    graph: Graph, weights: dict[str, np.ndarray], input_range: tuple[float, float], n: int = SYNTHETIC_SAMPLES
) -> tuple[np.ndarray, ValueRanges]:
    """The synthetic inputs of a range and what they do, times SYNTHETIC_MARGIN: the typical ranges
    of a server that has no calibration samples."""
    from .ranges import observed_ranges

    inputs = synthetic_inputs(graph, input_range, n)
    lo, hi = input_range
    seen = observed_ranges(graph, weights, inputs, source=f"{len(inputs)} inputs drawn from [{lo:g}, {hi:g}]")
    seen.input_range = (lo, hi)
    return inputs, seen.scaled(SYNTHETIC_MARGIN)
