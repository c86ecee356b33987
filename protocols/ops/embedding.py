"""Private embedding lookup: the client's ids stay secret, and so does the server's table.

Protocol (one-hot times table, as in CrypTen's and SecureML's private lookups):
  1. The client encodes each id as a one-hot row of length R (the table's rows), locally and
     in plaintext: the encoding is public model structure (R travels in the graph).
  2. The client secret-shares the one-hot tensor X (N x F x R); the server shares its table T
     (R x d) once per session.
  3. Both compute [X T] with one Beaver matrix product: T - B was opened once, when the table
     was shared (B fixed for the session); each batch opens only X - A (A and AB from the
     dealer), then combines locally; one round.
  4. The fixed-point product is truncated locally (two-party truncation).
Online bytes per batch are those of step 3: 8 * N F R bytes each way (and 8 * R d once per
session), linear in the vocabulary R; rows dropped before deployment (never selected in DP
training) shrink R.

The graph's Embedding node reads the model input (N x F ids) directly; `encode_input` is the
client's step 1, applied just before the input is shared, and the secure layer sees one-hots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backends import DEFAULT_PROTOCOL, pricing_for
from ..ir.graph import Graph, GraphError, Node
from .registry import LayerCost, Op, register, size, truncation_of

EMBEDDING_OP = "Embedding"


def lookup_opened(batch: int, fields: int, rows: int, dim: int) -> tuple[int, int]:
    """Elements a lookup's product involves: X - A (N x F x R, opened per batch), and T - B
    (R x d; opened once per session by backends that fix the table's mask)."""
    return batch * fields * rows, rows * dim


class Embedding(Op):
    name = EMBEDDING_OP

    def check(self, node: Node, graph: Graph) -> None:
        """An Embedding must read the model input directly, and be the only node that reads it."""
        rows, dim = node.attrs.get("rows"), node.attrs.get("dim")
        if not isinstance(rows, int) or rows < 1 or not isinstance(dim, int) or dim < 1:
            raise GraphError(f"node '{node.name}' (Embedding) needs positive integer attrs rows and dim, got {node.attrs}")
        if node.inputs != (graph.input_name,):
            raise GraphError(
                f"node '{node.name}' (Embedding) must read the model input '{graph.input_name}' directly "
                "(the client one-hot encodes its ids before sharing them)"
            )
        readers = [n.name for n in graph.nodes if graph.input_name in n.inputs]
        if readers != [node.name]:
            raise GraphError(f"the model input feeds an Embedding, so no other node may read it; read by {readers}")

    def plain(self, node, args, w):
        """Rows of the table (R x d) at the ids (N x F) -> N x F x d."""
        return w[0][args[0].long()]

    def secure(self, node, args, w, ctx):
        """Steps 2-4: [one_hot] (N x F x R) times [table] (R x d), one Beaver product."""
        return ctx.backend.matmul(args[0], w[0], truncation_of(node))

    def interval(self, node, args, w, ctx):
        """A looked-up row lies within the table's column ranges (the product's sum over the
        one-hot's bounds would add up every row); that row is what the product truncates."""
        table = w[0].lo
        shape = (1, *node.attrs["out_shape"])
        out = type(w[0])(table.amin(dim=0).expand(shape), table.amax(dim=0).expand(shape))
        ctx.backend.records.truncate(out.magnitude, truncation=truncation_of(node))
        return out

    def error(self, node, args, w, ctx):
        """A looked-up row carries its own encoding error (the worst row's) and the truncation's."""
        table = w[0]
        shape = (1, *node.attrs["out_shape"])
        peak, ms = table.peak.amax(dim=0).expand(shape), table.ms.amax(dim=0).expand(shape)
        return ctx.backend.value(peak, ms + ctx.backend.truncation_ms)

    def cost(self, node, io, pricing):
        rows, dim = int(node.attrs["rows"]), int(node.attrs["dim"])
        outputs = io.batch * io.out(node)
        step = pricing.product(*lookup_opened(io.batch, io.x, rows, dim), outputs) + pricing.truncation(outputs, truncation_of(node))
        params = sum(size(io.weight(k)) for k in node.weights)
        mults = io.batch * io.out(node) * rows
        return LayerCost(
            node.name, node.op, params=params, secure_mults=mults, bytes_online=step.bytes_online, rounds=step.rounds,
            bytes_offline=step.bytes_offline,
        )


def embedding_node(graph: Any) -> Any | None:
    """The Embedding node that reads the model input, if the model has one."""
    for node in graph.nodes:
        if node.op == EMBEDDING_OP:
            return node
    return None


def check_ids(graph: Any, inputs: np.ndarray) -> None:
    """Ids for an Embedding input must be integers in [0, rows); raises ValueError naming the offender."""
    node = embedding_node(graph)
    if node is None:
        return
    rows = node.attrs["rows"]
    values = np.asarray(inputs)
    if not np.isfinite(values).all():
        return  # reported by the caller's NaN check
    fractional = values != np.round(values)
    if fractional.any():
        where = tuple(int(i) for i in np.argwhere(fractional)[0])
        raise ValueError(f"the model's input is embedding ids, which must be integers; input{list(where)} = {values[where]}")
    bad = (values < 0) | (values >= rows)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"embedding id out of range: input{list(where)} = {int(values[where])}, but the deployed table "
            f"has rows 0..{rows - 1} ({int(bad.sum())} id(s) out of range)"
        )


def encode_input(graph: Any, x: torch.Tensor) -> torch.Tensor:
    """Step 1, the client's: ids (N x F) -> one-hot (N x F x R); other models' inputs pass unchanged.

    The server calls it on its zero placeholder, which gives the shape of what the client shares.
    """
    node = embedding_node(graph)
    if node is None:
        return x
    return torch.nn.functional.one_hot(x.long(), node.attrs["rows"]).to(torch.float32)


@dataclass(frozen=True)
class LookupCost:
    """Predicted online cost of one batch's lookup (a model, labelled as such where printed)."""

    rounds: int
    bytes_online: int  # both directions together

    @classmethod
    def predict(cls, batch: int, fields: int, rows: int, dim: int, protocol: str = DEFAULT_PROTOCOL) -> "LookupCost":
        """The lookup's cost under `protocol`'s pricing, as the cost model prices the Embedding op."""
        activations, table = lookup_opened(batch, fields, rows, dim)
        step = pricing_for(protocol).product(activations, table, batch * fields * dim)
        return cls(rounds=step.rounds, bytes_online=step.bytes_online)


def _import_gather(imp, node, a):
    table, ids = node.input
    inputs = {i.name for i in imp.model.graph.input}
    if table not in imp.init or imp.init[table].ndim != 2 or int(a.get("axis", 0)) != 0 or ids not in inputs:
        raise GraphError(
            f"node '{node.name}' (Gather) is supported only as an embedding lookup: a constant 2-d table, "
            "axis 0, indices taken straight from the model input"
        )
    rows, dim = imp.init[table].shape
    imp.emit(node, EMBEDDING_OP, [ids], [imp.weight(node, table, "table")], {"rows": int(rows), "dim": int(dim)})


register(Embedding(), {"Gather": _import_gather})  # a constant table gathered at the model input
