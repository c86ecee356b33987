"""Online cost of a compiled graph under twinfer's protocols: multiplications, bytes, rounds.

What each layer sends is read off the protocols that actually run (CrypTen 0.4.1 with two
parties over twinfer's transport, Beaver tuples from the dealer). Bytes are counted as the
runtime counts them (parties/metrics.py): payload bytes of one party, sent plus received, in
the 64-bit ring (8 bytes per element). Every opening is an exchange in which each party sends
its share and receives the other's, so one opened element costs 16 bytes of one party's count.

Per layer, for a batch of N samples:

1. Conv / Gemm with secret weights W and secret input x: one Beaver product
   (Beaver 1991; CrypTen `mpc/primitives/beaver.py`): open x - a and W - b together,
   so 16 * (N * |x| + |W|) bytes and 1 round. The bias is a secret addition (local) and the
   truncation after the product is local with two parties. Secure multiplications: the
   product's multiply-accumulates, N * |out| * |W| / C_out.
2. Polynomial c0 + c1 x + c2 x^2 with public coefficients (MOFHEI's activation, a masked
   site's unkept positions): one Beaver square, open x - r: 16 bytes per element, 1 round.
3. ReLU x * (x >= 0) (CrypTen `common/functions/logic.py`, `mpc/primitives/circuit.py`):
   A2B is a binary adder of the two parties' shares: one AND on the word (2 words opened),
   then the set-propagate-kill tree, log2(64) = 6 levels of an AND on two stacked words (4 words
   each); the sign bit goes back with B2A_single_bit (1 word opened); the final x * bit is a
   Beaver product (2 words). 29 words = 464 bytes per element, 9 rounds.
4. Average pooling, flatten, reshape, additions, public scaling: local, no bytes.
5. The logits are opened to the client only: N * |out| * 8 bytes, 1 round (one way).
6. Max-pooling over windows of n elements (CrypTen `common/functions/maximum.py`, max_method
   "log_reduction"): int(ln n) halving steps, each a comparison (a ReLU without its product:
   27 words, 8 rounds) and a `where` (2 products); a pairwise argmax over the r values left
   ((r - 1) r comparisons, a product tree), a tie-breaking `weighted_index` (a random fixed-point
   value: 16 bit conversions; a product; r comparisons); the max as a product; then, for the
   argmax that max_pool2d discards, an equality test per window element (6 ANDs + B2A: 13
   words, 7 rounds) and another `weighted_index` over the n elements. `maxpool_words` counts it
   (2x2: 370 words, 46 rounds per window). An op with no entry here is `modelled=False`.

The unit that pruning removes is a `BlockShape`. With Beaver products nothing is packed, so a
block is one output neuron or filter (its row of W, its outputs, the next layer's input
channel); `pruned_graph` derives the shapes that remain when blocks are removed, so the cost
of a pruned model is predicted before it is built. Another packing (tiles of an HE-packed
matrix) would be another BlockShape kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .graph import Graph, GraphError, Node

WORD_BYTES = 8  # CrypTen's 64-bit ring
OPEN_BYTES = 2 * WORD_BYTES  # one opened element: send my share, receive theirs
RELU_WORDS = 2 + 4 * 6 + 1 + 2  # adder AND, 6 SPK levels, B2A bit, final product
RELU_ROUNDS = 1 + 6 + 1 + 1
CMP_WORDS, CMP_ROUNDS = RELU_WORDS - 2, RELU_ROUNDS - 1  # x < 0 without the final product
EQ_WORDS, EQ_ROUNDS = 2 * 6 + 1, 6 + 1  # 6 ANDs of one word, B2A of the bit
RAND_WORDS = 16  # crypten.rand: a 16-bit fixed-point value from 16 single-bit B2As, one round
LINEAR_OPS = ("Conv", "Gemm")
LOCAL_OPS = ("AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Add")
CHANNEL_OPS = ("Relu", "MaskedRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "Affine", "Add")


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
    modelled: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def _size(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _input_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    shapes = {graph.input_name: tuple(graph.input_shape)}
    for node in graph.nodes:
        if "out_shape" not in node.attrs:
            raise GraphError(f"layer '{node.name}' has no recorded shape; compile the model with graph_from_onnx")
        shapes[node.output] = tuple(node.attrs["out_shape"])
    return shapes


def maxpool_words(windows: int, n: int) -> tuple[int, int]:
    """Words each party sends, and rounds, for CrypTen's max_pool2d over `windows` windows of n."""
    if n < 2:
        return 0, 0
    words = rounds = 0

    def cmp(e: int) -> None:
        nonlocal words, rounds
        words, rounds = words + CMP_WORDS * e, rounds + CMP_ROUNDS

    def mul(e: int) -> None:
        nonlocal words, rounds
        words, rounds = words + 2 * e, rounds + 1

    def weighted_index(r: int) -> None:
        nonlocal words, rounds
        words, rounds = words + RAND_WORDS * windows, rounds + 1
        mul(windows)
        cmp(windows * r)

    m = n
    for _ in range(int(math.log(n))):  # CrypTen's step count uses the natural logarithm
        half = m // 2
        cmp(windows * half)
        mul(windows * half)  # where(x >= y, x, y): (1 - c) * y, then x * c
        mul(windows * half)
        m = half + m % 2
    cmp(windows * m * (m - 1))  # pairwise: every value against the m - 1 others
    size = m - 1
    while size > 1:  # product over the comparisons
        mul(windows * m * (size // 2))
        size = size // 2 + size % 2
    weighted_index(m)
    mul(windows * m)  # the max, as (values * one-hot).sum()
    words, rounds = words + EQ_WORDS * windows * n, rounds + EQ_ROUNDS  # argmax: values == max
    weighted_index(n)
    return words, rounds


def layer_cost(node: Node, graph: Graph, shapes: dict[str, tuple[int, ...]], batch: int) -> LayerCost:
    """Cost of one node for `batch` samples."""
    x = _size(shapes[node.inputs[0]])
    out = _size(node.attrs["out_shape"])
    params = sum(_size(graph.weight_shapes[w]) for w in node.weights)
    cost = LayerCost(node.name, node.op, params=params)
    if node.op in LINEAR_OPS:
        w = _size(graph.weight_shapes[node.weights[0]])
        cost.bytes_online = OPEN_BYTES * (batch * x + w)
        cost.rounds = 1
        cost.secure_mults = batch * out * (w // graph.weight_shapes[node.weights[0]][0])
    elif node.op == "Relu":
        cost.relu_count = batch * out
        cost.bytes_online = cost.relu_count * RELU_WORDS * OPEN_BYTES
        cost.rounds = RELU_ROUNDS
        cost.secure_mults = cost.relu_count
    elif node.op == "MaskedRelu":
        kept = int(node.attrs["elements"])
        cost.relu_count = batch * kept
        cost.poly_count = batch * (out - kept)
        cost.bytes_online = (cost.relu_count * RELU_WORDS + cost.poly_count) * OPEN_BYTES
        cost.rounds = (RELU_ROUNDS if kept else 0) + (1 if out > kept else 0)
        cost.secure_mults = cost.relu_count + cost.poly_count
    elif node.op == "Affine":  # secret per-channel scale: a Beaver product with broadcasting
        scale = _size(graph.weight_shapes[node.weights[0]])
        cost.bytes_online = OPEN_BYTES * (batch * x + scale)
        cost.rounds = 1
        cost.secure_mults = batch * out
    elif node.op == "Add" and len(node.inputs) == 1:
        pass  # a secret constant added: local
    elif node.op in LOCAL_OPS:
        pass
    elif node.op == "MaxPool":
        n = int(np.prod(node.attrs["kernel"]))
        words, cost.rounds = maxpool_words(batch * out, n)
        cost.bytes_online = words * OPEN_BYTES
    else:
        cost.modelled = False
    return cost


def graph_cost(graph: Graph, batch: int = 1) -> list[LayerCost]:
    """Per-layer costs in graph order, then the output opening as layer 'reveal_output'."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    shapes = _input_shapes(graph)
    costs = [layer_cost(node, graph, shapes, batch) for node in graph.nodes]
    reveal = LayerCost("reveal_output", "Reveal", bytes_online=batch * _size(shapes[graph.output_name]) * WORD_BYTES, rounds=1)
    return costs + [reveal]


def total_cost(costs: list[LayerCost]) -> LayerCost:
    """The sum over layers; `modelled` is False when any layer was not."""
    out = LayerCost("total", "-")
    for c in costs:
        for field in ("params", "secure_mults", "bytes_online", "rounds", "relu_count", "poly_count"):
            setattr(out, field, getattr(out, field) + getattr(c, field))
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
    _input_shapes(graph)  # every node must carry its compiled shape
    # value name -> (channels kept, channels before) on its leading (channel) axis
    channels: dict[str, tuple[int, int]] = {}
    for node in graph.nodes:
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
        elif ratio is not None and node.op in CHANNEL_OPS + ("Flatten", "Reshape"):
            have, full = ratio
            if node.op in ("Flatten", "Reshape"):
                if len(before_out) != 1:
                    raise GraphError(f"layer '{node.name}' reshapes to {before_out}; block pruning supports flattening only")
                attrs["out_shape"] = [before_out[0] // full * have]
            else:
                attrs["out_shape"] = [have] + before_out[1:]
                if node.op == "Relu":
                    attrs["elements"] = _size(attrs["out_shape"])
                if node.op == "MaskedRelu":
                    attrs = _shrink_site(node, attrs, have, full)
                for w in node.weights:
                    shape = list(weight_shapes[w])
                    if shape and shape[0] == full:
                        weight_shapes[w] = tuple([have] + shape[1:])
            channels[node.output] = (have, full)
        elif ratio is not None:
            raise GraphError(f"layer '{node.name}' ({node.op}) after a pruned layer is not channel-wise")
        nodes.append(replace(node, attrs=attrs))
    return Graph(graph.input_name, graph.input_shape, graph.output_name, nodes, weight_shapes)


def _shrink_site(node: Node, attrs: dict, have: int, full: int) -> dict:
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
