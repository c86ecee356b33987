"""The model as twinfer runs it: a small public graph of supported ops plus secret weights.

The graph (ops, shapes, attributes) is public model structure and travels to the client as
JSON; the weights stay with the server. This module holds the data only; what each op means
lives in `protocols/ops/`, its checks in `passes/validation.py`, ONNX import in `passes/onnx_import.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


class GraphError(ValueError):
    """The model cannot be run: malformed, or an attribute twinfer does not support."""


class UnsupportedOpError(GraphError):
    """The model uses ops twinfer has no secure layer for; names every such node."""

    def __init__(self, nodes: list[tuple[str, str]], supported: Iterable[str] = ()) -> None:
        self.nodes = nodes
        listed = ", ".join(f"node '{name}' (op {op})" for name, op in nodes)
        known = f". Supported ops: {', '.join(supported)}" if supported else ""
        super().__init__(f"unsupported ONNX op(s): {listed}{known}")


@dataclass(frozen=True)
class Node:
    """One layer: `inputs` are activations (secret), `weights` name server-owned tensors."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    weights: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """Public structure of a model: everything but the weight values."""

    input_name: str
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    output_name: str
    nodes: list[Node]
    weight_shapes: dict[str, tuple[int, ...]]
    # The values the model is declared for, (lo, hi): every input element must lie in it.
    # Public (it travels to the client, which refuses inputs outside it); None: undeclared.
    input_range: tuple[float, float] | None = None
    # What the optimizer's calibration data did in each layer (protocols/passes/ranges.py), for the
    # server's own range check; stays with the server: never part of the JSON the client gets.
    calibration: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Public inputs (an attention mask; per-sample shapes), which the client sends in the clear, and
    # the values the server's public program computes from them, which nodes read as public
    # operands (passes/public_inputs.py): shape per sample and the range the range check covered.
    public_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    public: dict[str, Any] = field(default_factory=dict)  # name -> public_inputs.PublicValue
    # The public program itself (ONNX, passes/public_inputs.PublicProgram): the server's only.
    public_program: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "input_name": self.input_name,
                "input_shape": list(self.input_shape),
                "output_name": self.output_name,
                "nodes": [asdict(n) | {"inputs": list(n.inputs), "weights": list(n.weights)} for n in self.nodes],
                "weight_shapes": {k: list(v) for k, v in self.weight_shapes.items()},
            }
            | ({"input_range": list(self.input_range)} if self.input_range is not None else {})
            | (
                {"public_inputs": {k: list(v) for k, v in self.public_inputs.items()}, "public": {k: v.as_json() for k, v in self.public.items()}}
                if self.public_inputs
                else {}
            )
        )

    def check_weights(self, weights: dict[str, np.ndarray]) -> None:
        """The server's weights must be exactly the declared ones, with the declared shapes."""
        missing = sorted(set(self.weight_shapes) - set(weights))
        extra = sorted(set(weights) - set(self.weight_shapes))
        if missing or extra:
            raise GraphError(f"weights do not match the graph: missing {missing}, unexpected {extra}")
        for name, shape in self.weight_shapes.items():
            if tuple(weights[name].shape) != shape:
                raise GraphError(f"weight '{name}' has shape {tuple(weights[name].shape)}, graph says {shape}")

    def relu_count(self) -> int:
        """ReLU elements per sample: ReLU-type ops record theirs as the attribute `elements`."""
        return sum(int(n.attrs.get("elements", 0)) for n in self.nodes)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def check_input_range(value: Any, what: str = "input range") -> tuple[float, float]:
    """(lo, hi) as two finite floats with lo < hi; a GraphError naming `what` otherwise."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise GraphError(f"{what} must be two numbers LO,HI, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise GraphError(f"{what} must be two finite numbers with LO < HI, got [{lo:g}, {hi:g}]")
    return lo, hi


def check_finite(value: np.ndarray, what: str) -> None:
    """A weight or constant the fixed point cannot encode (NaN, +-inf) is refused, named: run, it
    would come back as logits of about 1e9 and no error."""
    finite = np.isfinite(value)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise GraphError(
            f"{what} holds {int((~finite).sum())} NaN or infinite value(s) (first at index {list(where)}: {value[where]}); "
            "the model cannot be run privately: fix or retrain it, and export it again"
        )


def resolve_reshape(shape: tuple[int, ...], target: list[int]) -> tuple[int, ...]:
    """ONNX Reshape semantics: 0 copies the input dimension, -1 is inferred."""
    return tuple(shape[i] if d == 0 else d for i, d in enumerate(target))
