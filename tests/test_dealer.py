"""The dealer over real gRPC: seeds, CrypTen's TTP correlations in the ring, errors and shared error ids."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from twinfer.protocols.backends.crypten.patches import load_crypten
from twinfer.parties.dealer.core import DealerCore
from twinfer.parties.dealer.service import add_dealer_servicer
from twinfer.protocols.backends.crypten.correlations import decode_request as _decode_args
from twinfer.protocols.backends.crypten.ttp import TtpClient
from twinfer.parties.dealer.client import DealerClient
from twinfer.parties.errors import InputError, PeerError, ProtocolError
from twinfer.parties.metrics import Metrics
from twinfer.parties.wire.transport import TransportOptions, start_server

crypten = load_crypten()
from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element  # noqa: E402
from crypten.common.util import count_wraps  # noqa: E402

OPTS = TransportOptions(recv_timeout_s=5.0, connect_timeout_s=2.0)
_ids = itertools.count()


@pytest.fixture(scope="module")
def dealer() -> Iterator[tuple[DealerCore, str]]:
    servicer = DealerCore()
    server, port = start_server([(servicer, add_dealer_servicer)], "127.0.0.1:0", OPTS)
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


class Parties:
    def __init__(self, servicer: DealerCore, address: str) -> None:
        self.session_id = f"session-{next(_ids)}"
        servicer.open_session(self.session_id)
        self.address = address
        self.server = DealerClient(address, session_id=self.session_id, role="server", options=OPTS, metrics=Metrics(), protocol="crypten")
        self.client = DealerClient(address, session_id=self.session_id, role="client", options=OPTS, metrics=Metrics(), protocol="crypten")
        # what CrypTen's TTP provider calls, over each party's dealer client
        self.ttp_server, self.ttp_client = TtpClient(self.server), TtpClient(self.client)

        self.open = [self.server, self.client]

    def close(self, error=None) -> None:
        for party in self.open:
            party.close(error)
        self.open = []


@pytest.fixture
def parties(dealer) -> Iterator[Parties]:
    p = Parties(*dealer)
    yield p
    p.close()


def ring(size, gen):
    return generate_random_ring_element(size, generator=gen)


def bits(size, gen, bitlength=None):
    return generate_kbit_random_tensor(size, bitlength=bitlength, generator=gen)


def additive_triple(parties: Parties, size0, size1, op: str, **kwargs):
    """Both parties' shares, drawn exactly as CrypTen's TrustedThirdParty.generate_additive_triple does."""
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator(None)
    a0, b0 = ring(size0, g0), ring(size1, g0)
    c0 = parties.ttp_server.ttp_request("additive", None, size0, size1, op, **kwargs)
    a1, b1 = ring(size0, g1), ring(size1, g1)
    c_size = getattr(torch, op)(a1, b1, **kwargs).size()
    c1 = ring(c_size, g1)
    return (a0, a1), (b0, b1), (c0, c1)


# -- CrypTen's TTP functions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size0,size1,op,kwargs",
    [
        (torch.Size([4, 5]), torch.Size([4, 5]), "mul", {}),
        (torch.Size([3, 1]), torch.Size([1, 6]), "mul", {}),  # broadcasting
        (torch.Size([3, 4]), torch.Size([4, 2]), "matmul", {}),
        (torch.Size([2, 3, 4]), torch.Size([4, 5]), "matmul", {}),
        (torch.Size([1, 2, 6, 6]), torch.Size([3, 2, 3, 3]), "conv2d", {"stride": 2, "padding": 1}),
        (torch.Size([2, 1, 5, 5]), torch.Size([2, 1, 2, 2]), "conv2d", {}),
    ],
)
def test_additive_triple(parties, size0, size1, op, kwargs):
    (a0, a1), (b0, b1), (c0, c1) = additive_triple(parties, size0, size1, op, **kwargs)
    a, b = a0 + a1, b0 + b1  # int64 arithmetic wraps: this is the ring Z / 2**64
    expected = getattr(torch, op)(a, b, **kwargs)
    assert c0.dtype == torch.int64 and c0.shape == expected.shape == c1.shape
    assert torch.equal(c0 + c1, expected)
    # The shares look random: neither share alone is the product.
    assert not torch.equal(c0, expected) and not torch.equal(c1, expected)


def test_consecutive_triples_stay_in_step(parties):
    for _ in range(3):
        (a0, a1), (b0, b1), (c0, c1) = additive_triple(parties, torch.Size([7]), torch.Size([7]), "mul")
        assert torch.equal(c0 + c1, (a0 + a1) * (b0 + b1))


def test_a_triple_out_of_step_is_wrong(parties):
    # The check above can fail: party 1 drawing in another order breaks the correlation.
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
    size = torch.Size([16])
    a0, b0 = ring(size, g0), ring(size, g0)
    c0 = parties.ttp_server.ttp_request("additive", None, size, size, "mul")
    b1, a1 = ring(size, g1), ring(size, g1)  # swapped
    c1 = ring(size, g1)
    assert not torch.equal(c0 + c1, (a0 + a1) * (b0 + b1))


def test_square(parties):
    size = torch.Size([3, 4])
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
    r0 = ring(size, g0)
    r2_0 = parties.ttp_server.ttp_request("square", None, size)
    r1 = ring(size, g1)
    r2_1 = ring(size, g1)
    r = r0 + r1
    assert torch.equal(r2_0 + r2_1, r * r)


@pytest.mark.parametrize("size0,size1", [(torch.Size([5, 3]), torch.Size([5, 3])), (torch.Size([4, 1]), torch.Size([1, 3]))])
def test_binary_triple(parties, size0, size1):
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
    a0, b0 = bits(size0, g0), bits(size1, g0)
    c0 = parties.ttp_server.ttp_request("binary", None, size0, size1)
    a1, b1 = bits(size0, g1), bits(size1, g1)
    c1 = bits(torch.broadcast_tensors(a1, b1)[0].size(), g1)
    assert torch.equal(c0 ^ c1, (a0 ^ a1) & (b0 ^ b1))


def test_wraps(parties):
    size = torch.Size([50])
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
    r0 = ring(size, g0)
    theta0 = parties.ttp_server.ttp_request("wraps", None, size)
    r1 = ring(size, g1)
    theta1 = ring(size, g1)
    wraps = count_wraps([r0, r1])
    assert torch.equal(theta0 + theta1, wraps)
    assert wraps.abs().sum() > 0  # random 64-bit shares wrap about half the time


def test_b2a(parties):
    size = torch.Size([6, 7])
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
    rB0 = bits(size, g0, bitlength=1)
    rA0 = parties.ttp_server.ttp_request("B2A", None, size)
    rB1 = bits(size, g1, bitlength=1)
    rA1 = ring(size, g1)
    rB = rB0 ^ rB1
    assert set(rB.unique().tolist()) <= {0, 1}
    assert torch.equal(rA0 + rA1, rB)


def test_large_tuple_arrives_in_chunks(parties):
    size = torch.Size([700_000])  # 5.6 MB > the dealer's 4 MiB reply chunk
    g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
    r0 = ring(size, g0)
    r2_0 = parties.ttp_server.ttp_request("square", None, size)
    r1, r2_1 = ring(size, g1), ring(size, g1)
    assert torch.equal(r2_0 + r2_1, (r0 + r1) * (r0 + r1))


def test_zero_dim_and_empty_tuples(parties):
    for size in (torch.Size([]), torch.Size([0, 3])):
        g0, g1 = parties.ttp_server.get_generator(), parties.ttp_client.get_generator()
        r0 = ring(size, g0)
        r2_0 = parties.ttp_server.ttp_request("square", None, size)
        r1, r2_1 = ring(size, g1), ring(size, g1)
        assert r2_0.shape == size
        assert torch.equal(r2_0 + r2_1, (r0 + r1) * (r0 + r1))


def test_bytes_offline_counted(parties):
    before = parties.server.metrics.total().bytes_offline
    assert before == 8  # the seed
    assert parties.client.metrics.total().bytes_offline == 8
    size = torch.Size([10, 3])
    ring(size, parties.ttp_server.get_generator())
    parties.ttp_server.ttp_request("square", None, size)
    assert parties.server.metrics.total().bytes_offline == 8 + 30 * 8
    g0 = parties.ttp_server.get_generator()
    ring(size, g0), ring(size, g0)
    parties.ttp_server.ttp_request("additive", None, size, size, "mul")
    assert parties.server.metrics.total().bytes_offline == 8 + 2 * 30 * 8


def test_each_tuple_has_its_own_cpu_generator(parties):
    first, second = parties.ttp_server.get_generator(), parties.ttp_server.get_generator("cpu")
    assert first.device.type == second.device.type == "cpu"
    # Tuple k's randomness derives from (seed, k): consecutive tuples differ, and both
    # parties' generators for the same k differ (different seeds).
    assert not torch.equal(ring(torch.Size([4]), first), ring(torch.Size([4]), second))
    assert not torch.equal(ring(torch.Size([4]), parties.ttp_client.get_generator()), ring(torch.Size([4]), first))
    with pytest.raises(ValueError, match="CPU"):
        parties.ttp_server.get_generator("meta")


# -- errors ---------------------------------------------------------------------------------------


def test_second_seed_for_a_role_is_refused(dealer, parties):
    """A role asked for twice: a reused session id, a protocol error (exit code 6), not a peer failure."""
    _, address = dealer
    with pytest.raises(ProtocolError, match="server already has its seed"):
        DealerClient(address, session_id=parties.session_id, role="server", options=OPTS, metrics=Metrics())


def test_unknown_role_is_refused(dealer, parties):
    _, address = dealer
    with pytest.raises(PeerError, match="unknown role 'dealer'"):
        DealerClient(address, session_id=parties.session_id, role="dealer", options=OPTS, metrics=Metrics())


def test_unknown_session(dealer, parties):
    _, address = dealer
    with pytest.raises(ProtocolError, match="unknown session 'no-such-session'"):
        DealerClient(address, session_id="no-such-session", role="server", options=OPTS, metrics=Metrics())
    # a tuple request naming an unknown session is refused the same way
    parties.server.session_id = "other-session-7"
    try:
        with pytest.raises(ProtocolError, match="unknown session 'other-session-7'"):
            parties.ttp_server.ttp_request("square", None, torch.Size([2]))
    finally:
        parties.server.session_id = parties.session_id


def test_dealer_not_reachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = TransportOptions(recv_timeout_s=1.0, connect_timeout_s=0.3)
    with pytest.raises(PeerError, match="not reachable"):
        DealerClient(f"127.0.0.1:{port}", session_id="s", role="server", options=opts, metrics=Metrics())


@pytest.mark.parametrize(
    "function,args,kwargs,message",
    [
        ("frobnicate", (torch.Size([2]),), {}, "unknown tuple function 'frobnicate'"),
        ("additive", (torch.Size([2]), torch.Size([2]), "exp"), {}, "op must be one of"),
        ("additive", (torch.Size([2]), torch.Size([2])), {}, "op must be one of"),
        ("additive", (torch.Size([2]), torch.Size([2]), ["mul"]), {}, "op must be one of"),
        ("square", ([-1, 2],), {}, "non-negative ints"),
        ("square", ([2.5],), {}, "non-negative ints"),
        ("square", ("abc",), {}, "non-negative ints"),
        ("binary", (torch.Size([2]),), {}, "needs 2 sizes"),
        ("additive", (torch.Size([2, 3]), torch.Size([4, 5]), "matmul"), {}, "cannot make 'additive'"),
        ("additive", (torch.Size([1, 1, 4, 4]), torch.Size([1, 1, 2, 2]), "conv2d"), {"bogus": 1}, "cannot make"),
    ],
)
def test_bad_requests_get_the_dealers_message(parties, function, args, kwargs, message):
    with pytest.raises(PeerError, match=message) as info:
        parties.ttp_server.ttp_request(function, None, *args, **kwargs)
    assert info.value.origin == "dealer"
    assert "dealer:" in str(info.value)


def test_unsendable_argument_is_refused_locally(parties):
    with pytest.raises(TypeError, match="Tensor"):
        parties.ttp_server.ttp_request("square", None, torch.zeros(2))


def test_failure_reported_by_one_role_reaches_the_other_with_its_id(dealer, parties):
    servicer, _ = dealer
    failure = InputError("the input has the wrong shape", origin="client")
    parties.client.close(failure)
    parties.open.remove(parties.client)
    assert servicer.stats(parties.session_id)["finished"]
    with pytest.raises(PeerError) as info:
        parties.ttp_server.ttp_request("square", None, torch.Size([2]))
    assert failure.error_id in str(info.value)
    assert info.value.error_id == failure.error_id
    assert "wrong shape" in str(info.value) and "client" in str(info.value)


def test_both_closing_finishes_the_session(dealer):
    servicer, address = dealer
    p = Parties(servicer, address)
    ring(torch.Size([2]), p.ttp_server.get_generator())
    p.ttp_server.ttp_request("square", None, torch.Size([2]))
    assert not servicer.stats(p.session_id)["finished"]
    p.close()
    stats = servicer.stats(p.session_id)
    assert stats["finished"] and stats["tuples"] == 1
    assert stats["bytes_sent"] == 8 + 8 + 2 * 8
    session = servicer.wait_finished(p.session_id, timeout_s=1.0)
    assert session.error is None


# -- argument decoding ----------------------------------------------------------------------------


def _payload(*args, **kwargs) -> str:
    return json.dumps({"args": list(args), "kwargs": kwargs})


def test_decode_args_accepts_crypten_requests():
    args, kwargs = _decode_args("additive", _payload([1, 2, 6, 6], [3, 2, 3, 3], "conv2d", stride=2, padding=1))
    assert args == [torch.Size([1, 2, 6, 6]), torch.Size([3, 2, 3, 3]), "conv2d"]
    assert isinstance(args[0], torch.Size) and isinstance(args[1], torch.Size)
    assert kwargs == {"stride": 2, "padding": 1}
    args, kwargs = _decode_args("B2A", _payload([4]))
    assert args == [torch.Size([4])] and kwargs == {}
    args, _ = _decode_args("binary", _payload([2, 3], [2, 3]))
    assert args == [torch.Size([2, 3]), torch.Size([2, 3])]
    assert _decode_args("square", _payload([]))[0] == [torch.Size([])]


@pytest.mark.parametrize(
    "function,args_json",
    [
        ("exp", _payload([2])),
        ("", _payload([2])),
        ("square", "{not json"),
        ("square", "[1, 2]"),
        ("square", json.dumps({"args": 5})),
        ("square", json.dumps({"args": [[2]], "kwargs": [1, 2]})),
        ("square", _payload()),
        ("square", _payload(3)),
        ("square", _payload([2, -1])),
        ("square", _payload([2, 2**31])),
        ("square", _payload([2.0])),
        ("square", _payload(["2"])),
        ("binary", _payload([2])),
        ("binary", _payload([2], None)),
        ("additive", _payload([2], [2])),
        ("additive", _payload([2], [2], "exp")),
        ("additive", _payload([2], [2], "__class__")),
        ("additive", _payload([2], [2], ["mul"])),
    ],
)
def test_decode_args_rejects_bad_input(function, args_json):
    with pytest.raises(ValueError):
        _decode_args(function, args_json)


# -- the offline phase: tuples made before they are needed ----------------------------------------


def _batch_of_triples(parties: Parties, sizes: list[int]) -> None:
    for n in sizes:
        (a0, a1), (b0, b1), (c0, c1) = additive_triple(parties, torch.Size([n]), torch.Size([n]), "mul")
        assert torch.equal(c0 + c1, (a0 + a1) * (b0 + b1))


def test_second_batch_of_a_size_is_prefetched(parties):
    server = parties.server
    for batch in range(3):
        server.begin_batch(8)
        _batch_of_triples(parties, [5, 6, 7])
        server.end_batch(8)
    assert server.fetched_on_demand == 3  # the first batch, which recorded the plan
    assert server.prefetched_used == 6


def test_prefetch_ahead_makes_the_next_batch_between_batches(parties):
    server = parties.server
    server.prefetch_ahead = True
    for batch in range(3):
        server.begin_batch(8, 8)
        assert server._launched == {3 * b for b in range(1, batch + 1)}  # this batch's, never the next one's
        _batch_of_triples(parties, [5, 6, 7])
        server.end_batch(8, 8 if batch < 2 else None)
        if batch < 2:  # end_batch returns once the next batch's parts are all here
            assert sorted(server._ready) == [3 * (batch + 1) + i for i in range(3)]
            assert not server._expected - server._ready.keys()
    assert server.fetched_on_demand == 3 and server.prefetched_used == 6


def test_prefetched_tuple_for_another_request_is_not_used(parties):
    server = parties.server
    server.begin_batch(8)
    _batch_of_triples(parties, [5, 6])
    server.end_batch(8)
    server.begin_batch(8)  # same batch size, but the requests differ: sizes 5 then 9
    _batch_of_triples(parties, [5, 9])
    server.end_batch(8)
    assert server.prefetched_used == 1 and server.fetched_on_demand == 3


def test_prefetch_off_fetches_everything_on_demand(dealer):
    servicer, address = dealer
    p = Parties(servicer, address)
    p.server.prefetch_enabled = False
    try:
        for _ in range(2):
            p.server.begin_batch(4)
            _batch_of_triples(p, [3])
            p.server.end_batch(4)
        assert p.server.prefetched_used == 0 and p.server.fetched_on_demand == 2
    finally:
        p.close()


# -- the correlation registry: structured payloads, who may ask ---------------------------------


def test_correlation_frames_round_trip_named_arrays_across_chunks():
    from twinfer.parties.proto import twinfer_pb2 as pb
    from twinfer.parties.wire.framing import correlation_from_frames, correlation_to_frames, framed_decoder

    arrays = {
        "share": np.arange(37, dtype=np.int64).reshape(37, 1) - 5,
        "key": np.frombuffer(bytes(range(256)) * 3, dtype=np.uint8),
        "empty": np.zeros((0, 4), dtype=np.uint64),
        "bits": np.array([[1, 0], [0, 1]], dtype=np.uint8),
    }
    decode = framed_decoder(pb.TupleReply)
    frames = [decode(f) for f in correlation_to_frames(9, arrays, chunk_bytes=100)]
    assert len(frames) == -(-sum(a.nbytes for a in arrays.values()) // 100) and all(f.index == 9 for f in frames)
    back = correlation_from_frames(frames)
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name], array)
    with pytest.raises(PeerError, match="dealer sent .* bytes for arrays"):
        correlation_from_frames(frames[:-1])  # a chunk lost: refused, never a short array


def test_a_party_may_ask_only_for_the_kinds_it_is_allowed(parties):
    """CrypTen's tuples are made for the server; the client derives its part from its seed."""
    from twinfer.parties.errors import AuthError

    with pytest.raises(AuthError, match="the client may not ask for 'square'"):
        parties.client.request("square", _payload([2]), parties.client.next_index())
    assert parties.server.request("square", _payload([2]), parties.server.next_index())["share"].shape == (2,)


def test_a_seed_for_an_unknown_protocol_is_refused(dealer, parties):
    _, address = dealer
    with pytest.raises(PeerError, match="unknown protocol 'nope'"):
        DealerClient(address, session_id=parties.session_id, role="server", options=OPTS, metrics=Metrics(), protocol="nope")


def test_crypten_seeds_carry_no_aes_key(parties):
    """Only backends that key AES-CTR streams get the 128-bit seed; the offline bytes say what was sent."""
    assert parties.server.key == b"" and parties.server.metrics.total().bytes_offline == 8


def test_the_dealer_client_is_the_correlation_source_backends_declare(parties):
    from twinfer.protocols.backends.channels import CorrelationSource

    assert isinstance(parties.server, CorrelationSource) and isinstance(parties.client, CorrelationSource)
