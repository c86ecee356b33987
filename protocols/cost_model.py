"""Online cost of a compiled graph under a backend's protocols: multiplications, bytes, rounds.

Each op prices itself (`Op.cost` in `protocols/ops/`) from the primitives of the backend's
`Pricing` (`protocols/backends/<name>/pricing.py`, where each figure is derived from the
protocol that runs). Bytes are counted as the runtime counts them (parties' metrics): payload
bytes of one party, sent plus received, in the 64-bit ring. Linear layers with secret weights
are one Beaver product (16 * (N * |x| + |W|) bytes, 1 round; secure multiplications are the
product's multiply-accumulates); a polynomial is one Beaver square per element; pooling
averages, shape ops, additions and public scaling are local. The logits are opened to the
client only: N * |out| * 8 bytes, 1 round (one way).

The unit that pruning removes is a `BlockShape`. With Beaver products nothing is packed, so a
block is one output neuron or filter (its row of W, its outputs, the next layer's input
channel); `pruned_graph` derives the shapes that remain when blocks are removed, so the cost
of a pruned model is predicted before it is built. Another packing (tiles of an HE-packed
matrix) would be another BlockShape kind.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .backends import DEFAULT_PROTOCOL, pricing_for
from .ir.graph import Graph, GraphError, Node
from .ops import CostInputs, LayerCost, op_for
from .ops.linear import LINEAR_OPS
from .ops.registry import size

__all__ = [
    "BlockShape", "FILTER_BLOCKS", "LayerCost", "graph_cost", "total_cost", "prunable_layers", "pruned_graph",
    "bytes_one_way", "link_time_s",
]  # fmt: skip


def link_time_s(rounds: int, bytes_one_way: float, rtt_s: float, bandwidth_bps: float | None) -> float:
    """The network's share of a run: rounds * rtt/2 + bytes of the busier direction / bandwidth.

    A round is a simultaneous exchange, so it waits one one-way delay; both directions carry
    their bytes at once. The one formula for a link's lower bound (parties' NetworkProfile
    uses it) and for the optimizer's predicted latency.
    """
    transfer = 0.0 if bandwidth_bps is None else bytes_one_way * 8 / bandwidth_bps
    return rounds * rtt_s / 2 + transfer


def bytes_one_way(cost: LayerCost) -> float:
    """Bytes one layer puts on the busier direction: half its exchanges, or all of the output's opening.

    Every opening sends one share each way (bytes_online counts both), except the output,
    which goes server -> client only; so the client's inbound direction is the busier one.
    """
    return cost.bytes_online if cost.name == "reveal_output" else cost.bytes_online / 2


@dataclass(frozen=True)
class BlockShape:
    """What one pruning block is, for the linear protocol in use."""

    kind: str = "filter"

    def __post_init__(self) -> None:
        if self.kind != "filter":
            raise ValueError(
                f"block shape '{self.kind}' is not supported: Beaver products pack nothing, so blocks are "
                "'filter' (one conv filter or one output neuron); tiles need an HE-packed linear protocol"
            )

    def count(self, weight_shape: tuple[int, ...]) -> int:
        """How many blocks a weight of this shape (outputs first) splits into: one per output."""
        return int(weight_shape[0])

    def blocks(self, node: Node, weight_shape: tuple[int, ...]) -> int:
        """How many blocks a Conv/Gemm layer has."""
        if node.op not in LINEAR_OPS:
            raise GraphError(f"layer '{node.name}' ({node.op}) has no weight blocks")
        return self.count(weight_shape)


FILTER_BLOCKS = BlockShape("filter")


def _shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    shapes = {graph.input_name: tuple(graph.input_shape)} | {name: tuple(spec.shape) for name, spec in graph.public.items()}
    for node in graph.nodes:
        if "out_shape" not in node.attrs:
            raise GraphError(f"layer '{node.name}' has no recorded shape; compile the model with graph_from_onnx")
        shapes[node.output] = tuple(node.attrs["out_shape"])
    return shapes


def graph_cost(graph: Graph, batch: int = 1, protocol: str = DEFAULT_PROTOCOL) -> list[LayerCost]:
    """Per-layer costs in graph order under `protocol`, then the output opening as 'reveal_output'."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    pricing = pricing_for(protocol)
    shapes = _shapes(graph)
    costs = []
    for node in graph.nodes:
        io = CostInputs(graph, batch, tuple(shapes[i] for i in node.inputs))
        cost = op_for(node).cost(node, io, pricing)
        cost.params = sum(size(graph.weight_shapes[w]) for w in node.weights)
        costs.append(cost)
    step = pricing.reveal(batch * size(shapes[graph.output_name]))
    return costs + [LayerCost("reveal_output", "Reveal", bytes_online=step.bytes_online, rounds=step.rounds)]


def total_cost(costs: list[LayerCost]) -> LayerCost:
    """The sum over layers; `modelled` is False when any layer was not."""
    out = LayerCost("total", "-")
    for c in costs:
        for field in ("params", "secure_mults", "bytes_online", "rounds", "relu_count", "poly_count", "comparisons"):
            setattr(out, field, getattr(out, field) + getattr(c, field))
        out.bytes_offline = None if out.bytes_offline is None or c.bytes_offline is None else out.bytes_offline + c.bytes_offline
        out.modelled = out.modelled and c.modelled
    return out


def prunable_layers(graph: Graph) -> list[Node]:
    """Conv/Gemm layers whose blocks may be pruned: all but the last (the logits are kept)."""
    linear = [n for n in graph.nodes if n.op in LINEAR_OPS]
    return linear[:-1]


def pruned_graph(graph: Graph, kept: dict[str, int], block: BlockShape = FILTER_BLOCKS) -> Graph:
    """The public structure left when layer L keeps `kept[L]` of its blocks (a chain graph).

    Removing a filter/neuron shrinks that layer's weight rows and outputs, the channel-wise
    layers after it (activation, pooling), and the input channels (or flattened columns) of
    the next Conv/Gemm. Weights are not needed: costs depend on shapes only.
    """
    prunable = {n.name for n in prunable_layers(graph)}
    unknown = sorted(set(kept) - prunable)
    if unknown:
        raise GraphError(f"cannot prune {unknown}: not a prunable Conv/Gemm layer (the logits layer is never pruned)")
    weight_shapes = dict(graph.weight_shapes)
    nodes: list[Node] = []
    _shapes(graph)  # every node must carry its compiled shape
    # value name -> (channels kept, channels before) on its leading (channel) axis
    channels: dict[str, tuple[int, int]] = {}
    for node in graph.nodes:
        op = op_for(node)
        src = node.inputs[0]
        before_out = list(node.attrs["out_shape"])
        ratio = channels.get(src)
        attrs = dict(node.attrs)
        if len(node.inputs) > 1 and any(channels.get(i) for i in node.inputs):
            raise GraphError(f"layer '{node.name}' joins two branches; block pruning needs a chain of layers")
        if node.op in LINEAR_OPS:
            w_key = node.weights[0]
            w_shape = list(weight_shapes[w_key])
            if ratio is not None:
                have, full = ratio
                if node.op == "Conv":
                    if node.attrs.get("group", 1) != 1:
                        raise GraphError(f"layer '{node.name}' is a grouped convolution; block pruning needs group=1")
                    w_shape[1] = have
                else:
                    w_shape[1] = w_shape[1] // full * have
            n_blocks = block.blocks(node, tuple(graph.weight_shapes[w_key]))
            keep = int(kept.get(node.name, n_blocks))
            if not 1 <= keep <= n_blocks:
                raise GraphError(f"layer '{node.name}' must keep between 1 and {n_blocks} blocks, got {keep}")
            w_shape[0] = keep
            weight_shapes[w_key] = tuple(w_shape)
            for b in node.weights[1:]:
                weight_shapes[b] = (keep,)
            attrs["out_shape"] = [keep] + before_out[1:]
            if keep != n_blocks:
                channels[node.output] = (keep, n_blocks)
        elif ratio is not None and getattr(op, "reshapes", False):
            have, full = ratio
            if len(before_out) != 1:
                raise GraphError(f"layer '{node.name}' reshapes to {before_out}; block pruning supports flattening only")
            attrs["out_shape"] = [before_out[0] // full * have]
            channels[node.output] = (have, full)
        elif ratio is not None and op.channelwise:
            have, full = ratio
            attrs["out_shape"] = [have] + before_out[1:]
            shrink = getattr(op, "pruned_attrs", None)
            if shrink is not None:
                attrs = shrink(node, attrs, have, full)
            for w in node.weights:
                shape = list(weight_shapes[w])
                if shape and shape[0] == full:
                    weight_shapes[w] = tuple([have] + shape[1:])
            channels[node.output] = (have, full)
        elif ratio is not None:
            raise GraphError(f"layer '{node.name}' ({node.op}) after a pruned layer is not channel-wise")
        nodes.append(replace(node, attrs=attrs))
    return replace(graph, nodes=nodes, weight_shapes=weight_shapes, input_range=None, calibration=None)
