"""The op table: one entry per graph op, one importer per ONNX op type.

Each op family module (`linear`, `activation`, `pooling`, `embedding`, `shape`) defines, for
every op it owns, a subclass of `Op` (plaintext evaluation, secure evaluation on a backend,
cost under a backend's pricing, a trainable torch module, checks of attributes received as
JSON) and registers it here, together with the ONNX importers that produce it. The
evaluators (`passes/plain.py`, `secure_graph.py`, `cost_model.py`, the optimizer's trainable
module) look ops up in this table and never branch on op names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..backends.base import Truncation
from ..ir.graph import Graph, GraphError, Node, UnsupportedOpError

if TYPE_CHECKING:  # the backend interface is only a type here
    from ..backends.base import Backend, Pricing


@dataclass
class SecureContext:
    """What a secure op receives besides its operands: the session's backend and counters.

    `counts["relu_count"]` grows by the elements of ReLU layers compared, and
    `counts["comparisons"]` by every comparison an op needs (a ReLU's element, a Clip's two
    per element, n - 1 per max-pool window of n), the same for every backend.
    """

    backend: "Backend"
    counts: Counter = field(default_factory=Counter)

    def count(self, comparisons: int, relu: int = 0) -> None:
        self.counts["comparisons"] += int(comparisons)
        self.counts["relu_count"] += int(relu)


@dataclass
class LayerCost:
    """Predicted online cost of one layer (or of the whole graph) for a batch."""

    name: str
    op: str
    params: int = 0
    secure_mults: int = 0
    bytes_online: int = 0
    rounds: int = 0
    relu_count: int = 0
    poly_count: int = 0
    comparisons: int = 0
    bytes_offline: int | None = 0  # from the dealer to both parties; None: the backend's pricing does not say
    modelled: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def size(shape) -> int:
    """Elements of a shape (1 for a scalar)."""
    return int(np.prod(shape)) if len(shape) else 1


@dataclass(frozen=True)
class CostInputs:
    """The public shapes a layer's cost depends on, for a batch of `batch` samples."""

    graph: Graph
    batch: int
    input_shapes: tuple[tuple[int, ...], ...]

    @property
    def x(self) -> int:
        """Elements of one sample's first input."""
        return size(self.input_shapes[0])

    def out(self, node: Node) -> int:
        return size(node.attrs["out_shape"])

    def weight(self, name: str) -> tuple[int, ...]:
        return tuple(self.graph.weight_shapes[name])


class Op:
    """What one graph op means, everywhere twinfer evaluates or prices it."""

    name: ClassVar[str]
    # Ops whose outputs keep the channel axis of their first input (block pruning follows them).
    channelwise: ClassVar[bool] = False
    # Ops that compare (their `bits` attribute is a comparison width), and those that may take their
    # input's exact truncation into their own opening (Truncation.fused: the backend's ReLU).
    compares: ClassVar[bool] = False
    takes_fused_truncation: ClassVar[bool] = False
    # Monotone elementwise ops that a max-pool commutes with (protocols/passes/rewrite.py).
    commutes_with_max: ClassVar[bool] = False
    # Ops whose second input is a public value (ops/public.py); no other op may read one.
    reads_public: ClassVar[bool] = False

    def compares_with_padding(self, node: Node) -> bool:
        """Whether the node compares values against a padding constant, so needs the full width."""
        return False

    def check(self, node: Node, graph: Graph) -> None:
        """Validate the node's attributes (a graph received as JSON is not trusted)."""

    def plain(self, node: Node, args: list[torch.Tensor], w: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def secure(self, node: Node, args: list[Any], w: list[Any], ctx: SecureContext) -> Any:
        raise NotImplementedError

    def cost(self, node: Node, io: CostInputs, pricing: "Pricing") -> LayerCost:
        """Local by default: no bytes, no rounds."""
        return LayerCost(node.name, node.op)

    def module(self, node: Node, w: list[np.ndarray]) -> torch.nn.Module | None:
        """A trainable torch module for the node; None: evaluated with `plain` (no weights)."""
        raise GraphError(f"node '{node.name}' ({node.op}) cannot be turned into a trainable module")

    def annotate(self, node: Node, out: torch.Tensor) -> None:
        """Record attributes known once the op ran on one sample (out_shape is set for all)."""

    # The range methods (the way Opacus registers a grad sampler per layer type): run by the
    # range check (protocols/passes/ranges.py) on the analysis backends of protocols/numeric/, which
    # record what the secure evaluation truncates and compares. By default the op's own secure
    # evaluation, so that what it truncates is written once; an op refines a loose result.

    def interval(self, node: Node, args: list[Any], w: list[Any], ctx: SecureContext) -> Any:
        """A sound bound of the output (an IntervalValue) for inputs within `args`' bounds."""
        return self.secure(node, args, w, ctx)

    def error(self, node: Node, args: list[Any], w: list[Any], ctx: SecureContext) -> Any:
        """The output's magnitude and mean-square error (an ErrorValue) from its inputs'."""
        return self.secure(node, args, w, ctx)


FULL_BITS = 64  # a comparison on the whole ring: exact for every value


def comparison_bits(node: Node) -> int:
    """The width a comparison op compares on: its `bits` attribute (the artifact's, from the
    activation ranges `twinfer optimize` saw), else the full ring."""
    return int(node.attrs.get("bits") or FULL_BITS)


def truncation_of(node: Node) -> Truncation:
    """How the node truncates its products (its `truncation` attribute: the session's plan), local if unset."""
    return Truncation.from_attr(node.attrs.get("truncation"))


def check_truncation(node: Node) -> None:
    try:
        truncation_of(node)
    except ValueError as err:
        raise GraphError(f"node '{node.name}' ({node.op}): {err}") from None


def check_comparison_bits(node: Node) -> None:
    bits = node.attrs.get("bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= FULL_BITS):
        raise GraphError(f"node '{node.name}' ({node.op}) compares on bits={bits!r}; a width is an integer from 2 to {FULL_BITS}")


OnnxImporter = Callable[..., None]  # (importer, onnx node, its attributes) -> None

_OPS: dict[str, Op] = {}
_ONNX: dict[str, OnnxImporter] = {}


def register(op: Op, onnx: dict[str, OnnxImporter] | None = None) -> Op:
    """Add a graph op and the ONNX importers that produce it (one call per op)."""
    if op.name in _OPS:
        raise ValueError(f"op '{op.name}' is registered twice")
    _OPS[op.name] = op
    for op_type, importer in (onnx or {}).items():
        register_onnx(op_type, importer)
    return op


def register_onnx(op_type: str, importer: OnnxImporter) -> None:
    """An ONNX op type that produces no graph op of its own (Constant, Identity, ...) or an alias."""
    if op_type in _ONNX:
        raise ValueError(f"ONNX op '{op_type}' has two importers")
    _ONNX[op_type] = importer


def op_for(node: Node) -> Op:
    """The registered op of `node`; an unknown op is an UnsupportedOpError naming the node."""
    op = _OPS.get(node.op)
    if op is None:
        raise UnsupportedOpError([(node.name, node.op)], graph_ops())
    return op


def onnx_importer(op_type: str) -> OnnxImporter | None:
    return _ONNX.get(op_type)


def graph_ops() -> tuple[str, ...]:
    return tuple(_OPS)


def supported_onnx_ops() -> tuple[str, ...]:
    return tuple(_ONNX)
