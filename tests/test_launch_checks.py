"""What is refused before any party starts, and what each refusal says: inputs, outputs, the
model's declared input range, exit codes, session ids, plaintext listeners, the dealer's role
binding under TLS, and Ray's session folders. In process and fast; the deadline test with real
processes is in test_e2e_standalone.py, the scaled demo CNN through Ray in test_e2e_fixed_point.py."""

from __future__ import annotations

import dataclasses

import os
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from twinfer.deploy.cli.cli import main
from twinfer.deploy.launch.wiring import new_session_id
from twinfer.parties.errors import InputError, ModelError, ProtocolError
from twinfer.parties.runtime.model_file import check_input_fits, load_input, parse_model
from twinfer.parties.runtime.session import PartyConfig
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.parties.runtime.session_spec import SessionSpec

FAST = TransportOptions(recv_timeout_s=5.0, connect_timeout_s=2.0, accept_timeout_s=5.0)


@pytest.fixture(scope="module")
def cnn(fashion_cnn):
    return parse_model(export_onnx(fashion_cnn, torch.zeros(1, 1, 28, 28)))


def _run(capsys, *argv: str) -> tuple[int, str]:
    """`twinfer ARGV` in this process: its exit code and what it printed to stderr."""
    try:
        code = main(list(argv))
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


def _save(tmp_path: Path, array, name: str = "x.npy") -> str:
    np.save(tmp_path / name, array)
    return str(tmp_path / name)


# -- inputs and outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, message",
    [
        (np.ones((2, 1, 28, 28), np.complex64), "holds complex numbers (complex64); expected real numbers"),
        (np.ones((2, 1, 28, 28), bool), "holds bool values; expected real numbers"),
        (np.array([["a", "b"]]), "holds <U1 values; expected real numbers"),
        (np.zeros((0, 1, 28, 28), np.float32), "is empty (shape (0, 1, 28, 28)); expected at least one sample"),
    ],
)
def test_an_input_that_is_not_real_numbers_or_is_empty_is_refused(tmp_path, array, message):
    with pytest.raises(InputError) as info:
        load_input(_save(tmp_path, array))
    assert message in str(info.value)


def test_an_npz_holds_one_array_per_model_input_by_name(tmp_path):
    np.savez(tmp_path / "x.npz", input_ids=np.arange(8).reshape(2, 4), attention_mask=np.ones((2, 4), np.int64))
    loaded = load_input(tmp_path / "x.npz")
    assert sorted(loaded) == ["attention_mask", "input_ids"] and loaded["input_ids"].dtype == np.float32
    np.savez(tmp_path / "bad.npz", input_ids=np.arange(8).reshape(2, 4), attention_mask=np.ones((2, 4), bool))
    with pytest.raises(InputError, match=r"input 'attention_mask' of .*bad.npz holds bool values; expected real numbers"):
        load_input(tmp_path / "bad.npz")


def test_a_missing_dimension_is_named(cnn):
    graph, _ = cnn
    for shape, message in (
        ((5, 28, 28), "5 samples without the channel dimension; expected (N, 1, 28, 28): add it with np.expand_dims(x, 1)"),
        ((1, 28, 28), "one sample without the batch dimension; expected (N, 1, 28, 28): add it with x[None]"),
        ((5, 3, 28, 28), "but the model expects (N, 1, 28, 28)"),
        ((0, 1, 28, 28), "input is empty"),
    ):
        with pytest.raises(InputError) as info:
            check_input_fits(graph, np.zeros(shape, np.float32))
        assert message in str(info.value), shape
    check_input_fits(graph, np.zeros((5, 1, 28, 28), np.float32))


@pytest.mark.parametrize("command", ["infer", "party", "demo"])
@pytest.mark.parametrize("batch", ["0", "-1", "two"])
def test_a_batch_below_one_is_a_usage_error_at_once(capsys, tmp_path, command, batch):
    start = time.monotonic()
    extra = {"infer": ["--model", "m.onnx", "--input", "x.npy"], "party": ["--role", "client"], "demo": []}[command]
    code, err = _run(capsys, command, *extra, "--batch", batch)
    assert code == 2 and "--batch" in err and ("must be at least 1" in err or "whole number" in err)
    assert time.monotonic() - start < 5  # argparse's refusal: nothing started


def test_an_unwritable_output_is_refused_before_the_client_connects(capsys, tmp_path):
    x = _save(tmp_path, np.zeros((1, 1, 28, 28), np.float32))
    client = ["party", "--role", "client", "--session", new_session_id(), "--server", "127.0.0.1:9", "--input", x,
              "--insecure-trusted-first-party", "--protocol", "crypten", "--connect-timeout", "30"]  # fmt: skip
    for output, message in (
        ("/no/such/dir/out.npy", "folder /no/such/dir does not exist"),
        (str(tmp_path), "is a directory"),
    ):
        start = time.monotonic()
        code, err = _run(capsys, *client, "--output", output)
        assert code == 7 and message in err and "Traceback" not in err, err
        assert time.monotonic() - start < 10  # never dialed: the connect deadline is 30 s


# -- the model's declared input range ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, fashion_cnn, fashion_test):
    from twinfer.optimizer.common.artifact import write_artifact

    out = tmp_path_factory.mktemp("artifact")
    calibration = fashion_test[0][100:400]
    write_artifact(out, export_onnx(fashion_cnn, torch.zeros(1, 1, 28, 28)), {}, calibration=calibration, widths=False)
    return out


def test_an_artifact_declares_its_range_and_the_server_keeps_its_layer_ranges(artifact):
    import json

    from twinfer.parties.runtime.model_file import load_model

    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["input_range"] == [0.0, 1.0] and "comparison_bits" not in manifest
    assert manifest["activation_ranges"]["margin"] == 4.0 and len(manifest["activation_ranges"]["layers"]) == 10
    graph, _ = load_model(artifact)
    assert graph.input_range == (0.0, 1.0) and graph.calibration["source"] == "calibration: 300 samples x margin 4.0"
    sent = json.loads(graph.to_json())  # what the client gets: the range, not the layer ranges
    assert sent["input_range"] == [0.0, 1.0] and "calibration" not in sent and "peak" not in graph.to_json()


def test_inputs_outside_the_declared_range_are_refused_naming_it(artifact, fashion_test):
    from twinfer.parties.runtime.model_file import load_model

    graph, _ = load_model(artifact)
    with pytest.raises(InputError, match=r"input values span \[0, 2\], outside the model's declared input range \[0, 1\]"):
        check_input_fits(graph, fashion_test[0][:4] * 2)
    check_input_fits(graph, fashion_test[0][:4])


def test_a_server_range_its_encoding_cannot_hold_is_refused_before_it_listens(capsys, artifact, tmp_path):
    """At 16 bits with local truncations, [0, 1e6] is refused naming what holds it; at the defaults the
    server holds it, with fewer bits or exact truncations, and says which."""
    from twinfer.parties.runtime.model_file import load_model
    from twinfer.parties.runtime.host import ServerHost

    graph, weights = load_model(artifact)
    config = PartyConfig(spec=SessionSpec(options=FAST, input_range=(0.0, 1e6), fraction_bits=16, truncation="local"), role="server", session_id="-", dealer_address="127.0.0.1:9")  # fmt: skip
    with pytest.raises(ModelError) as info:  # the interval bound: the artifact's calibration covers [0, 1] only
        ServerHost(graph, weights, config)
    text = str(info.value)
    assert "refused for inputs in [0, 1e+06]" in text and "interval bound for inputs in [0, 1e+06]" in text
    assert "layer '/features/" in text and "per sample over the layers truncated locally" in text and "--truncation auto" in text
    code, err = _run(
        capsys, "party", "--role", "server", "--session", new_session_id(), "--model", str(artifact), "--dealer", "127.0.0.1:9",
        "--input-range", "0,1e6", "--fraction-bits", "16", "--truncation", "local",
    )  # fmt: skip
    assert code == 3 and "[model " in err and "per sample over the layers truncated locally" in err and "Traceback" not in err
    host = ServerHost(graph, weights, dataclasses.replace(config, spec=config.spec.replace(fraction_bits="auto", truncation="auto")))
    try:
        encoding = host.encoding
        assert encoding.input_range == (0.0, 1e6) and "the most that hold every value" in encoding.chosen
        assert encoding.fraction_bits < 16 or any(k.startswith("exact") for k in encoding.truncation.values())
    finally:
        host.close()
    code, err = _run(capsys, "party", "--role", "server", "--session", new_session_id(), "--model", str(artifact), "--input-range", "1,0")
    assert code == 2 and "LO < HI" in err


def _one_session(graph, weights, inputs: np.ndarray, **client: object) -> dict:
    """Dealer, server and client hosts in this process over gRPC on loopback: each role's outcome
    of one session (`client`: settings of the client's SessionSpec)."""
    from twinfer.parties.runtime.host import ClientHost, DealerHost, ServerHost

    dealer = DealerHost(PartyConfig(spec=SessionSpec(options=FAST), role="dealer", session_id="-"))
    server = ServerHost(graph, weights, PartyConfig(spec=SessionSpec(options=FAST), role="server", session_id="-", dealer_address=dealer.address))
    config = PartyConfig(spec=SessionSpec(options=FAST, **client), role="client", session_id="-", dealer_address=dealer.address, server_address=server.address)
    hosts = {"client": ClientHost(config), "server": server, "dealer": dealer}
    try:
        session = new_session_id()
        dealer.open(session)
        server.open(session)
        hosts["client"].open(session, inputs, len(inputs))
        return {role: host.wait(30)[session] for role, host in hosts.items()}
    finally:
        for host in hosts.values():
            host.close()


def test_the_client_refuses_outside_the_declared_range_and_every_party_ends_with_its_id(artifact, fashion_test):
    from twinfer.parties.runtime.model_file import load_model

    graph, weights = load_model(artifact)
    outcomes = _one_session(graph, weights, fashion_test[0][:2] * 3)
    failure = outcomes["client"]
    assert isinstance(failure, InputError) and "outside [0, 1], what the server's model holds" in str(failure)
    assert {o.error_id for o in outcomes.values()} == {failure.error_id}


# -- exit codes --------------------------------------------------------------------------------------------


def test_a_listen_address_in_use_is_a_local_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _run(capsys, "party", "--role", "dealer", "--session", new_session_id(), "--listen", f"127.0.0.1:{port}")
    assert code == 7 and f"[local " in err and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_reused_session_id_is_a_protocol_error():
    from twinfer.deploy.cli.cli import exit_code
    from twinfer.parties.runtime.host import DealerHost

    dealer = DealerHost(PartyConfig(spec=SessionSpec(options=FAST), role="dealer", session_id="-"))
    try:
        session = new_session_id()
        dealer.open(session)
        with pytest.raises(ProtocolError, match=f"session '{session}' is already open on this dealer: every session needs a fresh id") as info:
            dealer.open(session)
        assert exit_code(info.value) == 6
    finally:
        dealer.close()


# -- credentials ---------------------------------------------------------------------------------------------


def test_generated_session_ids_carry_128_random_bits():
    ids = {new_session_id() for _ in range(200)}
    assert len(ids) == 200 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_short_hand_chosen_session_id_needs_insecure(capsys):
    from twinfer.deploy.cli.cmd_party import check_session_ids, session_id_bits

    code, err = _run(capsys, "party", "--role", "dealer", "--session", "S")
    assert code == 2 and "--session 'S' is too short to be unguessable: a session id needs at least 128 random bits" in err
    assert session_id_bits("0" * 32) == 128 and session_id_bits("s1") < 128 and session_id_bits("z" * 22) >= 128
    check_session_ids(["S"], insecure=True)  # the user's explicit choice
    with pytest.raises(ValueError, match="'s1' is too short"):
        check_session_ids([new_session_id(), "s1"], insecure=False)


def test_plaintext_on_a_non_loopback_address_needs_insecure(capsys):
    from twinfer.parties.runtime.session import PartyListener, is_loopback

    assert all(is_loopback(a) for a in ("127.0.0.1:1", "127.3.4.5:0", "[::1]:7", "localhost:9"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:0", "10.0.0.1:7700", "[::]:7", "server.example:7700"))
    with pytest.raises(ValueError, match="the dealer would listen on 0.0.0.0:0 without TLS: .* pass --insecure"):
        PartyListener("dealer", "0.0.0.0:0", FAST)
    PartyListener("dealer", "0.0.0.0:0", FAST, insecure=True).close(grace=0)
    code, err = _run(capsys, "party", "--role", "dealer", "--session", new_session_id(), "--listen", "0.0.0.0:0")
    assert code == 2 and "the dealer would listen on 0.0.0.0:0 without TLS" in err and "--insecure" in err


def test_under_tls_a_role_is_bound_to_the_certificate_that_took_its_seed(tmp_path):
    from twinfer.deploy.config.certs import make_ca, make_party_cert
    from twinfer.parties.dealer.client import DealerClient
    from twinfer.parties.metrics import Metrics
    from twinfer.parties.proto import twinfer_pb2 as pb
    from twinfer.parties.proto import twinfer_pb2_grpc as pb_grpc
    from twinfer.parties.runtime.session import PartyListener
    from twinfer.parties.wire.tls import TlsIdentity
    from twinfer.parties.wire.transport import open_channel

    ca, key = make_ca(tmp_path)
    for role in ("server", "dealer"):
        make_party_cert(tmp_path, role, ca, key)
    make_party_cert(tmp_path, "server", ca, key, file_stem="other-server")  # the same CA, the same role
    ident = lambda stem, role: TlsIdentity.from_files(role, tmp_path / "ca.pem", tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key")  # noqa: E731
    listener = PartyListener("dealer", "127.0.0.1:0", FAST, ident("dealer", "dealer"))
    session = new_session_id()
    listener.dealer.open_session(session)
    first = DealerClient(listener.address, session_id=session, role="server", options=FAST, metrics=Metrics(), tls=ident("server", "server"))
    try:
        with pytest.raises(ProtocolError, match="server already has its seed"):
            DealerClient(listener.address, session_id=session, role="server", options=FAST, metrics=Metrics(), tls=ident("other-server", "server"))
        channel = open_channel(listener.address, role="server", peer_role="dealer", options=FAST, tls=ident("other-server", "server"))
        try:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.DealerStub(channel).Close(pb.CloseRequest(session_id=session, role="server"), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "the server of session" in info.value.details() and "bound to the certificate that took its seed" in info.value.details()
        finally:
            channel.close()
        assert not listener.dealer.stats(session)["finished"]  # the intruder closed nothing
    finally:
        first.close()
        listener.close(grace=0)


# -- tidy runs -------------------------------------------------------------------------------------------------


def test_ray_session_folders_of_finished_runs_are_removed(tmp_path):
    from twinfer.deploy.launch.ray_launcher import RAY_SESSION_GRACE_S, RAY_SESSION_KEEP_S, prune_ray_sessions

    child = subprocess.Popen(["true"])  # a pid surely gone: a finished child's
    child.wait()
    old, now = time.time() - 2 * RAY_SESSION_GRACE_S, time.time()
    folders = {
        "dead_old": (child.pid, old), "dead_new": (child.pid, now), "alive": (os.getpid(), old),
        "alive_ancient": (os.getpid(), now - 2 * RAY_SESSION_KEEP_S),
    }  # fmt: skip
    for name, (pid, stamp) in folders.items():
        folder = tmp_path / f"session_{name}_{pid}"  # Ray names it session_<date>_<pid of the process that started it>
        (folder / "logs").mkdir(parents=True)
        (folder / "logs" / "raylet.out").write_text("x")
        for path in (folder / "logs" / "raylet.out", folder / "logs", folder):
            os.utime(path, (stamp, stamp))
    (tmp_path / "session_latest").symlink_to(tmp_path / "session_gone")
    removed = {p.name for p in prune_ray_sessions(tmp_path)}
    assert removed == {f"session_dead_old_{child.pid}", f"session_alive_ancient_{os.getpid()}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"session_dead_new_{child.pid}", f"session_alive_{os.getpid()}"])


def test_the_dealer_keeps_a_session_while_a_party_of_it_lives():
    """A party busy elsewhere (a long batch, a client still dialing) keeps its dealer session: the
    dealer ends one on its own deadline only when no party of it is left, never with another id."""
    from twinfer.parties.dealer.client import DealerClient
    from twinfer.parties.dealer.core import DealerCore
    from twinfer.parties.dealer.service import add_dealer_servicer
    from twinfer.parties.metrics import Metrics
    from twinfer.parties.wire.transport import start_server

    quick = TransportOptions(recv_timeout_s=1.0, connect_timeout_s=2.0)
    servicer = DealerCore(idle_timeout_s=quick.recv_timeout_s)
    server, port = start_server([(servicer, add_dealer_servicer)], "127.0.0.1:0", quick)
    try:
        session = new_session_id()
        servicer.open_session(session)
        client = DealerClient(f"127.0.0.1:{port}", session_id=session, role="client", options=quick, metrics=Metrics())
        start = time.monotonic()
        ended = servicer.wait_finished(session, timeout_s=3.0)  # three idle deadlines, and no request
        assert time.monotonic() - start >= 2.9 and ended.error.message.startswith("no request")  # only its own 3 s limit
        assert "no request for 0 s" in ended.error.message or "no request for 1 s" in ended.error.message
        client.close()
        late = new_session_id()
        servicer.open_session(late)
        start = time.monotonic()
        assert servicer.wait_finished(late, timeout_s=30.0).error.kind == "timeout"  # nobody left: its own deadline
        assert time.monotonic() - start < 5
    finally:
        server.stop(grace=0)


def test_parties_with_other_fraction_bits_end_with_one_error_naming_both(cnn, fashion_test):
    graph, weights = cnn
    outcomes = _one_session(graph, weights, fashion_test[0][:1], fraction_bits=12)
    failure = outcomes["client"]
    assert isinstance(failure, ProtocolError) and "the server encodes with 16 fractional bits but this client with 12" in str(failure)
    assert {o.error_id for o in outcomes.values()} == {failure.error_id}
