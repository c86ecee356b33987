"""Ray placement on a three-node cluster (ray.cluster_utils on one machine) and many sessions on one party pair."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.helpers.stated import assert_within_stated_error

pytestmark = pytest.mark.timeout(300)

# Which node offers which custom resource: the head runs the dealer's, the two workers the others.
NODE_RESOURCES = {"head": "twinfer_dealer", "a": "twinfer_server", "b": "twinfer_client"}


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes (one CPU each) on this machine, the driver connected; shut down after the module."""
    from twinfer.deploy.launch.ray_launcher import local_cluster

    resources = [{NODE_RESOURCES[name]: 1} for name in ("head", "a", "b")]
    with local_cluster(resources) as (cluster, node_ids):
        yield cluster, {NODE_RESOURCES[name]: node_id for name, node_id in zip(("head", "a", "b"), node_ids)}


def _reference(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def test_three_nodes_one_party_each(cluster, onnx_files, fashion_cnn, fashion_test):
    from twinfer.deploy.launch.inference import private_inference
    from twinfer.deploy.launch.ray_launcher import RayOptions

    images = fashion_test[0][:4]
    result = private_inference(onnx_files["fashion_cnn"], images, batch_size=4, ray_options=RayOptions(placement="spread"))
    nodes = {role: report.node for role, report in result.reports.items()}
    assert len(set(nodes.values())) == 3, nodes
    assert set(nodes.values()) == set(cluster[1].values())
    assert_within_stated_error(result.logits, _reference(fashion_cnn, images), result.summary())


def test_named_nodes_by_custom_resource_over_tls(cluster, tmp_path, onnx_files, fashion_cnn, fashion_test):
    """`twinfer infer` joins the cluster, pins each role to the node offering its resource, TLS on."""
    images = fashion_test[0][4:6]
    np.save(tmp_path / "x.npy", images)
    certs = tmp_path / "certs"
    from twinfer.deploy.config.certs import make_certs

    make_certs(certs)
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "infer", "--model", str(onnx_files["fashion_cnn"]),
         "--input", str(tmp_path / "x.npy"), "--ray-address", cluster[0].address, "--tls", str(certs),
         "--server-node", "twinfer_server", "--client-node", "twinfer_client", "--dealer-node", "twinfer_dealer", "--json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    by_role = {p["role"]: p["node"] for p in out["parties"]}
    node_of = cluster[1]
    assert by_role == {role: node_of[f"twinfer_{role}"] for role in ("server", "client", "dealer")}
    assert_within_stated_error(out["logits"], _reference(fashion_cnn, images), out)


def test_unknown_node_is_a_clear_error(cluster, onnx_files, fashion_test):
    from twinfer.deploy.launch.inference import private_inference
    from twinfer.deploy.launch.ray_launcher import RayOptions

    with pytest.raises(ValueError, match=r"node for the server: 'gpu_box' is neither the id of a live Ray node nor a custom resource.*twinfer_client"):
        private_inference(onnx_files["fashion_cnn"], fashion_test[0][:1], ray_options=RayOptions(nodes={"server": "gpu_box"}))


def test_eight_concurrent_sessions_on_one_party_pair(cluster, onnx_files, fashion_cnn, fashion_test):
    """One server, one client and one dealer actor; eight sessions at once, each with its own input."""
    from twinfer.deploy.launch.ray_launcher import run_sessions
    from twinfer.parties.runtime.session_spec import SessionSpec
    from twinfer.parties.wire.transport import TransportOptions

    images = fashion_test[0][10:26]
    inputs = [images[2 * i : 2 * i + 2] for i in range(8)]  # two batches per session
    sessions = run_sessions(onnx_files["fashion_cnn"].read_bytes(), inputs, spec=SessionSpec(options=TransportOptions(recv_timeout_s=120)), batch_size=1)
    reference = _reference(fashion_cnn, images)
    pids = {role: {s[role].pid for s in sessions} for role in ("server", "client", "dealer")}
    assert all(len(p) == 1 for p in pids.values()), pids  # one process per role served every session
    for i, reports in enumerate(sessions):
        # Each session got its own input's logits: cross-talk would mix samples up.
        assert_within_stated_error(reports["client"].logits, reference[2 * i : 2 * i + 2], reports["client"].encoding)
        assert reports["server"].logits is None
