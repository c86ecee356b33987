"""Shape ops and additions, all local on additive shares: Flatten, Reshape, Add, Concat, Slice.

Also the ONNX ops that produce no layer: Constant (a value for other nodes), Identity and
Dropout (inference mode: an alias), Cast (of a constant, or of a float activation).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..ir.graph import GraphError, Node, check_finite, resolve_reshape
from .registry import Op, register, register_onnx


class Reshape(nn.Module):
    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = list(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(resolve_reshape(x.shape, self.shape))


class Constant(nn.Module):
    """Adds a learned constant (an Add node with a weight operand)."""

    def __init__(self, value: np.ndarray) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.from_numpy(value.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value


class FlattenOp(Op):
    name = "Flatten"
    reshapes = True

    def plain(self, node, args, w):
        return args[0].flatten(start_dim=node.attrs["axis"])

    def secure(self, node, args, w, ctx):
        return args[0].flatten(start_dim=node.attrs["axis"])

    def module(self, node, w):
        return nn.Flatten(node.attrs["axis"])


class ReshapeOp(Op):
    name = "Reshape"
    reshapes = True

    def plain(self, node, args, w):
        return args[0].reshape(resolve_reshape(args[0].shape, node.attrs["shape"]))

    def secure(self, node, args, w, ctx):
        return args[0].reshape(resolve_reshape(args[0].shape, node.attrs["shape"]))

    def module(self, node, w):
        return Reshape(node.attrs["shape"])


class Add(Op):
    """Two activations (a residual connection), or an activation and a secret constant."""

    name = "Add"
    channelwise = True

    def plain(self, node, args, w):
        return args[0] + (args[1] if len(args) > 1 else w[0])

    def secure(self, node, args, w, ctx):
        return args[0] + (args[1] if len(args) > 1 else w[0])

    def module(self, node, w):
        return Constant(w[0]) if w else None


class Concat(Op):
    """Branches joined along an axis (Inception / DenseNet style)."""

    name = "Concat"

    def check(self, node: Node, graph) -> None:
        axis = node.attrs.get("axis")
        if not isinstance(axis, int) or axis == 0 or len(node.inputs) < 2:
            raise GraphError(f"node '{node.name}' (Concat) joins two or more activations along a non-batch axis, got {node.attrs}")

    def plain(self, node, args, w):
        return torch.cat(args, dim=node.attrs["axis"])

    def secure(self, node, args, w, ctx):
        return ctx.backend.cat(args, dim=node.attrs["axis"])

    def module(self, node, w):
        return None

    def annotate(self, node, out):
        """ONNX counts a negative axis from the end; the graph keeps it positive."""
        axis = node.attrs["axis"] % out.dim()
        if axis == 0:
            raise GraphError(f"node '{node.name}' (Concat) joins along the batch axis; twinfer joins along features only")
        node.attrs["axis"] = axis


class Slice(Op):
    """A range [start, end) of the last axis (a part of a stacked product, passes/fewer_rounds.py): local."""

    name = "Slice"

    def check(self, node: Node, graph) -> None:
        start, end = node.attrs.get("start"), node.attrs.get("end")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)) or not 0 <= start < end:
            raise GraphError(f"node '{node.name}' (Slice) takes a range 0 <= start < end of the last axis, got {node.attrs}")

    def plain(self, node, args, w):
        return args[0][..., node.attrs["start"] : node.attrs["end"]]

    def secure(self, node, args, w, ctx):
        return args[0].index_select(-1, torch.arange(node.attrs["start"], node.attrs["end"]))

    def module(self, node, w):
        return None


# -- ONNX import ----------------------------------------------------------------------------------


def _import_constant(imp, node, a):
    value = a.get("value")
    if value is None:
        raise GraphError(f"node '{node.name}' (Constant) has no tensor value")
    array = numpy_helper.to_array(value)
    if array.dtype.kind == "f":
        check_finite(array, f"constant '{node.output[0]}' (node '{node.name}')")
    imp.init[node.output[0]] = array.astype(np.float32)
    if value.data_type == onnx.TensorProto.INT64:
        imp.ints[node.output[0]] = array


def _import_identity(imp, node, a):
    source = node.input[0]
    if source in imp.init:  # the exporter shares equal initializers through Identity
        imp.init[node.output[0]] = imp.init[source]
        if source in imp.ints:
            imp.ints[node.output[0]] = imp.ints[source]
    else:
        imp.alias[node.output[0]] = source


def _import_cast(imp, node, a):
    """A constant cast (torch exports ReLU6's bounds so) folds; a float activation passes."""
    source = node.input[0]
    if source in imp.init:
        imp.init[node.output[0]] = imp.init[source]
    elif a.get("to") == onnx.TensorProto.FLOAT:
        imp.alias[node.output[0]] = source
    else:
        raise GraphError(f"node '{node.name}' (Cast) casts an activation to {onnx.TensorProto.DataType.Name(a.get('to', 0))}")


def _import_flatten(imp, node, a):
    imp.emit(node, "Flatten", [node.input[0]], [], {"axis": int(a.get("axis", 1))})


def _import_reshape(imp, node, a):
    shape = imp.ints.get(node.input[1])
    if shape is None:
        raise GraphError(
            f"node '{node.name}' (Reshape) takes its shape from a computed value; export with "
            "torch.flatten / nn.Flatten, or a constant shape"
        )
    shape = [int(d) for d in shape]
    if imp.fixed_batch:  # folded for one sample: the leading 1 is the batch, which the graph keeps apart
        if not shape or shape[0] not in (0, 1):
            raise GraphError(f"node '{node.name}' (Reshape) to {shape} merges the batch axis with another; twinfer keeps the batch apart")
        shape[0] = 0
    imp.emit(node, "Reshape", [node.input[0]], [], {"shape": shape})


def _import_add(imp, node, a):
    left, right = node.input
    if left in imp.init and right in imp.init:
        raise GraphError(f"node '{node.name}' (Add) adds two constants; fold it before export")
    if right in imp.init or left in imp.init:
        value, other = (right, left) if right in imp.init else (left, right)
        imp.emit(node, "Add", [other], [imp.weight(node, value, "addend")], {})
    else:
        imp.emit(node, "Add", [left, right], [], {})


def _import_concat(imp, node, a):
    constants = [i for i in node.input if i in imp.init]
    if constants:
        raise GraphError(f"node '{node.name}' (Concat) joins constants {constants}; only activations may be concatenated")
    axis = int(a.get("axis", 1))
    if axis == 0:
        raise GraphError(f"node '{node.name}' (Concat) joins along the batch axis; twinfer joins along features only")
    imp.emit(node, "Concat", list(node.input), [], {"axis": axis})  # a negative axis is resolved by annotate


register_onnx("Constant", _import_constant)
register_onnx("Identity", _import_identity)
register_onnx("Dropout", _import_identity)  # inference mode
register_onnx("Cast", _import_cast)
register(FlattenOp(), {"Flatten": _import_flatten})
register(ReshapeOp(), {"Reshape": _import_reshape})
register(Add(), {"Add": _import_add})
register(Concat(), {"Concat": _import_concat})
register(Slice())
