"""CrypTen's communicator interface for two parties over an in-memory Transport pair."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.distributed import ReduceOp

from twinfer.protocols.backends.crypten.patches import load_crypten

crypten = load_crypten()
from twinfer.protocols.backends.crypten.communicator import TransportCommunicator  # noqa: E402  (needs CrypTen loaded)
from twinfer.parties.errors import PeerTimeoutError
from helpers.memory_transport import MemoryTransport

TOP = 2**63 - 1
BOTTOM = -(2**63)


@pytest.fixture
def verbose():
    previous = crypten.cfg.communicator.verbose
    crypten.cfg.communicator.verbose = True
    yield
    crypten.cfg.communicator.verbose = previous


@pytest.fixture
def comms(verbose) -> tuple[TransportCommunicator, TransportCommunicator]:
    server, client = MemoryTransport.pair("comm-test", timeout_s=5.0)
    return TransportCommunicator(server, 0), TransportCommunicator(client, 1)


def both(comms, fn: Callable[[TransportCommunicator], object]) -> list:
    """Run `fn` on both parties at once, as two processes would; re-raise either party's error."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(fn, c) for c in comms]
        return [f.result(timeout=10) for f in futures]


def test_rank_must_be_0_or_1():
    t, _ = MemoryTransport.pair()
    with pytest.raises(ValueError, match="rank"):
        TransportCommunicator(t, 2)


def test_identity(comms):
    c0, c1 = comms
    assert (c0.get_rank(), c1.get_rank()) == (0, 1)
    assert c0.get_world_size() == c1.get_world_size() == 2
    assert (c0.get_name(), c1.get_name()) == ("server", "client")


def test_all_reduce_sum(comms):
    x = [torch.tensor([1, -2, 3]), torch.tensor([10, 20, -30])]
    r_default = both(comms, lambda c: c.all_reduce(x[c.rank]))
    r_sum = both(comms, lambda c: c.all_reduce(x[c.rank], op=ReduceOp.SUM))
    for r in r_default + r_sum:
        assert torch.equal(r, torch.tensor([11, 18, -27]))


def test_all_reduce_wraps_around_in_the_ring(comms):
    x = [torch.tensor([TOP, BOTTOM, TOP, -5]), torch.tensor([1, -1, TOP, 2**62])]
    expected = torch.tensor([BOTTOM, TOP, -2, 2**62 - 5])
    for r in both(comms, lambda c: c.all_reduce(x[c.rank])):
        assert r.dtype == torch.int64
        assert torch.equal(r, expected)


def test_all_reduce_bxor(comms):
    x = [torch.tensor([0b1100, -1, 7]), torch.tensor([0b1010, BOTTOM, 7])]
    expected = torch.tensor([0b0110, TOP, 0])
    for r in both(comms, lambda c: c.all_reduce(x[c.rank], op=ReduceOp.BXOR)):
        assert torch.equal(r, expected)


def test_all_reduce_keeps_shapes_including_0d(comms):
    x = [torch.tensor(5), torch.tensor(-7)]
    for r in both(comms, lambda c: c.all_reduce(x[c.rank])):
        assert r.shape == () and r.item() == -2
    y = [torch.ones(2, 3, 4, dtype=torch.long), torch.full((2, 3, 4), 2, dtype=torch.long)]
    for r in both(comms, lambda c: c.all_reduce(y[c.rank])):
        assert torch.equal(r, torch.full((2, 3, 4), 3, dtype=torch.long))


def test_unsupported_reduce_op(comms):
    c0, c1 = comms
    c1.transport.send("all_reduce", torch.zeros(1, dtype=torch.long).numpy())
    with pytest.raises(NotImplementedError, match="not supported"):
        c0.all_reduce(torch.zeros(1, dtype=torch.long), op=ReduceOp.MAX)


def test_all_reduce_batched(comms):
    x = [
        [torch.tensor([1, 2]), torch.tensor([[TOP]]), torch.zeros(0, dtype=torch.long)],
        [torch.tensor([3, 4]), torch.tensor([[1]]), torch.zeros(0, dtype=torch.long)],
    ]
    for r in both(comms, lambda c: c.all_reduce(x[c.rank], batched=True)):
        assert len(r) == 3
        assert torch.equal(r[0], torch.tensor([4, 6]))
        assert torch.equal(r[1], torch.tensor([[BOTTOM]]))
        assert r[2].shape == (0,)
    xor = both(comms, lambda c: c.all_reduce(x[c.rank][:2], op=ReduceOp.BXOR, batched=True))
    assert torch.equal(xor[0][0], torch.tensor([2, 6])) and torch.equal(xor[1][1], torch.tensor([[TOP ^ 1]]))


@pytest.mark.parametrize("dst", [0, 1])
def test_reduce(comms, dst):
    x = [torch.tensor([TOP, 2]), torch.tensor([1, 3])]
    r = both(comms, lambda c: c.reduce(x[c.rank], dst))
    assert r[1 - dst] is None
    assert torch.equal(r[dst], torch.tensor([BOTTOM, 5]))
    rb = both(comms, lambda c: c.reduce([x[c.rank], 2 * x[c.rank]], dst, batched=True))
    assert rb[1 - dst] is None
    assert torch.equal(rb[dst][0], torch.tensor([BOTTOM, 5]))
    assert torch.equal(rb[dst][1], torch.tensor([0, 10]))  # 2 * TOP + 2 == 2**64, which is 0 in the ring


@pytest.mark.parametrize("src", [0, 1])
def test_broadcast(comms, src):
    value = torch.arange(6, dtype=torch.long).reshape(2, 3) - 3
    inputs = [value if c == src else torch.zeros(2, 3, dtype=torch.long) for c in (0, 1)]
    for r in both(comms, lambda c: c.broadcast(inputs[c.rank], src)):
        assert r.shape == (2, 3) and torch.equal(r, value)
    floats = torch.tensor([0.5, -1.25])
    finputs = [floats if c == src else torch.zeros(2) for c in (0, 1)]
    for r in both(comms, lambda c: c.broadcast(finputs[c.rank], src)):
        assert r.dtype == torch.float32 and torch.equal(r, floats)


@pytest.mark.parametrize("src", [0, 1])
def test_broadcast_batched(comms, src):
    values = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([TOP]), torch.tensor(9)]
    empty = [torch.zeros_like(v) for v in values]
    inputs = [values if c == src else empty for c in (0, 1)]
    for r in both(comms, lambda c: c.broadcast(inputs[c.rank], src, batched=True)):
        assert len(r) == 3
        for got, want in zip(r, values):
            assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("dst", [0, 1])
def test_gather(comms, dst):
    x = [torch.tensor([10, 11]), torch.tensor([20, 21])]
    r = both(comms, lambda c: c.gather(x[c.rank], dst))
    assert r[1 - dst] == [None]
    assert len(r[dst]) == 2
    assert torch.equal(r[dst][0], x[0]) and torch.equal(r[dst][1], x[1])  # ordered by rank


def test_all_gather(comms):
    x = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    for r in both(comms, lambda c: c.all_gather(x[c.rank])):
        assert len(r) == 2 and torch.equal(r[0], x[0]) and torch.equal(r[1], x[1])


@pytest.mark.parametrize("src", [0, 1])
def test_scatter(comms, src):
    pieces = [torch.tensor([100, 101]), torch.tensor([200, 201])]
    inputs = [pieces if c == src else None for c in (0, 1)]
    r = both(comms, lambda c: c.scatter(inputs[c.rank], src))
    assert torch.equal(r[0], pieces[0]) and torch.equal(r[1], pieces[1])


def test_barrier(comms):
    assert both(comms, lambda c: c.barrier()) == [None, None]
    # a barrier must wait for the peer: alone it times out
    solo_a, _ = MemoryTransport.pair(timeout_s=0.2)
    with pytest.raises(PeerTimeoutError, match="barrier"):
        TransportCommunicator(solo_a, 0).barrier()


def test_send_recv_and_isend_irecv(comms):
    c0, c1 = comms
    c0.send(torch.tensor([[1, 2, 3]]), 1)
    got = c1.recv(torch.empty(1, 3, dtype=torch.long), 0)
    assert torch.equal(got, torch.tensor([[1, 2, 3]]))

    handle = c1.isend(torch.tensor([TOP, BOTTOM]), 0)
    handle.wait()
    assert handle.is_completed()
    target = torch.zeros(2, dtype=torch.long)
    pending = c0.irecv(target, 1)
    assert not pending.is_completed()
    pending.wait()
    assert pending.is_completed()
    assert torch.equal(target, torch.tensor([TOP, BOTTOM]))  # received into the caller's tensor


OBJECTS = [
    7,
    -(2**40),
    torch.Size([2, 3, 4]),
    torch.Size([]),
    [1, [2, [3, "x"]], {"k": 1.5}],
    [torch.Size([5]), [torch.Size([1, 2])]],
    {"size": torch.Size([3]), "n": None},
]


@pytest.mark.parametrize("obj", OBJECTS, ids=range(len(OBJECTS)))
def test_objects_round_trip(comms, obj):
    c0, c1 = comms
    c0.send_obj(obj, 1)
    got = c1.recv_obj(0)
    assert got == obj
    assert type(got) is type(obj)
    if isinstance(obj, list):
        assert type(got[0]) is type(obj[0])
        assert type(got[1]) is type(obj[1])


@pytest.mark.parametrize("src", [0, 1])
def test_broadcast_obj(comms, src):
    obj = [torch.Size([4, 4]), 3]
    r = both(comms, lambda c: c.broadcast_obj(obj if c.rank == src else None, src))
    for got in r:
        assert got == obj and isinstance(got[0], torch.Size)


class _Secret:
    pickled = False

    def __reduce__(self):
        _Secret.pickled = True
        raise AssertionError("pickled")


@pytest.mark.parametrize("obj,name", [({1, 2}, "set"), (_Secret(), "_Secret"), ([1, [_Secret()]], "_Secret")])
def test_unsupported_objects_are_refused_without_pickling(comms, obj, name):
    c0, c1 = comms
    with pytest.raises(TypeError, match=name):
        c0.send_obj(obj, 1)
    with pytest.raises(TypeError, match=name):
        c0.broadcast_obj(obj, 0)
    assert not _Secret.pickled
    assert c1.transport.inbox.empty()  # nothing reached the peer


def test_crypten_stats_are_counted(comms):
    c0, c1 = comms
    c0.reset_communication_stats()
    c1.reset_communication_stats()
    n = 10
    x = torch.zeros(n, dtype=torch.long)
    both(comms, lambda c: c.all_reduce(x))  # 2 * n elements each
    both(comms, lambda c: c.broadcast(x, 0))  # src: n * 1; receiver: n
    both(comms, lambda c: c.all_reduce([x, x[:3]], batched=True))  # 2 * 13 each
    both(comms, lambda c: c.barrier())  # 0
    both(comms, lambda c: c.all_gather(x))  # 2 * n each
    s0, s1 = c0.get_communication_stats(), c1.get_communication_stats()
    assert s0["rounds"] == s1["rounds"] == 5
    elements = 2 * n + n + 2 * 13 + 0 + 2 * n
    assert s0["bytes"] == s1["bytes"] == elements * 8
    assert s0["time"] > 0
    # twinfer's own counters see the same rounds and the bytes actually moved
    assert c0.transport.metrics.total().rounds == 5
    sent = c0.transport.metrics.total().bytes_sent
    assert sent == (n + n + 13 + n) * 8  # barrier sends zero bytes


def test_stats_not_counted_when_not_verbose(comms):
    c0, c1 = comms
    crypten.cfg.communicator.verbose = False  # the fixture restores it
    c0.reset_communication_stats()
    both(comms, lambda c: c.all_reduce(torch.zeros(4, dtype=torch.long)))
    assert c0.get_communication_stats()["rounds"] == 0
