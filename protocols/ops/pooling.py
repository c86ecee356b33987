"""Pooling: MaxPool (secure comparisons), AveragePool and GlobalAveragePool (local sums)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import nn

from ..ir.graph import GraphError
from .registry import LayerCost, Op, check_comparison_bits, comparison_bits, register, truncation_of


def _pool_args(node) -> dict[str, Any]:
    return {"kernel": tuple(node.attrs["kernel"]), "stride": tuple(node.attrs["stride"]), "padding": tuple(node.attrs["padding"])}


def _division_cost(node, io, pricing) -> LayerCost:
    """An average pool divides its window sums locally but for an exact truncation's round."""
    step = pricing.truncation(io.batch * io.out(node), truncation_of(node))
    return LayerCost(node.name, node.op, bytes_online=step.bytes_online, rounds=step.rounds, bytes_offline=step.bytes_offline)


class MaxPool(Op):
    """The backend's max-pool; counts n - 1 comparisons per window of n (a comparison tree)."""

    name = "MaxPool"
    channelwise = True
    compares = True

    def compares_with_padding(self, node) -> bool:
        return any(node.attrs.get("padding", [0]))

    def plain(self, node, args, w):
        a = node.attrs
        return F.max_pool2d(args[0], kernel_size=a["kernel"], stride=a["stride"], padding=a["padding"])

    def check(self, node, graph):
        check_comparison_bits(node)

    def secure(self, node, args, w, ctx):
        y = ctx.backend.max_pool2d(args[0], **_pool_args(node), bits=comparison_bits(node))
        ctx.count(comparisons=int(y.nelement()) * (int(np.prod(node.attrs["kernel"])) - 1))
        return y

    def cost(self, node, io, pricing):
        n = int(np.prod(node.attrs["kernel"]))
        windows = io.batch * io.out(node)
        step = pricing.max_pool(windows, n, comparison_bits(node))
        return LayerCost(
            node.name, node.op, bytes_online=step.bytes_online, rounds=step.rounds, comparisons=windows * (n - 1),
            bytes_offline=step.bytes_offline,
        )

    def module(self, node, w):
        a = node.attrs
        return nn.MaxPool2d(a["kernel"], a["stride"], a["padding"])


class AveragePool(Op):
    name = "AveragePool"
    channelwise = True

    def plain(self, node, args, w):
        a = node.attrs
        return F.avg_pool2d(args[0], kernel_size=a["kernel"], stride=a["stride"], padding=a["padding"])

    def secure(self, node, args, w, ctx):
        return ctx.backend.avg_pool2d(args[0], **_pool_args(node), truncation=truncation_of(node))

    def cost(self, node, io, pricing):
        return _division_cost(node, io, pricing)

    def module(self, node, w):
        a = node.attrs
        return nn.AvgPool2d(a["kernel"], a["stride"], a["padding"], count_include_pad=True)


class GlobalAveragePool(Op):
    name = "GlobalAveragePool"
    channelwise = True

    def plain(self, node, args, w):
        return args[0].mean(dim=(2, 3), keepdim=True)

    def secure(self, node, args, w, ctx):
        kernel = tuple(args[0].shape[2:])
        return ctx.backend.avg_pool2d(args[0], kernel=kernel, stride=kernel, padding=(0, 0), truncation=truncation_of(node))

    def cost(self, node, io, pricing):
        return _division_cost(node, io, pricing)

    def module(self, node, w):
        return nn.AdaptiveAvgPool2d(1)


# -- ONNX import ----------------------------------------------------------------------------------


def _pool_attrs(imp, node, a: dict[str, Any]) -> dict[str, Any]:
    kernel = list(a["kernel_shape"])
    if a.get("ceil_mode", 0):
        raise GraphError(f"node '{node.name}' ({node.op_type}) uses ceil_mode=1, which twinfer does not support")
    if any(d != 1 for d in a.get("dilations", [1] * len(kernel))):
        raise GraphError(f"node '{node.name}' ({node.op_type}) uses dilation, which twinfer does not support")
    pads = imp.symmetric_pads(node, list(a.get("pads", [0] * 2 * len(kernel))))
    if node.op_type == "AveragePool" and any(pads) and not a.get("count_include_pad", 0):
        raise GraphError(f"node '{node.name}' pads without count_include_pad; export with count_include_pad=True")
    return {"kernel": kernel, "stride": list(a.get("strides", kernel)), "padding": pads}


def _import_max_pool(imp, node, a):
    if len(node.output) > 1 and node.output[1]:
        raise GraphError(f"node '{node.name}' (MaxPool) returns indices, which twinfer does not support")
    imp.emit(node, "MaxPool", [node.input[0]], [], _pool_attrs(imp, node, a))


def _import_average_pool(imp, node, a):
    imp.emit(node, "AveragePool", [node.input[0]], [], _pool_attrs(imp, node, a))


def _import_global_average_pool(imp, node, a):
    imp.emit(node, "GlobalAveragePool", [node.input[0]], [], {})


register(MaxPool(), {"MaxPool": _import_max_pool})
register(AveragePool(), {"AveragePool": _import_average_pool})
register(GlobalAveragePool(), {"GlobalAveragePool": _import_global_average_pool})
