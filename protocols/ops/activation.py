"""Activations: ReLU, masked ReLU (a ReLU kept only where a public mask says so), Clip.

Masked activation, per site, with a public binary mask `m` over one sample's activation and
public per-channel coefficients (c0, c1, c2):

    out = m * relu(x) + (1 - m) * (c0 + c1 * x + c2 * x^2)

An all-zero mask is a pure polynomial activation (MOFHEI's conversion); an all-one mask is a
plain ReLU. The mask and coefficients are public model structure (DESIGN.md invariants), so
they travel in the graph's attributes, not with the secret weights.

Secure evaluation of a masked site (AutoReP's gather, which its public code leaves out):
1. gather the kept positions (a local index_select on shares) and run the backend's ReLU on
   that smaller tensor only: these are the only elements that pay for a secure comparison;
2. gather the other positions and evaluate the polynomial as sign(c2) (s x)^2 + c1 x + c0
   with s = sqrt(|c2|): z = s x and c1 x (public factors, local but for their one truncation
   call), one Beaver square of z, an exact local negation where c2 < 0, then c0 (local). With
   an exact truncation (the layer's `truncation` attribute) the products' truncation costs a
   round before the square's and one after it. A local truncation fails with a
   probability proportional to the value truncated, so squaring s x truncates |c2| x^2
   where squaring x would truncate x^2 (1/|c2| times as much: 12x at c2 = 0.08) and then
   c2 x^2 again; c2 = 0 gives z = 0 and an exact 0. The square and the ReLU are
   independent, so a backend that can opens both in one round (fss does);
3. concatenate and scatter both parts back with the inverse permutation (local).

Clip(x, lo, hi) with public bounds (ReLU6 is Clip(0, 6)) is lo + relu(x - lo) - relu(x - hi):
both ReLUs in one call of the backend on the stacked differences, so one comparison's rounds
for two comparisons per element. With one bound only: lo + relu(x - lo), or x - relu(x - hi).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..backends.base import Truncation
from ..ir.graph import Graph, GraphError, Node
from .registry import CostInputs, LayerCost, Op, SecureContext, check_comparison_bits, comparison_bits, register, truncation_of

OP = "MaskedRelu"


@dataclass(frozen=True)
class ActivationSite:
    """What an optimizer learned for one ReLU node: where to keep it and the substitute."""

    mask: np.ndarray  # bool, one sample's activation shape
    coeffs: np.ndarray  # (C, 3) or (1, 3): c0, c1, c2 per channel (dim 0 of `mask`)

    @property
    def kept(self) -> int:
        return int(np.count_nonzero(self.mask))


def check_site(node: Node, site: ActivationSite) -> None:
    """The site must fit the ReLU it replaces: same activation shape, one row per channel."""
    if node.op != "Relu":
        raise GraphError(f"activation site '{node.name}' is a {node.op} node, not a Relu")
    shape = tuple(node.attrs.get("out_shape", ()))
    if tuple(site.mask.shape) != shape:
        raise GraphError(f"mask for '{node.name}' has shape {tuple(site.mask.shape)}, but the layer's activation is {shape}")
    channels = shape[0] if shape else 1
    if site.coeffs.ndim != 2 or site.coeffs.shape[1] != 3 or site.coeffs.shape[0] not in (1, channels):
        raise GraphError(
            f"coefficients for '{node.name}' have shape {tuple(site.coeffs.shape)}; expected ({channels}, 3) or (1, 3)"
        )
    if not np.isfinite(site.coeffs).all():
        raise GraphError(f"coefficients for '{node.name}' contain NaN or infinite values")


def apply_sites(graph: Graph, sites: dict[str, ActivationSite]) -> Graph:
    """A copy of `graph` whose named Relu nodes become masked activations."""
    by_name = {n.name: n for n in graph.nodes}
    unknown = sorted(set(sites) - set(by_name))
    if unknown:
        raise GraphError(f"activation sites name nodes the model does not have: {unknown}")
    nodes = []
    for node in graph.nodes:
        site = sites.get(node.name)
        if site is None:
            nodes.append(node)
            continue
        check_site(node, site)
        flat = site.mask.reshape(-1).astype(bool)
        coeffs = np.broadcast_to(site.coeffs, (site.mask.shape[0] if site.mask.ndim else 1, 3))
        attrs = {
            "out_shape": list(node.attrs["out_shape"]),
            "keep": np.flatnonzero(flat).astype(int).tolist(),
            "coeffs": coeffs.astype(float).tolist(),
            "elements": int(flat.sum()),
        }
        nodes.append(Node(name=node.name, op=OP, inputs=node.inputs, output=node.output, attrs=attrs))
    return replace(graph, nodes=nodes, weight_shapes=dict(graph.weight_shapes))


def check_attrs(node: Node) -> None:
    """Validate a masked-activation node received as JSON (e.g. by the client)."""
    try:
        shape = [int(d) for d in node.attrs["out_shape"]]
        keep = [int(i) for i in node.attrs["keep"]]
        coeffs = np.asarray(node.attrs["coeffs"], dtype=np.float64)
        elements = int(node.attrs["elements"])
    except (KeyError, TypeError, ValueError) as err:
        raise GraphError(f"masked activation '{node.name}' has malformed attributes: {err}") from None
    size = int(np.prod(shape)) if shape else 1
    if any(i < 0 or i >= size for i in keep) or len(set(keep)) != len(keep) or keep != sorted(keep):
        raise GraphError(f"masked activation '{node.name}': kept positions must be distinct, sorted, within {size}")
    if elements != len(keep):
        raise GraphError(f"masked activation '{node.name}' says {elements} ReLUs but keeps {len(keep)} positions")
    if coeffs.shape != ((shape[0] if shape else 1), 3) or not np.isfinite(coeffs).all():
        raise GraphError(f"masked activation '{node.name}': coefficients must be finite, shape ({shape[0]}, 3)")


def _layout(node: Node) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept indices, the other indices, per-element coefficients of the others, inverse permutation."""
    shape = node.attrs["out_shape"]
    size = int(np.prod(shape))
    keep = torch.tensor(node.attrs["keep"], dtype=torch.long)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[keep] = True
    rest = torch.nonzero(~mask).reshape(-1)
    per_channel = size // shape[0]
    coeffs = torch.tensor(node.attrs["coeffs"], dtype=torch.float32)[rest // per_channel]  # (len(rest), 3)
    inverse = torch.argsort(torch.cat([keep, rest]))
    return keep, rest, coeffs, inverse


def plain_masked_relu(x: torch.Tensor, node: Node) -> torch.Tensor:
    """Plaintext reference: m * relu(x) + (1 - m) * p(x), per channel."""
    shape = node.attrs["out_shape"]
    flat = x.reshape(x.shape[0], -1)
    mask = torch.zeros(flat.shape[1], dtype=torch.bool)
    mask[torch.tensor(node.attrs["keep"], dtype=torch.long)] = True
    c = torch.tensor(node.attrs["coeffs"], dtype=x.dtype).repeat_interleave(flat.shape[1] // shape[0], dim=0)
    poly = c[:, 0] + c[:, 1] * flat + c[:, 2] * flat * flat
    return torch.where(mask, torch.relu(flat), poly).reshape(x.shape)


def _terms(x, coeffs: torch.Tensor, backend, truncation):
    """z = sqrt(|c2|) x and c1 x per element (public factors), in one truncation: what the
    polynomial squares and what it adds."""
    n = coeffs.shape[0]
    both = backend.scale(backend.cat([x, x], dim=1), torch.cat([coeffs[:, 2].abs().sqrt(), coeffs[:, 1]]), truncation)
    return both.index_select(1, torch.arange(n)), both.index_select(1, torch.arange(n, 2 * n))


def _polynomial(square, linear, coeffs: torch.Tensor, backend):
    """c0 + c1 x + c2 x^2 per channel from square = |c2| x^2 and linear = c1 x (local).

    sign(c2) goes in by negation, which is exact on shares, not as an encoded -1 factor,
    which would truncate |c2| x^2 once more."""
    negative = coeffs[:, 2] < 0
    if bool(negative.all()):
        signed = -square
    elif bool(negative.any()):
        n = len(negative)
        signed = backend.cat([square, -square], dim=1).index_select(1, torch.arange(n) + n * negative.long())
    else:
        signed = square
    return signed + linear + coeffs[:, 0]


def fused_truncation(graph: Graph, node: Node) -> Truncation | None:
    """The exact truncation of the product a ReLU reads, where it is fused into that ReLU's round."""
    producer = next((n for n in graph.nodes if n.output == node.inputs[0]), None)
    truncation = truncation_of(producer) if producer is not None else None
    return truncation if truncation is not None and truncation.fused else None


def _relu(x, ctx: SecureContext, node: Node, relu_layer: bool = True):
    """The backend's ReLU at the node's comparison width, counting the elements compared."""
    n = int(x.nelement())
    ctx.count(comparisons=n, relu=n if relu_layer else 0)
    return ctx.backend.relu(x, comparison_bits(node))


def _poly_interval(lo: torch.Tensor, hi: torch.Tensor, c0, c1, c2) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of c0 + c1 x + c2 x^2 over [lo, hi], elementwise: the endpoints and, inside, the vertex."""
    p = lambda x: c0 + c1 * x + c2 * x * x  # noqa: E731
    candidates = [p(lo), p(hi)]
    vertex = torch.where(c2 != 0, -c1 / (2 * torch.where(c2 != 0, c2, torch.ones_like(c2))), lo)
    inside = (vertex > lo) & (vertex < hi)
    candidates.append(torch.where(inside, p(vertex), candidates[0]))
    stack = torch.stack(candidates)
    return stack.amin(dim=0), stack.amax(dim=0)


class Relu(Op):
    name = "Relu"
    channelwise = True
    compares = True
    takes_fused_truncation = True
    commutes_with_max = True

    def plain(self, node, args, w):
        return torch.relu(args[0])

    def check(self, node, graph):
        check_comparison_bits(node)

    def secure(self, node, args, w, ctx):
        return _relu(args[0], ctx, node)

    def cost(self, node, io: CostInputs, pricing) -> LayerCost:
        n = io.batch * io.out(node)
        fused = fused_truncation(io.graph, node)
        step = pricing.relu(n, comparison_bits(node), fused) if fused is not None else pricing.relu(n, comparison_bits(node))
        return LayerCost(
            node.name, node.op, secure_mults=n, bytes_online=step.bytes_online, rounds=step.rounds, relu_count=n, comparisons=n,
            bytes_offline=step.bytes_offline,
        )

    def module(self, node, w):
        return nn.ReLU()

    def annotate(self, node, out):
        node.attrs["elements"] = int(out[0].numel())

    def pruned_attrs(self, node: Node, attrs: dict, have: int, full: int) -> dict:
        return attrs | {"elements": int(np.prod(attrs["out_shape"]))}


class MaskedRelu(Op):
    name = OP
    channelwise = True
    compares = True

    def check(self, node, graph):
        check_attrs(node)
        check_comparison_bits(node)

    def plain(self, node, args, w):
        return plain_masked_relu(args[0], node)

    def secure(self, node, args, w, ctx):
        x = args[0]
        backend, truncation = ctx.backend, truncation_of(node)
        keep, rest, coeffs, inverse = _layout(node)
        flat = x.reshape(x.shape[0], -1)
        if len(keep) and len(rest):  # independent: a backend may open both in one round
            kept, r = flat.index_select(1, keep), flat.index_select(1, rest)
            ctx.count(comparisons=kept.nelement(), relu=kept.nelement())
            z, linear = _terms(r, coeffs, backend, truncation)
            relu, square = backend.relu_and_square(kept, z, comparison_bits(node), truncation)
            joined = backend.cat([relu, _polynomial(square, linear, coeffs, backend)], dim=1)
        elif len(keep):
            joined = _relu(flat.index_select(1, keep), ctx, node)
        else:
            z, linear = _terms(flat.index_select(1, rest), coeffs, backend, truncation)
            joined = _polynomial(backend.square(z, truncation), linear, coeffs, backend)
        return joined.index_select(1, inverse).reshape(x.shape)

    def interval(self, node, args, w, ctx):
        """The secure structure's bound (z^2 and c1 x bounded apart), tightened by the polynomial's exact range."""
        out = self.secure(node, args, w, ctx)
        x = args[0]
        keep, rest, coeffs, _ = _layout(node)
        lo, hi = x.lo.reshape(x.lo.shape[0], -1), x.hi.reshape(x.hi.shape[0], -1)
        c = coeffs.to(torch.float64)
        tight_lo, tight_hi = lo.clamp(min=0), hi.clamp(min=0)
        p_lo, p_hi = _poly_interval(lo[:, rest], hi[:, rest], c[:, 0], c[:, 1], c[:, 2])
        tight_lo[:, rest], tight_hi[:, rest] = p_lo, p_hi
        return out.intersect(tight_lo.reshape(x.lo.shape), tight_hi.reshape(x.hi.shape))

    def cost(self, node, io, pricing):
        out = io.out(node)
        kept = int(node.attrs["elements"])
        relu, poly = io.batch * kept, io.batch * (out - kept)
        truncation = truncation_of(node)
        # exact: z = s x and c1 x truncated in one round before that of the ReLUs and squares, z^2 after it
        step = pricing.truncation(2 * poly, truncation) + pricing.relu_and_square(relu, poly, comparison_bits(node)) + (
            pricing.truncation(poly, truncation)
        )
        return LayerCost(
            node.name,
            node.op,
            secure_mults=relu + poly,
            bytes_online=step.bytes_online,
            rounds=step.rounds,
            relu_count=relu,
            poly_count=poly,
            comparisons=relu,
            bytes_offline=step.bytes_offline,
        )

    def pruned_attrs(self, node: Node, attrs: dict, have: int, full: int) -> dict:
        """A masked site after pruning: prediction only, so keep the kept fraction per channel."""
        per_channel = int(np.prod(node.attrs["out_shape"][1:])) if len(node.attrs["out_shape"]) > 1 else 1
        kept = int(node.attrs["elements"])
        if kept not in (0, full * per_channel):
            raise GraphError(
                f"masked site '{node.name}' keeps some ReLUs: which survive pruning depends on the blocks removed; "
                "predict the culled model's cost from its own graph instead"
            )
        elements = 0 if kept == 0 else have * per_channel
        return attrs | {"elements": elements, "keep": list(range(elements)), "coeffs": attrs["coeffs"][:have]}


class Clamp(nn.Module):
    """torch.clamp with fixed bounds; exports as ONNX Clip."""

    def __init__(self, lo: float | None, hi: float | None) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


def _bounds(node: Node) -> tuple[float | None, float | None]:
    return node.attrs.get("min"), node.attrs.get("max")


class Clip(Op):
    """min(max(x, lo), hi) with public bounds: one backend ReLU over the stacked differences."""

    name = "Clip"
    channelwise = True
    compares = True
    commutes_with_max = True

    def check(self, node, graph):
        lo, hi = _bounds(node)
        for bound in (lo, hi):
            if bound is not None and (not isinstance(bound, (int, float)) or not np.isfinite(bound)):
                raise GraphError(f"node '{node.name}' (Clip) needs finite numeric bounds, got min={lo!r} max={hi!r}")
        if lo is None and hi is None:
            raise GraphError(f"node '{node.name}' (Clip) has neither bound")
        if lo is not None and hi is not None and lo > hi:
            raise GraphError(f"node '{node.name}' (Clip) has min {lo} above max {hi}")
        check_comparison_bits(node)

    def plain(self, node, args, w):
        lo, hi = _bounds(node)
        return torch.clamp(args[0], lo, hi)

    def secure(self, node, args, w, ctx):
        lo, hi = _bounds(node)
        x = args[0]
        flat = x.reshape(x.shape[0], -1)
        m = flat.shape[1]
        diffs = [d for d in (None if lo is None else flat - lo, None if hi is None else flat - hi) if d is not None]
        stacked = diffs[0] if len(diffs) == 1 else ctx.backend.cat(diffs, dim=1)
        r = _relu(stacked, ctx, node, relu_layer=False)
        if lo is not None and hi is not None:
            y = r.index_select(1, torch.arange(m)) - r.index_select(1, torch.arange(m, 2 * m)) + lo
        elif lo is not None:
            y = r + lo
        else:
            y = flat - r
        return y.reshape(x.shape)

    def cost(self, node, io, pricing):
        n = io.batch * io.out(node) * sum(b is not None for b in _bounds(node))
        step = pricing.relu(n, comparison_bits(node))
        return LayerCost(
            node.name, node.op, secure_mults=n, bytes_online=step.bytes_online, rounds=step.rounds, comparisons=n,
            bytes_offline=step.bytes_offline,
        )

    def interval(self, node, args, w, ctx):
        """The two ReLUs' bound, tightened to the clamp of the input's (they share x)."""
        out = self.secure(node, args, w, ctx)
        lo, hi = _bounds(node)
        return out.intersect(torch.clamp(args[0].lo, lo, hi), torch.clamp(args[0].hi, lo, hi))

    def module(self, node, w):
        return Clamp(*_bounds(node))


# -- ONNX import ----------------------------------------------------------------------------------


def _import_relu(imp, node, a):
    imp.emit(node, "Relu", [node.input[0]], [], {})


def _import_clip(imp, node, a):
    bounds = [a.get("min"), a.get("max")]  # opset < 11: attributes
    for i, name in enumerate(node.input[1:3]):  # opset >= 11: optional constant inputs
        if not name:
            continue
        value = imp.init.get(name)
        if value is None or value.size != 1:
            raise GraphError(f"node '{node.name}' (Clip): bound '{name}' must be a constant scalar")
        bounds[i] = float(value.reshape(()))
    lo, hi = (None if b is None else float(b) for b in bounds)
    if lo is None and hi is None:
        imp.alias[node.output[0]] = node.input[0]
        return
    imp.emit(node, "Clip", [node.input[0]], [], {"min": lo, "max": hi})


register(Relu(), {"Relu": _import_relu})
register(MaskedRelu())
register(Clip(), {"Clip": _import_clip})
