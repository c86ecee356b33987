"""Masked activations: a ReLU kept only where a public mask says so, a polynomial elsewhere.

Per site, with a public binary mask `m` over one sample's activation and public per-channel
coefficients (c0, c1, c2):

    out = m * relu(x) + (1 - m) * (c0 + c1 * x + c2 * x^2)

An all-zero mask is a pure polynomial activation (MOFHEI's conversion); an all-one mask is a
plain ReLU. The mask and coefficients are public model structure (DESIGN.md invariants), so
they travel in the graph's attributes, not with the secret weights.

Secure evaluation (AutoReP's gather, which its public code leaves out):
1. gather the kept positions (a local index_select on shares) and run CrypTen's ReLU on that
   smaller tensor only: these are the only elements that pay for a secure comparison;
2. gather the other positions and evaluate the polynomial: one Beaver square, then
   multiplications by public coefficients and a public addition (local);
3. concatenate and scatter both parts back with the inverse permutation (local).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .graph import Graph, GraphError, Node

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
    return Graph(graph.input_name, graph.input_shape, graph.output_name, nodes, dict(graph.weight_shapes))


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


def secure_masked_relu(x: Any, node: Node, counts: Counter | None = None) -> Any:
    """The masked activation on an MPCTensor; only kept positions go through a comparison."""
    import crypten

    keep, rest, coeffs, inverse = _layout(node)
    flat = x.reshape(x.shape[0], -1)
    parts = []
    if len(keep):
        parts.append(secure_relu(flat.index_select(1, keep), counts))
    if len(rest):
        r = flat.index_select(1, rest)
        parts.append(r.square() * coeffs[:, 2] + r * coeffs[:, 1] + coeffs[:, 0])
    joined = parts[0] if len(parts) == 1 else crypten.cat(parts, dim=1)
    return joined.index_select(1, inverse).reshape(x.shape)


def secure_relu(x: Any, counts: Counter | None = None) -> Any:
    """CrypTen's ReLU (a secure comparison per element), counting the elements compared."""
    if counts is not None:
        counts["relu_count"] += int(x.nelement())
    return x.relu()
