"""End to end on every backend: real dealer, server and client processes over gRPC, the
private logits against PyTorch's, and the measured counters against the cost model.

Clip (ReLU6) and Concat on a two-branch model; the demo CNN and the small ResNet on the fss
backend (the crypten backend runs them in test_e2e_ray.py and test_e2e_standalone.py)."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from twinfer.deploy.launch.local import run_local_session
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.backends import protocols
from twinfer.protocols.cost_model import graph_cost, total_cost
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.protocols.passes.onnx_import import graph_from_onnx
from twinfer.parties.runtime.session_spec import SessionSpec
from tests.helpers.stated import assert_within_stated_error

pytestmark = pytest.mark.timeout(300)


class Branches(nn.Module):
    """Two branches joined by Concat (Inception style), each with ReLU6 (MobileNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 3, 3, padding=1)
        self.right = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([nn.functional.relu6(self.left(x)), torch.relu(self.right(x))], dim=1)
        return self.head(nn.functional.avg_pool2d(nn.functional.relu6(joined * 1.0), 2).flatten(1))


@pytest.mark.parametrize("protocol", protocols())
def test_clip_and_concat_private_equals_pytorch(protocol):
    torch.manual_seed(3)
    model = Branches().eval()
    x = torch.randn(3, 1, 8, 8) * 4  # wide enough that both bounds of ReLU6 are crossed
    onnx_bytes = export_onnx(model, x[:1])
    graph, _ = graph_from_onnx(onnx.load_from_string(onnx_bytes))
    ops = [n.op for n in graph.nodes]
    assert ops.count("Clip") == 2 and "Concat" in ops
    with torch.no_grad():
        expected = model(x).numpy()
        left = model.left(x)
    assert (left > 6).any() and (left < 0).any()
    reports = run_local_session(onnx_bytes, x.numpy(), spec=SessionSpec(options=TransportOptions(connect_timeout_s=60.0), protocol=protocol), batch=3, timeout_s=240)
    client = reports["client"]
    assert client.protocol == reports["server"].protocol == protocol
    np.testing.assert_allclose(client.logits, expected, atol=2e-2)
    predicted = total_cost(graph_cost(graph, batch=3, protocol=protocol))
    for role in ("client", "server"):
        assert reports[role].comparisons == predicted.comparisons  # 2 per ReLU6 element, 1 per ReLU
        assert reports[role].relu_count == predicted.relu_count == 3 * 2 * 8 * 8
        assert reports[role].batch_bytes_online[0] == predicted.bytes_online
    assert predicted.comparisons == 3 * (2 * 3 * 8 * 8 + 2 * 8 * 8 + 2 * 5 * 8 * 8)


@pytest.mark.parametrize("name", ["fashion_cnn", "tiny_resnet"])
def test_demo_models_on_fss_equal_pytorch_within_0_01(name, request, fashion_test):
    """Two batches of 2: the second runs on prefetched keys (the ResNet's fetched between the
    batches: prefetch ahead); the cost model prices both exactly."""
    model = request.getfixturevalue(name).eval()
    x = torch.tensor(fashion_test[0][:4])
    onnx_bytes = export_onnx(model, x[:1])
    graph, _ = graph_from_onnx(onnx.load_from_string(onnx_bytes))
    reports = run_local_session(onnx_bytes, x.numpy(), spec=SessionSpec(options=TransportOptions(connect_timeout_s=60.0), protocol="fss", prefetch_ahead=name == "tiny_resnet"), batch=2, timeout_s=240)
    client = reports["client"]
    with torch.no_grad():
        expected = model(x).numpy()
    assert_within_stated_error(client.logits, expected, client.encoding)
    assert (client.logits.argmax(1) == expected.argmax(1)).all()
    predicted = total_cost(graph_cost(graph, batch=2, protocol="fss"))
    assert client.batch_rounds == [predicted.rounds] * 2 and predicted.rounds < 20
    assert client.batch_bytes_online == [predicted.bytes_online] * 2


def _error_id(text: str) -> str:
    import re

    match = re.search(r"\[[a-z-]+ ([0-9a-f]{12})", text)
    assert match, f"no error id in: {text}"
    return match.group(1)


def test_parties_on_different_protocols_end_with_one_error_naming_both(tmp_path, onnx_files):
    from helpers.party_processes import Parties

    parties = Parties(tmp_path)
    try:
        np.save(tmp_path / "x.npy", np.zeros((2, 1, 28, 28), np.float32))
        dealer = parties.start_dealer()
        server = parties.start_server(onnx_files["fashion_cnn"], "--dealer", dealer, "--protocol", "fss")
        parties.start_client(server, tmp_path / "x.npy", "--dealer", dealer, "--protocol", "crypten")
        code, _, client_err = parties.finish("client", timeout=60)
        assert code == 6 and "the server runs protocol 'fss' but this client runs 'crypten'" in client_err
        server_code, _, server_err = parties.finish("server", timeout=60)
        assert server_code != 0 and _error_id(server_err) == _error_id(client_err)
        assert "Traceback" not in client_err + server_err
    finally:
        parties.close()


def test_fss_dealer_killed_mid_prefetch_ends_both_parties_within_the_deadline(tmp_path, onnx_files, fashion_test):
    from helpers.party_processes import Parties

    parties = Parties(tmp_path)
    parties.timeout = 15.0
    try:
        np.save(tmp_path / "x.npy", fashion_test[0][:200])
        dealer = parties.start_dealer()
        server = parties.start_server(onnx_files["tiny_resnet"], "--dealer", dealer, "--protocol", "fss")
        parties.start_client(server, tmp_path / "x.npy", "--dealer", dealer, "--protocol", "fss", "--batch", "1")
        parties.wait_connected("client", server)  # the session is running: 200 batches of one, keys prefetched
        time.sleep(1)  # into its batches: the fault is the dealer lost mid-prefetch, not at the handshake
        assert parties.procs["client"].poll() is None, "the client finished before the failure was injected"
        parties.kill("dealer")
        killed_at = time.monotonic()
        code, _, client_err = parties.finish("client", timeout=60)
        server_code, _, server_err = parties.finish("server", timeout=60)
        assert code == 5 and server_code == 5, (client_err[-800:], server_err[-800:])
        assert "dealer" in client_err + server_err and _error_id(server_err) == _error_id(client_err)
        assert time.monotonic() - killed_at < parties.timeout + 15  # the deadline, plus process exit on a loaded machine
        assert "Traceback" not in client_err + server_err
    finally:
        parties.close()
