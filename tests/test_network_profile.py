"""Network profiles and the in-transport shaper: parsing, and measured RTT/throughput on loopback."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from twinfer.parties.wire.network_profile import PROFILES, LinkShaper, NetworkProfile, ProfileError, parse_profile
from twinfer.parties.wire.transport import GrpcTransport, PeerServicer, TransportOptions, add_peer_servicer, start_server


def test_named_profiles():
    assert parse_profile("wan") == NetworkProfile("wan", 0.040, 100e6)
    assert parse_profile("lan").rtt_s == 0.0005 and parse_profile("lan").bandwidth_bps == 1e9
    assert parse_profile("mobile").bandwidth_bps == 20e6
    assert not parse_profile("loopback").shaped
    assert set(PROFILES) >= {"loopback", "lan", "wan", "mobile"}


@pytest.mark.parametrize(
    "spec, rtt, bw",
    [("rtt=40ms,bw=100mbit", 0.040, 100e6), ("bw=1gbit", 0.0, 1e9), ("rtt=250us", 0.00025, None), (" rtt = 1.5s , bw=20Mbit ", 1.5, 20e6)],
)
def test_custom_profiles(spec, rtt, bw):
    p = parse_profile(spec)
    assert p.rtt_s == pytest.approx(rtt) and p.bandwidth_bps == (None if bw is None else pytest.approx(bw))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("satellite", "unknown network profile 'satellite'"),
        ("rtt=fast", "cannot read rtt 'fast'"),
        ("rtt=40lightyears", "unknown rtt unit 'lightyears'"),
        ("bw=100", "unknown bandwidth unit '(none)'"),
        ("bw=0mbit", "bandwidth must be positive"),
        ("rtt=4ms,rtt=5ms", "'rtt' given twice"),
        ("delay=4ms", "expected rtt=... and/or bw=..."),
    ],
)
def test_bad_profiles_are_named(spec, message):
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_profile(spec)


def test_latency_study_options_are_checked_before_any_party_starts():
    from twinfer.deploy.bench.latency import parse_offline, parse_protocols

    assert parse_offline("overlap, ahead") == ("overlap", "ahead")
    assert parse_protocols("crypten,fss") == ("crypten", "fss")
    for bad in ("", "before", "ahead,later"):
        with pytest.raises(ValueError, match="--offline takes overlap or ahead"):
            parse_offline(bad)


def test_lower_bound():
    wan = parse_profile("wan")
    assert wan.lower_bound_s(rounds=10, bytes_one_way=12_500_000) == pytest.approx(10 * 0.02 + 1.0)
    assert parse_profile("loopback").lower_bound_s(rounds=10, bytes_one_way=10**9) == 0.0


def test_shaper_paces_at_the_bandwidth_and_adds_half_the_rtt():
    shaper = LinkShaper(parse_profile("rtt=20ms,bw=8mbit"))  # 1 MB/s
    first = shaper.arrival_time(1000, now=100.0)
    second = shaper.arrival_time(1000, now=100.0)  # queued behind the first
    assert first == pytest.approx(100.0 + 0.001 + 0.010)
    assert second == pytest.approx(100.0 + 0.002 + 0.010)
    assert LinkShaper(None).arrival_time(10**9, now=5.0) == 5.0


@contextlib.contextmanager
def connected_pair(profile: NetworkProfile | None):
    options = TransportOptions(recv_timeout_s=10, connect_timeout_s=5, network=profile)
    servicer = PeerServicer()
    listener = GrpcTransport(session_id="shaped", role="server", peer_role="client", options=options)
    servicer.expect(listener)
    server, port = start_server([(servicer, add_peer_servicer)], "127.0.0.1:0", options)
    dialer = GrpcTransport(session_id="shaped", role="client", peer_role="server", options=options)
    dialer.dial(f"127.0.0.1:{port}")
    listener.wait_accepted()
    try:
        yield dialer, listener
    finally:
        dialer.close()
        listener.close()
        server.stop(0)


def median_rtt(dialer: GrpcTransport, listener: GrpcTransport, exchanges: int = 11) -> float:
    """The median of ping-pong times; the first exchange warms the stream up and is not counted."""

    def echo():
        for _ in range(exchanges):
            listener.send("pong", listener.recv("ping"))

    small = np.zeros(1, np.int64)
    echoer = threading.Thread(target=echo)
    echoer.start()
    samples = []
    for _ in range(exchanges):
        start = time.monotonic()
        dialer.send("ping", small)
        dialer.recv("pong")
        samples.append(time.monotonic() - start)
    echoer.join()
    return float(np.median(samples[1:]))


def test_measured_rtt_and_throughput_within_ten_percent():
    # The shaper adds the profile's delay on top of what loopback gRPC costs by itself; on a loaded
    # 2-core machine that is a few ms, so the added delay is measured against an unshaped baseline.
    profile = parse_profile("rtt=40ms,bw=100mbit")
    with connected_pair(None) as (dialer, listener):
        baseline = median_rtt(dialer, listener)
    with connected_pair(profile) as (dialer, listener):
        rtt = median_rtt(dialer, listener)
        assert rtt >= profile.rtt_s
        assert rtt - baseline == pytest.approx(profile.rtt_s, rel=0.10)

        payload = np.zeros(10_000_000, np.uint8)  # 80 Mbit: 0.8 s at 100 Mbit/s, then half an RTT
        start = time.monotonic()
        dialer.send("bulk", payload)
        listener.recv("bulk")
        elapsed = time.monotonic() - start - profile.rtt_s / 2
        throughput = payload.nbytes * 8 / elapsed
        assert throughput == pytest.approx(profile.bandwidth_bps, rel=0.10)


def test_the_grpc_transport_is_the_peer_channel_backends_declare():
    from twinfer.protocols.backends.channels import PeerChannel

    with connected_pair(None) as (dialer, listener):
        assert isinstance(dialer, PeerChannel) and isinstance(listener, PeerChannel)
