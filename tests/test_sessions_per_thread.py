"""Several sessions in one party process: CrypTen's process-wide state is per thread, hosts reuse threads."""

from __future__ import annotations

import threading

import pytest
import torch

from twinfer.protocols.backends.crypten.patches import load_crypten
from twinfer.parties.runtime.session_spec import SessionSpec
from tests.helpers.stated import assert_within_stated_error

crypten = load_crypten()
pytestmark = pytest.mark.timeout(180)


def _in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(timeout=10)
    return out[0]


def test_a_config_override_in_one_thread_is_invisible_to_another():
    """CrypTen swaps its whole config inside max pooling; a concurrent session must not see it."""
    inside, release = threading.Event(), threading.Event()
    seen = []

    def overriding() -> None:
        with crypten.cfg.temp_override({"functions.max_method": "pairwise"}):
            seen.append(crypten.cfg.functions.max_method)
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=overriding)
    thread.start()
    assert inside.wait(10)
    try:
        assert seen == ["pairwise"]
        assert _in_thread(lambda: crypten.cfg.functions.max_method) == "log_reduction"
        assert crypten.cfg.functions.max_method == "log_reduction"
    finally:
        release.set()
        thread.join(10)


def test_each_thread_draws_from_its_own_generators():

    def seeded(seed: int):
        g = torch.Generator()
        g.manual_seed(seed)
        crypten.generators["prev"][torch.device("cpu")] = g
        return crypten.generators["prev"][torch.device("cpu")].initial_seed()

    assert _in_thread(lambda: seeded(1)) == 1
    assert _in_thread(lambda: torch.device("cpu") in crypten.generators["prev"]) is False
    assert set(crypten.generators.keys()) == {"prev", "next", "local", "global"}


def test_one_process_pair_runs_rounds_of_concurrent_sessions(onnx_files, fashion_cnn, fashion_test):
    """Server, client and dealer hosts reused over rounds of 1 and 3 sessions, two batches each (prefetch on)."""
    from twinfer.parties.runtime.host import ClientHost, DealerHost, ServerHost
    from twinfer.parties.runtime.model_file import load_model
    from twinfer.parties.runtime.session import PartyConfig
    from twinfer.parties.wire.transport import TransportOptions

    graph, weights = load_model(onnx_files["fashion_cnn"])
    opts = TransportOptions(recv_timeout_s=60)
    dealer = DealerHost(PartyConfig(spec=SessionSpec(options=opts), role="dealer", session_id="-"))
    server = ServerHost(graph, weights, PartyConfig(spec=SessionSpec(options=opts), role="server", session_id="-", dealer_address=dealer.address))
    client = ClientHost(
        PartyConfig(spec=SessionSpec(options=opts), role="client", session_id="-", dealer_address=dealer.address, server_address=server.address)
    )
    images = fashion_test[0][:8]
    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    try:
        start = 0
        for n in (1, 3):
            ids = [f"r{n}-{i}" for i in range(n)]
            for sid in ids:
                dealer.open(sid)
                server.open(sid)
            for i, sid in enumerate(ids):
                client.open(sid, images[start + 2 * i : start + 2 * i + 2], 1)
            results = client.wait(120, ids)
            assert all(not isinstance(r, Exception) for r in {**server.wait(30, ids), **dealer.wait(30, ids)}.values())
            for i, sid in enumerate(ids):
                expected = reference[start + 2 * i : start + 2 * i + 2]
                assert not isinstance(results[sid], Exception), results[sid]
                assert_within_stated_error(results[sid].logits, expected, results[sid].encoding)
            start += 2 * n
    finally:
        for host in (client, server, dealer):
            host.close()
