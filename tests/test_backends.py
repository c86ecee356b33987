"""Secure ops written once, run on every protocol backend: two parties as two threads of this
process over the in-memory transport, each result opened and compared with plaintext torch.

End-to-end tests with real processes over gRPC are in test_e2e_*.py; these check each op's
secure evaluation and its counters, and that the cost model prices what ran.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tests.helpers.local_dealer import LocalDealer
from tests.helpers.memory_transport import MemoryTransport
from twinfer.protocols.backends import backend_class, protocols
from twinfer.protocols.cost_model import graph_cost, total_cost
from twinfer.protocols.ir.graph import Graph, GraphError, Node
from twinfer.protocols.passes.plain import annotate_shapes, run_plain
from twinfer.protocols.passes.public_inputs import PublicValue
from twinfer.protocols.passes.validation import validate_graph
from twinfer.protocols.roles import CLIENT, RANKS, SERVER
from twinfer.protocols.secure_graph import run_secure
from twinfer.parties.runtime.session_spec import SessionSpec

TOLERANCE = 0.02  # 16 fractional bits, a few products deep


def _graph(input_shape, nodes, weights) -> Graph:
    graph = Graph("x", tuple(input_shape), nodes[-1].output, nodes, {k: tuple(v.shape) for k, v in weights.items()})
    validate_graph(graph)
    annotate_shapes(graph, weights)
    return graph


def run_two_party(
    protocol: str, graph: Graph, weights: dict[str, np.ndarray], x: torch.Tensor, fraction_bits: int = 16, public: dict | None = None
):
    """Share weights (server) and input (client), evaluate (`public`: the public values the graph
    reads, which both parties hold), open to the client; returns (y, counts (with the evaluation's
    `rounds`), online bytes, offline bytes)."""
    transports = MemoryTransport.pair(f"backend-{protocol}", timeout_s=30.0)
    cls = backend_class(protocol)
    dealer = LocalDealer()

    def party(role: str):
        rank = RANKS[role]
        backend = cls.create(rank, transports[rank], dealer.party(rank) if dealer else None, fraction_bits)
        backend.start()
        try:
            shared = {
                k: backend.share(torch.from_numpy(v) if role == SERVER else torch.zeros(v.shape), src=RANKS[SERVER], constant=k)
                for k, v in sorted(weights.items())
            }
            xs = backend.share(x if role == CLIENT else torch.zeros(x.shape), src=RANKS[CLIENT])
            before = transports[rank].metrics.total()
            counts: Counter = Counter()
            y = run_secure(graph, shared, xs, backend, counts=counts, public=public)
            after = transports[rank].metrics.total()
            counts["rounds"] = after.rounds - before.rounds
            return backend.reveal(y, dst=RANKS[CLIENT]), counts, (after.bytes_sent + after.bytes_received) - (
                before.bytes_sent + before.bytes_received
            )
        finally:
            backend.stop()

    with ThreadPoolExecutor(max_workers=2) as pool:
        server, client = pool.submit(party, SERVER), pool.submit(party, CLIENT)
        assert server.result(timeout=120)[0] is None  # the server never learns the output
        y, counts, online = client.result(timeout=120)
    return y, counts, online, (sum(dealer.bytes_sent.values()) if dealer else None)


def _w(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


CASES = {
    "conv_relu": (
        (2, 6, 6),
        [Node("conv", "Conv", ("x",), "c", ("w", "b"), {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "group": 1}),
         Node("relu", "Relu", ("c",), "y")],
        {"w": _w(3, 2, 3, 3), "b": _w(3, seed=1)},
    ),
    "gemm_clip": (
        (8,),
        [Node("fc", "Gemm", ("x",), "h", ("w",)), Node("relu6", "Clip", ("h",), "y", (), {"min": 0.0, "max": 1.5})],
        {"w": _w(5, 8)},
    ),
    "clip_one_bound": ((6,), [Node("floor", "Clip", ("x",), "y", (), {"min": -0.5, "max": None})], {}),
    "maxpool_avgpool": (
        (2, 4, 4),
        [Node("max", "MaxPool", ("x",), "m", (), {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}),
         Node("avg", "AveragePool", ("x",), "a", (), {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}),
         Node("join", "Concat", ("m", "a"), "y", (), {"axis": 1})],
        {},
    ),
    "masked_relu": (
        (2, 3),
        [Node("site", "MaskedRelu", ("x",), "y", (), {"out_shape": [2, 3], "keep": [0, 4], "elements": 2,
                                                       "coeffs": [[0.1, 0.5, 0.2], [0.0, 1.0, -0.1]]})],
        {},
    ),
    "reshape_flatten_gap": (
        (2, 2, 3),
        [Node("gap", "GlobalAveragePool", ("x",), "g"), Node("shape", "Reshape", ("g",), "s", (), {"shape": [0, -1]}),
         Node("back", "Reshape", ("x",), "b", (), {"shape": [0, 2, 6]}), Node("flat", "Flatten", ("b",), "f", (), {"axis": 1}),
         Node("fc", "Gemm", ("f",), "y", ("w",))],
        {"w": _w(3, 12, seed=3)},
    ),
    "affine_add": (
        (3, 2, 2),
        [Node("bn", "Affine", ("x",), "s", ("scale", "shift")), Node("res", "Add", ("s", "x"), "y")],
        {"scale": _w(3, 1, 1), "shift": _w(3, 1, 1, seed=2)},
    ),
    # Attention's pieces: Q K^T of two activations, a softmax over rows of odd length (the max
    # tree carries one), then probabilities x V; LayerNorm over the features; GeLU; mean pooling.
    "attention": (
        (2, 5, 3),
        [Node("kt", "Transpose", ("x",), "kt", (), {"perm": [0, 1, 3, 2]}), Node("qk", "MatMul", ("x", "kt"), "s"),
         Node("softmax", "Softmax", ("s",), "p", (), {"axis": -1}), Node("pv", "MatMul", ("p", "x"), "y")],
        {},
    ),
    "layer_norm_gelu_mean": (
        (4, 6),
        [Node("ln", "LayerNorm", ("x",), "n", ("gamma", "beta"), {"epsilon": 1e-5}), Node("gelu", "Gelu", ("n",), "g"),
         Node("pool", "ReduceMean", ("g",), "y", (), {"axes": [1], "keepdims": 0})],
        {"gamma": _w(6, seed=4), "beta": _w(6, seed=5)},
    ),
}


@pytest.mark.parametrize("protocol", protocols())
@pytest.mark.parametrize("case", sorted(CASES))
def test_secure_op_matches_plaintext_and_its_cost(protocol, case):
    input_shape, nodes, weights = CASES[case]
    graph = _graph(input_shape, nodes, weights)
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(7)) * 2
    expected = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, x)
    y, counts, bytes_online, bytes_offline = run_two_party(protocol, graph, weights, x)
    assert y.shape == expected.shape
    assert torch.max(torch.abs(y - expected)).item() < TOLERANCE, (y, expected)
    predicted = graph_cost(graph, batch=3, protocol=protocol)
    layers = predicted[:-1]  # the reveal is priced apart
    assert counts["relu_count"] == sum(c.relu_count for c in layers)
    assert counts["comparisons"] == sum(c.comparisons for c in layers)
    assert bytes_online == sum(c.bytes_online for c in layers)
    assert counts["rounds"] == sum(c.rounds for c in layers)  # fss: a masked site's ReLUs and squares in one round
    offline = total_cost(layers).bytes_offline
    if offline is not None:  # a backend whose pricing states the dealer's bytes
        assert bytes_offline == offline


@pytest.mark.parametrize("protocol", protocols())
def test_public_operands_are_added_and_scaled_locally(protocol):
    """A mask's bias added (party 0 alone), a masked mean's weights and reciprocal count multiplied
    (both parties, then truncated): no round, no byte but the truncations the cost model prices."""
    nodes = [
        Node("bias", "PublicAdd", ("x", "bias"), "a"),
        Node("kept", "PublicMul", ("a", "kept"), "m"),
        Node("sum", "ReduceSum", ("m",), "s", attrs={"axes": [1], "keepdims": 0}),
        Node("mean", "PublicMul", ("s", "count"), "y"),
    ]
    graph = Graph(
        "x", (4, 6), "y", nodes, {}, public_inputs={"mask": (4,)},
        public={"bias": PublicValue((1, 6), -1024.0, 0.0), "kept": PublicValue((4, 1), 0.0, 1.0), "count": PublicValue((1,), 0.25, 1.0)},
    )  # fmt: skip
    validate_graph(graph)
    annotate_shapes(graph, {})
    kept = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    public = {"bias": torch.randn(3, 1, 6) * 3, "kept": kept.unsqueeze(-1), "count": 1 / kept.sum(1, keepdim=True)}
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(7)) * 2
    expected = run_plain(graph, {}, x, public)
    y, counts, bytes_online, _ = run_two_party(protocol, graph, {}, x, public=public)
    assert torch.max(torch.abs(y - expected)).item() < TOLERANCE, (y, expected)
    layers = graph_cost(graph, batch=3, protocol=protocol)[:-1]
    assert (counts["rounds"], bytes_online) == (sum(c.rounds for c in layers), sum(c.bytes_online for c in layers))


def test_a_public_value_read_by_another_op_is_refused_by_name():
    nodes = [Node("relu", "Relu", ("bias",), "y")]
    with pytest.raises(GraphError, match=r"node 'relu' \(Relu\) reads the public value 'bias'; only PublicAdd and PublicMul do"):
        validate_graph(Graph("x", (6,), "y", nodes, {}, public_inputs={"mask": (6,)}, public={"bias": PublicValue((6,), -1.0, 0.0)}))


@pytest.mark.parametrize("protocol", protocols())
def test_average_pooling_divides_within_one_unit_of_the_encoding(protocol):
    """A 7 x 7 mean of values near 30: an encoded 1/49 (16 bits) alone would be 0.01 off."""
    nodes = [Node("gap", "GlobalAveragePool", ("x",), "g"), Node("shape", "Reshape", ("g",), "y", (), {"shape": [0, -1]})]
    graph = _graph((4, 7, 7), nodes, {})
    x = 30 + torch.rand(2, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    y, *_ = run_two_party(protocol, graph, {}, x)
    assert torch.max(torch.abs(y - x.mean(dim=(2, 3)))).item() <= 2 / 2**16


def test_comparisons_count_every_compared_element():
    """ReLU: one per element; Clip with two bounds: two; a 2x2 max-pool window: three."""
    graph = _graph(*CASES["maxpool_avgpool"][:2], {})
    costs = {c.name: c for c in graph_cost(graph, batch=1)}
    assert costs["max"].comparisons == 2 * 2 * 2 * 3 and costs["max"].relu_count == 0
    graph = _graph(*CASES["gemm_clip"][:2], CASES["gemm_clip"][2])
    costs = {c.name: c for c in graph_cost(graph, batch=2)}
    assert costs["relu6"].comparisons == 2 * 2 * 5 and costs["relu6"].relu_count == 0


def test_a_peer_on_another_protocol_is_refused_by_name():
    """The handshake carries the backend's name; a mismatch is a ProtocolError naming both."""
    from twinfer.parties.errors import ProtocolError
    from twinfer.parties.runtime.session import ClientParty, PartyConfig

    config = PartyConfig(role=CLIENT, session_id="s", server_address="127.0.0.1:9", dealer_address="127.0.0.1:9")
    party = ClientParty(np.zeros((1, 4), np.float32), 1, config)
    party._agree_protocol(np.frombuffer(config.spec.protocol.encode(), np.uint8), SERVER)  # the same: accepted
    with pytest.raises(ProtocolError, match="the server runs protocol 'crypten' but this client runs 'fss-compact'"):
        party._agree_protocol(np.frombuffer(b"crypten", np.uint8), SERVER)
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        PartyConfig(spec=SessionSpec(protocol="nope"), role=CLIENT, session_id="s")
    # a trusted first party is CrypTen's: another protocol asks for a dealer by name
    with pytest.raises(ValueError, match="protocol 'fss-compact' needs a dealer .pass --protocol crypten"):
        PartyConfig(spec=SessionSpec(insecure_trusted_first_party=True), role=CLIENT, session_id="s")
    assert PartyConfig(spec=SessionSpec(insecure_trusted_first_party=True, protocol="crypten"), role=CLIENT, session_id="s").spec.protocol == "crypten"


def test_a_session_spec_is_checked_when_made_and_when_changed():
    from twinfer.deploy.launch.wiring import party_config

    spec = SessionSpec(protocol="crypten", input_range=(0, 255))
    assert spec.input_range == (0.0, 255.0) and spec.backend.name == "crypten"
    with pytest.raises(ValueError, match="truncation must be one of"):
        SessionSpec(truncation="sometimes")
    with pytest.raises(ValueError, match="fraction bits must be 'auto' or an integer from 1 to 30"):
        spec.replace(fraction_bits=40)
    with pytest.raises(ValueError, match="unknown protocol 'fss-tiny'"):
        spec.replace(protocol="fss-tiny")
    # each party gets the session's settings whole; the declared input range is the server's alone
    assert party_config(SERVER, "s", spec).spec == spec
    assert party_config(CLIENT, "s", spec).spec == spec.replace(input_range=None)


@pytest.mark.parametrize("protocol, rounds_per_relu", [("fss", 1), ("fss-compact", 2)])
def test_fss_relu_keys_in_chunks_still_one_round(monkeypatch, protocol, rounds_per_relu):
    """A layer larger than a key chunk asks the dealer for several keys, opens once (fss-compact: then its
    bits once), prices each key's header."""
    import twinfer.protocols.backends.fss.backend as fss_backend
    import twinfer.protocols.backends.fss.pricing as fss_pricing

    monkeypatch.setattr(fss_backend, "KEY_CHUNK", 7)
    monkeypatch.setattr(fss_pricing, "KEY_CHUNK", 7)
    input_shape, nodes, weights = CASES["maxpool_avgpool"]
    graph = _graph(input_shape, nodes, weights)
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(11))
    y, counts, online, offline = run_two_party(protocol, graph, weights, x)
    assert torch.max(torch.abs(y - run_plain(graph, {}, x))).item() < TOLERANCE
    costs = graph_cost(graph, batch=3, protocol=protocol)
    assert online == sum(c.bytes_online for c in costs[:-1]) and offline == total_cost(costs[:-1]).bytes_offline
    assert costs[0].rounds == 2 * rounds_per_relu  # the 2x2 tree: two levels, each its rounds however many chunks
    assert counts["rounds"] == sum(c.rounds for c in costs[:-1])


def _exact_plan(graph: Graph, weights: dict[str, np.ndarray], x: torch.Tensor, protocol: str) -> Graph:
    from twinfer.protocols.backends import backend_class as cls_of
    from twinfer.protocols.passes.encoding import apply_plan, plan_truncations
    from twinfer.protocols.passes.ranges import observed_ranges

    seen = observed_ranges(graph, weights, x.numpy())
    return apply_plan(graph, plan_truncations(graph, seen, 16, "exact", fuses=cls_of(protocol).fuses_truncation))


@pytest.mark.parametrize("protocol", protocols())
@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_truncation_matches_plaintext_and_its_cost(protocol, case):
    """Every layer that truncates does so from the dealer's keys: the same answers, and the rounds and
    bytes the cost model prices (fss: a conv's exact truncation rides in its ReLU's round)."""
    input_shape, nodes, weights = CASES[case]
    x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(7)) * 2
    graph = _exact_plan(_graph(input_shape, nodes, weights), weights, x, protocol)
    exact = {n.name: n.attrs["truncation"] for n in graph.nodes if "truncation" in n.attrs}
    assert exact or case in ("clip_one_bound",)  # every case but a lone clip truncates something
    expected = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, x)
    y, counts, bytes_online, bytes_offline = run_two_party(protocol, graph, weights, x)
    assert torch.max(torch.abs(y - expected)).item() < TOLERANCE, (y, expected)
    layers = graph_cost(graph, batch=3, protocol=protocol)[:-1]
    assert bytes_online == sum(c.bytes_online for c in layers)
    assert counts["rounds"] == sum(c.rounds for c in layers)
    offline = total_cost(layers).bytes_offline
    if offline is not None:
        assert bytes_offline == offline
    if protocol == "fss" and case == "conv_relu":
        assert exact["conv"].get("fused") and counts["rounds"] == 2  # the conv's opening, then the fused ReLU's


def test_crypten_exact_truncation_is_exact_where_its_local_division_fails():
    """10^6 share pairs of 47-bit products whose shares straddle the ring's signed ends, where CrypTen's
    local division of each share is off by 2^48 units: the exact truncation (the dealer's keys, one
    exchange) is within one unit on every one, on CrypTen's own shares."""
    from twinfer.protocols.backends.base import Truncation
    from twinfer.protocols.backends.crypten.patches import load_crypten

    load_crypten()  # crypten imports only with twinfer's torch 2.x fixes
    from crypten.mpc.primitives.arithmetic import ArithmeticSharedTensor

    n, shift = 10**6, 16
    rng = np.random.default_rng(5)
    y = rng.integers(2**40, 2**46, n, dtype=np.int64) * rng.choice(np.array([-1, 1], dtype=np.int64), n)
    x0 = (np.int64(-(2**63)) + rng.integers(0, 2**46, n, dtype=np.int64)).astype(np.int64)
    x0 = np.where(y < 0, -x0 - 1, x0)  # a negative value's shares straddle the other end
    x1 = (y.view(np.uint64) - x0.view(np.uint64)).view(np.int64)
    shares = (x0, x1)
    transports = MemoryTransport.pair("exact-crypten", timeout_s=120.0)
    dealer = LocalDealer()

    def party(rank: int):
        backend = backend_class("crypten").create(rank, transports[rank], dealer.party(rank), 16)
        backend.start()
        try:
            local = ArithmeticSharedTensor.from_shares(torch.from_numpy(shares[rank].copy()), precision=16).div_(2**shift).reveal()
            exact = backend._truncate(ArithmeticSharedTensor.from_shares(torch.from_numpy(shares[rank].copy()), precision=16), 2**shift,
                                      Truncation("exact", 48)).reveal()  # fmt: skip
            return local.numpy(), exact.numpy()
        finally:
            backend.stop()

    with ThreadPoolExecutor(max_workers=2) as pool:
        local, exact = [f.result(timeout=300) for f in [pool.submit(party, r) for r in (0, 1)]][1]
    floor = y >> shift
    assert (np.abs(local - floor) > 1).mean() > 0.3  # the local division fails on these: the test could fail
    assert np.abs(exact - floor).max() <= 1
