"""End to end with `twinfer party`: three real processes over gRPC on loopback, no Ray."""

from __future__ import annotations

import json
import os
import re
import secrets
import time

import numpy as np
import pytest
import torch

from helpers.party_processes import Parties
from tests.helpers.stated import assert_within_stated_error

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def parties(tmp_path):
    p = Parties(tmp_path)
    yield p
    p.close()


def _save(tmp_path, array, name="x.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def _error_id(text: str) -> str:
    match = re.search(r"\[[a-z-]+ ([0-9a-f]{12})", text)
    assert match, f"no error id in: {text}"
    return match.group(1)


@pytest.mark.parametrize("protocol", ["fss-compact", "crypten"])  # the default, and the one whose reveals are CrypTen's
def test_resnet_with_batchnorm_roles_and_accuracy(parties, tmp_path, onnx_files, tiny_resnet, fashion_test, protocol):
    images = fashion_test[0][:12]
    dealer = parties.start_dealer()
    server_audit, client_audit = tmp_path / "server.audit", tmp_path / "client.audit"
    server = parties.start_server(onnx_files["tiny_resnet"], "--dealer", dealer, "--protocol", protocol, audit=server_audit)
    out = tmp_path / "logits.npy"
    parties.start_client(
        server, _save(tmp_path, images), "--dealer", dealer, "--batch", "6", "--output", str(out), "--protocol", protocol,
        audit=client_audit,
    )  # fmt: skip
    code, client, err = parties.finish("client")
    assert code == 0, err
    assert parties.finish("server")[0] == 0 and parties.finish("dealer")[0] == 0

    logits = np.load(out)
    with torch.no_grad():
        reference = tiny_resnet(torch.from_numpy(images)).numpy()
    assert (logits.argmax(1) == reference.argmax(1)).all()
    assert_within_stated_error(logits, reference, client["encoding"])
    assert client["torch_threads"] == 1
    # Per-layer counters add up to the per-batch totals (nothing is counted twice or lost).
    in_batches = {k: v for k, v in client["layers"].items() if k not in ("", "share_weights")}
    assert sum(v["rounds"] for v in in_batches.values()) == sum(client["batch_rounds"])
    assert sum(v["bytes_sent"] + v["bytes_received"] for v in in_batches.values()) == sum(client["batch_bytes_online"])
    assert all(v["compute_s"] <= v["wall_s"] + 1e-9 for v in in_batches.values())
    assert client["relu_count"] == len(images) * client_relu_per_sample(onnx_files["tiny_resnet"])

    # Roles: the server never holds the output; the client never opens or holds the weights.
    server_seen, client_seen = json.loads(server_audit.read_text()), json.loads(client_audit.read_text())
    assert server_seen["revealed"] == []
    from twinfer.parties.runtime.model_file import load_model

    _, weights = load_model(onnx_files["tiny_resnet"])
    # No plaintext the client holds carries a weight tensor, whole or in part (checked before the
    # count, so that a leak is reported as a leak).
    assert _weights_in(client_seen["revealed"], weights) == []
    assert len(client_seen["revealed"]) == 2  # one output per batch, nothing else
    np.testing.assert_allclose(np.concatenate([np.array(r) for r in client_seen["revealed"]]), logits)
    assert not any(str(onnx_files["tiny_resnet"]) in path or path.endswith(".onnx") for path in client_seen["opened"])
    assert any(path.endswith(".onnx") for path in server_seen["opened"])


def _weights_in(revealed: list, weights: dict[str, np.ndarray], atol: float = 1e-3) -> list[str]:
    """The weights that a revealed value contains, or that contain it, as a contiguous run.

    Both are flattened and the shorter is slid along the longer, so a weight revealed whole
    (any shape), a slice of one, or one embedded in a larger opened tensor is found. A weight
    opened through the 16-bit fixed-point encoding is off by at most 2^-16, well inside atol;
    a run of two or more independent reals matching that closely by chance does not happen.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    found = []
    for i, value in enumerate(revealed):
        v = np.asarray(value, dtype=np.float64).ravel()
        for name, weight in sorted(weights.items()):
            w = np.asarray(weight, dtype=np.float64).ravel()
            short, long = (w, v) if w.size <= v.size else (v, w)
            if short.size < 2:
                continue
            runs = sliding_window_view(long, short.size)
            if np.any(np.all(np.abs(runs - short) <= atol, axis=1)):
                found.append(f"{name} {tuple(weight.shape)} in revealed[{i}] {tuple(np.shape(value))}")
    return found


def client_relu_per_sample(model_path) -> int:
    from twinfer.parties.runtime.model_file import load_model

    return load_model(model_path)[0].relu_count()


def test_insecure_trusted_first_party_only_when_asked(parties, tmp_path, onnx_files, fashion_cnn, fashion_test):
    images = fashion_test[0][:4]
    server = parties.start_server(onnx_files["fashion_cnn"], "--insecure-trusted-first-party", "--protocol", "crypten")
    parties.start_client(server, _save(tmp_path, images), "--insecure-trusted-first-party", "--protocol", "crypten")
    code, client, err = parties.finish("client")
    assert code == 0, err
    assert client["bytes_offline"] == 0  # no dealer involved
    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    assert_within_stated_error(client["logits"], reference, client["encoding"])
    # Without the flag a dealer is required: there is no silent fallback to TFP. With it, only
    # crypten runs one: the default protocol is refused by name, not switched silently.
    for extra, message in (((), "--dealer"), (("--insecure-trusted-first-party",), "pass --protocol crypten")):
        lone = Parties(tmp_path, session="lone-" + secrets.token_hex(16))
        try:
            lone.start_client("127.0.0.1:1", _save(tmp_path, images), *extra)
            code, _, err = lone.finish("client", timeout=60)
            assert code == 2 and message in err and "Traceback" not in err, err
        finally:
            lone.close()


def test_peer_not_listening(parties, tmp_path, fashion_test):
    import socket

    parties.connect_timeout = 3.0
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    parties.start_client(
        f"127.0.0.1:{port}", _save(tmp_path, fashion_test[0][:1]), "--dealer", f"127.0.0.1:{port}"
    )
    code, _, err = parties.finish("client", timeout=60)
    assert code == 5
    assert "not reachable" in err and str(port) in err
    assert "Traceback" not in err
    assert time.monotonic() - start < 30


def test_frame_for_another_session_is_refused(parties, tmp_path, onnx_files, fashion_test):
    # The server gives up on its missing client after this; long enough for the intruder's
    # process to start on a loaded machine.
    parties.accept_timeout = 20.0
    dealer = parties.start_dealer()
    server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer)
    intruder = "intruder-" + secrets.token_hex(16)
    parties.start_client(server, _save(tmp_path, fashion_test[0][:1]), "--dealer", dealer, session=intruder)
    code, _, err = parties.finish("client", timeout=60)
    assert code == 6 and f"unknown session '{intruder}'" in err and "Traceback" not in err
    # The server, still waiting for its own client, gives up at its accept deadline.
    code, _, err = parties.finish("server", timeout=60)
    assert code == 5 and "did not connect" in err


def test_input_that_does_not_fit_ends_every_party_with_one_error_id(parties, tmp_path, onnx_files):
    dealer = parties.start_dealer()
    server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer)
    parties.start_client(server, _save(tmp_path, np.zeros((2, 3, 32, 32), np.float32)), "--dealer", dealer)
    code, _, client_err = parties.finish("client", timeout=60)
    assert code == 4 and "expects (1, 28, 28)" in client_err
    server_code, _, server_err = parties.finish("server", timeout=60)
    assert server_code == 4 and _error_id(server_err) == _error_id(client_err)
    dealer_code, _, dealer_err = parties.finish("dealer", timeout=30)  # told at once, not at its idle deadline
    assert dealer_code != 0 and _error_id(dealer_err) == _error_id(client_err)
    assert "Traceback" not in client_err + server_err + dealer_err


def test_peer_dies_mid_inference(parties, tmp_path, onnx_files, fashion_test):
    parties.timeout = 15.0
    dealer = parties.start_dealer()
    server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer)
    parties.start_client(server, _save(tmp_path, fashion_test[0][:64]), "--dealer", dealer, "--batch", "1")
    time.sleep(8)  # processes started, weights shared, batches under way
    assert parties.procs["client"].poll() is None, "the client finished before the failure was injected"
    parties.kill("server")
    killed_at = time.monotonic()
    code, _, client_err = parties.finish("client", timeout=60)
    assert code == 5 and "server" in client_err and "Traceback" not in client_err
    dealer_code, _, dealer_err = parties.finish("dealer", timeout=60)
    assert dealer_code == 5
    assert _error_id(dealer_err) == _error_id(client_err)
    assert time.monotonic() - killed_at < parties.timeout + 10
    assert all(p.poll() is not None for p in parties.procs.values())


DEADLINE_MARGIN_S = 3.0  # docs/deployment.md: a party whose peer goes silent exits within --timeout plus this
LOADED_MACHINE_S = 2.0  # what a loaded 2-core test machine adds to process exit (before: up to twice --timeout)


def test_a_stopped_server_ends_the_others_within_the_deadline_with_one_error_id(parties, tmp_path, onnx_files, fashion_test):
    import signal

    parties.timeout = 4.0
    dealer = parties.start_dealer()
    server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer)
    parties.start_client(server, _save(tmp_path, fashion_test[0][:64]), "--dealer", dealer, "--batch", "1")
    time.sleep(8)  # processes started, weights shared, batches under way
    assert parties.procs["client"].poll() is None, "the client finished before the server was stopped"
    os.kill(parties.procs["server"].pid, signal.SIGSTOP)  # alive, but silent: no error, no closed stream
    stopped_at = time.monotonic()
    try:
        code, _, client_err = parties.finish("client", timeout=60)
        client_s = time.monotonic() - stopped_at
        dealer_code, _, dealer_err = parties.finish("dealer", timeout=60)
        dealer_s = time.monotonic() - stopped_at
    finally:
        os.kill(parties.procs["server"].pid, signal.SIGCONT)
    assert code == 5 and "no '" in client_err and "within 4 s" in client_err and "Traceback" not in client_err
    assert dealer_code == 5 and _error_id(dealer_err) == _error_id(client_err)
    assert client_s < parties.timeout + DEADLINE_MARGIN_S + LOADED_MACHINE_S, client_s
    assert dealer_s < parties.timeout + DEADLINE_MARGIN_S + LOADED_MACHINE_S, dealer_s
    server_code, _, server_err = parties.finish("server", timeout=30)  # once resumed, it finds its peers gone
    assert server_code != 0 and "Traceback" not in server_err
    print(f"stopped server: client exited after {client_s:.1f} s, dealer after {dealer_s:.1f} s (timeout {parties.timeout:g} s)")
