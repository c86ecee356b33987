"""End to end through Ray: `twinfer infer` and the Python API, three actors over gRPC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tests.helpers.stated import assert_within_stated_error

pytestmark = pytest.mark.timeout(300)


def _twinfer(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_infer_json_matches_pytorch(tmp_path, onnx_files, fashion_cnn, fashion_test):
    images = fashion_test[0][:16]
    np.save(tmp_path / "x.npy", images)
    proc = _twinfer(
        "infer", "--model", str(onnx_files["fashion_cnn"]), "--input", str(tmp_path / "x.npy"), "--batch", "8",
        "--network", "rtt=10ms,bw=1gbit", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("logits", "latency_s", "rounds", "bytes_online", "bytes_offline", "relu_count", "parties"):
        assert key in out
    logits = np.array(out["logits"])
    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    assert (logits.argmax(1) == reference.argmax(1)).all()
    assert_within_stated_error(logits, reference, out)
    assert out["relu_count"] == 16 * (8 * 14 * 14 + 16 * 7 * 7 + 64)  # each ReLU after its max-pool (rewrite.py)
    assert out["rounds"] > 0 and out["bytes_online"] > 0 and out["bytes_offline"] > 0
    # Shaped in the transport: the measured batch can never beat the network's lower bound. The
    # bound expected here comes from known quantities, not from the product's formula: one batch of 8
    # on the default protocol (fss-compact) costs 3 ReLUs x 2 rounds + 2 MaxPools (2x2: two levels of
    # ReLUs) x 4 + 4 Beaver products (Conv, Conv, Gemm, Gemm) x 1 + 1 output opening = 19 rounds, each
    # a simultaneous exchange that waits one way (rtt/2 = 5 ms);
    # its bytes are the cost model's (checked against the measured counters), each opening sending
    # one share each way and the output going server -> client only, so the client's inbound
    # direction is the busier one, at 1 Gbit/s.
    from twinfer.parties.runtime.model_file import load_model
    from twinfer.protocols.cost_model import graph_cost, total_cost

    batch, batches, rtt_s, bandwidth_bps = 8, 2, 0.010, 1e9
    costs = graph_cost(load_model(onnx_files["fashion_cnn"])[0], batch=batch)
    predicted, reveal = total_cost(costs), costs[-1]
    assert reveal.name == "reveal_output" and predicted.modelled
    assert out["protocol"] == "fss-compact" and predicted.rounds == 3 * 2 + 2 * 4 + 4 * 1 + 1 == 19
    assert out["rounds_per_batch"] == predicted.rounds and out["rounds"] == batches * predicted.rounds
    assert out["bytes_online"] == batches * predicted.bytes_online
    inbound = (predicted.bytes_online - reveal.bytes_online) // 2 + reveal.bytes_online
    expected = predicted.rounds * rtt_s / 2 + inbound * 8 / bandwidth_bps
    assert out["lower_bound_s"] == pytest.approx(expected, rel=1e-9)
    assert out["latency_over_lower_bound"] == pytest.approx(out["last_batch_latency_s"] / expected, rel=1e-9)
    assert out["latency_over_lower_bound"] >= 1.0
    roles = {p["role"]: p for p in out["parties"]}
    assert set(roles) == {"server", "client", "dealer"}
    pids = {p["pid"] for p in out["parties"]}
    assert len(pids) == 3 and os.getpid() not in pids
    time.sleep(1)
    for pid in pids:  # no party process is left behind
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_python_api_with_a_torch_module(tiny_resnet, fashion_test):
    import twinfer

    images = fashion_test[0][100:116]
    result = twinfer.infer(tiny_resnet, images, batch_size=16, protocol="fss")
    with torch.no_grad():
        reference = tiny_resnet(torch.from_numpy(images)).numpy()
    assert (result.logits.argmax(1) == reference.argmax(1)).all()
    assert_within_stated_error(result.logits, reference, result.summary())
    summary = result.summary()
    assert summary["batches"] == 1 and summary["relu_count"] == 16 * result.relu_per_sample
    assert result.reports["server"].logits is None  # the server never gets the output


def test_unknown_op_fails_before_any_party_starts(tmp_path):
    from twinfer.protocols.passes.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Tanh())
    (tmp_path / "m.onnx").write_bytes(export_onnx(model, torch.zeros(1, 4)))
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    start = time.monotonic()
    proc = _twinfer("infer", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 3
    assert "op Tanh" in proc.stderr and "/2/Tanh" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30  # no Ray start-up, no party processes


def test_bad_network_profile_is_a_usage_error(tmp_path, onnx_files):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    proc = _twinfer("infer", "--model", str(onnx_files["fashion_cnn"]), "--input", str(tmp_path / "x.npy"), "--network", "rtt=fast")
    assert proc.returncode == 2 and "cannot read rtt 'fast'" in proc.stderr


@pytest.mark.parametrize(
    "model_arg, input_shape, code, message",
    [
        ("missing.onnx", (1, 1, 28, 28), 3, "does not exist"),
        ("fashion_cnn", (1, 3, 28, 28), 4, r"expects (N, 1, 28, 28)"),
    ],
)
def test_bad_input_is_named_before_start(tmp_path, onnx_files, model_arg, input_shape, code, message):
    model = onnx_files.get(model_arg, tmp_path / model_arg)
    np.save(tmp_path / "x.npy", np.zeros(input_shape, np.float32))
    proc = _twinfer("infer", "--model", str(model), "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
