"""Linear layers with secret weights: Conv, Gemm (and MatMul), Affine (Mul, a lone BatchNorm).

Secure evaluation is one Beaver product per layer (Beaver 1991; CrypTen
`mpc/primitives/beaver.py`): both parties open x - a and W - b together, then combine
locally; the bias is a secret addition and, with two parties, the truncation after the
product is local. BatchNormalization is folded into the conv/linear before it at import, so
no party ever divides by a secret variance; where there is none (e.g. after a ReLU) it
becomes an Affine: x * scale + shift with secret scale and shift.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ir.graph import GraphError, Node
from .registry import CostInputs, LayerCost, Op, SecureContext, register, size, truncation_of


class Affine(nn.Module):
    """x * scale + shift (a BatchNorm that follows no conv/linear)."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.from_numpy(scale.copy()))
        self.shift = nn.Parameter(torch.from_numpy(shift.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _product_cost(node: Node, io: CostInputs, pricing, activations: int, weights: int, mults: int) -> LayerCost:
    params = sum(size(io.weight(w)) for w in node.weights)
    outputs = io.batch * io.out(node)
    step = pricing.product(activations, weights, outputs) + pricing.truncation(outputs, truncation_of(node))
    return LayerCost(
        node.name, node.op, params=params, secure_mults=mults, bytes_online=step.bytes_online, rounds=step.rounds,
        bytes_offline=step.bytes_offline,
    )


def _loaded(module: nn.Module, w: list[np.ndarray]) -> nn.Module:
    """`module` with the node's weight (and bias) copied in."""
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w[0]))
        if len(w) > 1:
            module.bias.copy_(torch.from_numpy(w[1]))
    return module


class Conv(Op):
    name = "Conv"

    def plain(self, node, args, w):
        a = node.attrs
        return F.conv2d(args[0], w[0], w[1] if len(w) > 1 else None, a["stride"], a["padding"], a["dilation"], a["group"])

    def secure(self, node, args, w, ctx: SecureContext):
        a = node.attrs
        y = ctx.backend.conv2d(
            args[0], w[0], stride=tuple(a["stride"]), padding=tuple(a["padding"]), dilation=tuple(a["dilation"]), groups=a["group"],
            truncation=truncation_of(node),
        )  # fmt: skip
        return y + w[1].reshape(1, -1, 1, 1) if len(w) > 1 else y

    def cost(self, node, io, pricing):
        w_shape = io.weight(node.weights[0])
        w = size(w_shape)
        return _product_cost(node, io, pricing, io.batch * io.x, w, io.batch * io.out(node) * (w // w_shape[0]))

    def module(self, node, w):
        a = node.attrs
        out_c, in_per_group, kh, kw = w[0].shape
        conv = nn.Conv2d(
            in_per_group * a["group"], out_c, (kh, kw), tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), a["group"],
            bias=len(w) > 1,
        )
        return _loaded(conv, w)


class Gemm(Op):
    name = "Gemm"

    def plain(self, node, args, w):
        return F.linear(args[0], w[0], w[1] if len(w) > 1 else None)

    def secure(self, node, args, w, ctx):
        y = ctx.backend.linear(args[0], w[0], truncation_of(node))
        return y + w[1] if len(w) > 1 else y

    cost = Conv.cost

    def module(self, node, w):
        out_f, in_f = w[0].shape
        return _loaded(nn.Linear(in_f, out_f, bias=len(w) > 1), w)


class AffineOp(Op):
    """Secret per-channel scale and shift: a Beaver product with broadcasting."""

    name = "Affine"
    channelwise = True

    def plain(self, node, args, w):
        return args[0] * w[0] + w[1]

    def secure(self, node, args, w, ctx):
        return ctx.backend.mul(args[0], w[0], truncation_of(node)) + w[1]

    def cost(self, node, io, pricing):
        scale = size(io.weight(node.weights[0]))
        return _product_cost(node, io, pricing, io.batch * io.x, scale, io.batch * io.out(node))

    def module(self, node, w):
        return Affine(w[0], w[1])


# -- ONNX import ----------------------------------------------------------------------------------


def _import_conv(imp, node, a):
    w = imp.init.get(node.input[1])
    if w is None or w.ndim != 4:
        raise GraphError(f"node '{node.name}' (Conv) needs a constant 4-d kernel; only 2-d convolutions are supported")
    pads = imp.symmetric_pads(node, list(a.get("pads", [0, 0, 0, 0])))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise GraphError(f"node '{node.name}' (Conv) uses auto_pad; export with explicit pads")
    weights = [imp.weight(node, node.input[1], "weight")]
    if len(node.input) > 2 and node.input[2]:
        weights.append(imp.weight(node, node.input[2], "bias"))
    attrs = {
        "stride": list(a.get("strides", [1, 1])),
        "padding": pads,
        "dilation": list(a.get("dilations", [1, 1])),
        "group": int(a.get("group", 1)),
    }
    imp.emit(node, "Conv", [node.input[0]], weights, attrs)


def _import_gemm(imp, node, a):
    if a.get("transA", 0):
        raise GraphError(f"node '{node.name}' (Gemm) uses transA=1, which twinfer does not support")
    w = imp.init.get(node.input[1])
    if w is None:
        raise GraphError(f"node '{node.name}' (Gemm): B must be a constant weight")
    w = w * float(a.get("alpha", 1.0))
    if not a.get("transB", 0):
        w = w.T
    weights = [imp.weight(node, node.input[1], "weight", w)]
    if len(node.input) > 2 and node.input[2]:
        weights.append(imp.weight(node, node.input[2], "bias", imp.init[node.input[2]] * float(a.get("beta", 1.0))))
    imp.emit(node, "Gemm", [node.input[0]], weights, {})


def _import_matmul(imp, node, a):
    left, right = node.input
    if left not in imp.init and right not in imp.init:  # two activations (attention): ops/attention.py
        imp.emit(node, "MatMul", [left, right], [], {})
        return
    w = imp.init.get(right)
    if w is None or w.ndim != 2:
        raise GraphError(f"node '{node.name}' (MatMul): a constant operand must be the right one, a matrix")
    imp.emit(node, "Gemm", [node.input[0]], [imp.weight(node, node.input[1], "weight", w.T)], {})


def _import_mul(imp, node, a):
    left, right = node.input
    if (left in imp.init) == (right in imp.init):
        raise GraphError(f"node '{node.name}' (Mul) must multiply an activation by a constant")
    value, other = (right, left) if right in imp.init else (left, right)
    scale = imp.init[value]
    shift = np.zeros_like(scale)
    imp.emit(node, "Affine", [other], [imp.weight(node, value, "scale"), imp.weight(node, "", "shift", shift)], {})


def _import_div(imp, node, a):
    left, right = node.input
    if left in imp.init or right not in imp.init:
        raise GraphError(f"node '{node.name}' (Div) must divide an activation by a constant")
    divisor = imp.init[right]
    if not np.all(divisor != 0):
        raise GraphError(f"node '{node.name}' (Div) divides by a constant that holds zeros")
    scale = (1.0 / divisor).astype(np.float32)
    imp.emit(node, "Affine", [left], [imp.weight(node, right, "scale", scale), imp.weight(node, "", "shift", np.zeros_like(scale))], {})


def _import_batch_norm(imp, node, a):
    if len(node.output) > 1 and any(node.output[1:]):
        raise GraphError(f"node '{node.name}' (BatchNormalization) is in training mode; export the model in eval()")
    gamma, beta, mean, var = (imp.init.get(i) for i in node.input[1:5])
    if any(v is None for v in (gamma, beta, mean, var)):
        raise GraphError(f"node '{node.name}' (BatchNormalization) needs constant statistics")
    scale = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    shift = beta - mean * scale
    source = imp.name(node.input[0])
    producer = imp.nodes[-1] if imp.nodes and imp.nodes[-1].output == source else None
    if producer is not None and producer.op in ("Conv", "Gemm") and imp.consumers.get(source, 0) == 1:
        _fold_into(imp, producer, scale, shift)
        imp.alias[node.output[0]] = source
        return
    # Not after a conv/linear (e.g. after a ReLU): the server turns it into scale and shift.
    bshape = (-1,) + (1,) * 2  # per channel of an N x C x H x W activation
    imp.emit(
        node,
        "Affine",
        [node.input[0]],
        [imp.weight(node, "", "scale", scale.reshape(bshape)), imp.weight(node, "", "shift", shift.reshape(bshape))],
        {},
    )


def _fold_into(imp, producer: Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """y = scale * (W x + b) + shift  ==  (scale W) x + (scale b + shift)."""
    w_key = producer.weights[0]
    w = imp.weights[w_key]
    imp.weights[w_key] = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    if len(producer.weights) > 1:
        b_key = producer.weights[1]
        imp.weights[b_key] = imp.weights[b_key] * scale + shift
    else:
        b_key = f"{producer.name}.bias"
        imp.weights[b_key] = shift.astype(np.float32)
        index = imp.nodes.index(producer)
        imp.nodes[index] = Node(
            name=producer.name,
            op=producer.op,
            inputs=producer.inputs,
            output=producer.output,
            weights=producer.weights + (b_key,),
            attrs=producer.attrs,
        )


LINEAR_OPS = ("Conv", "Gemm")

register(Conv(), {"Conv": _import_conv})
register(Gemm(), {"Gemm": _import_gemm, "MatMul": _import_matmul})
register(AffineOp(), {"Mul": _import_mul, "Div": _import_div, "BatchNormalization": _import_batch_norm})
