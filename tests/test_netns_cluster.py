"""A real Ray cluster on this machine: three nodes, each a network namespace with an address of
its own, joined pairwise by veth links that tbf shapes per pair; the parties on three of them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from twinfer.deploy.netem.kernel_shaping import ShapingError, list_namespaces
from twinfer.deploy.netem.netns_cluster import NetnsCluster, leftovers
from helpers.netns import netns_cluster, skip_without_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

SHAPED_BPS = 20e6
BULK_BYTES = 3_000_000


@pytest.fixture(scope="module")
def cluster():
    with netns_cluster(3) as c:
        yield c


def test_refuses_clearly_where_namespaces_cannot_be_made(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ShapingError, match="cannot build a Ray cluster of network namespaces here: .*needs root"):
        with NetnsCluster(3):
            pass
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # as root, but without iproute2
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ip" else real_which(name, *a, **k))
    with pytest.raises(ShapingError, match="needs 'ip'"):
        with NetnsCluster(3):
            pass


def test_each_node_has_its_address_and_a_link_to_each_other_node(cluster: NetnsCluster):
    assert [n.ip for n in cluster.nodes] == [f"{cluster.subnet}.{i}" for i in (1, 2, 3)]
    assert len({n.node_id for n in cluster.nodes}) == 3
    assert cluster.address == f"{cluster.nodes[0].ip}:6379"
    # Node 1 to node 2 crosses their own link (not the bridge): its counters carry the bytes.
    sent_before, _ = cluster.link_bytes(1, 2)
    _transfer(cluster, 1, 2, 200_000)
    sent_after, _ = cluster.link_bytes(1, 2)
    assert sent_after - sent_before >= 200_000


def test_shaping_one_pair_limits_that_link_only(cluster: NetnsCluster):
    cluster.shape(1, 2, f"bw={SHAPED_BPS / 1e6:g}mbit")
    try:
        assert set(cluster.shaped) == {(1, 2)}
        for attempt in range(3):  # a busy 2-core machine only ever makes a transfer slower
            shaped = _transfer(cluster, 1, 2, BULK_BYTES)
            back = _transfer(cluster, 2, 1, BULK_BYTES)
            if 0.80 * SHAPED_BPS <= min(shaped, back) and max(shaped, back) <= 1.05 * SHAPED_BPS:
                break
        free = _transfer(cluster, 0, 2, BULK_BYTES)
        print(f"link 1-2 shaped to {SHAPED_BPS / 1e6:g} Mbit/s: {shaped / 1e6:.1f} and {back / 1e6:.1f} Mbit/s; link 0-2: {free / 1e6:.0f} Mbit/s")
        # TCP payload gets about 95% of the tbf rate (it counts whole frames).
        assert 0.80 * SHAPED_BPS <= shaped <= 1.05 * SHAPED_BPS
        assert 0.80 * SHAPED_BPS <= back <= 1.05 * SHAPED_BPS
        assert free > 5 * SHAPED_BPS
        with pytest.raises(ShapingError, match="no netem"):
            cluster.shape(0, 1, "rtt=10ms")
    finally:
        cluster.shape(1, 2, None)
    assert cluster.shaped == {}


def _transfer(cluster: NetnsCluster, src: int, dst: int, nbytes: int) -> float:
    """Send `nbytes` from node src to node dst over TCP; the receiver's throughput in bit/s."""
    with cluster.driver(dst):
        server = socket.create_server((cluster.nodes[dst].ip, 0))
    port = server.getsockname()[1]
    got: dict[str, float] = {}

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            left, start = nbytes, None
            while left > 0:
                data = conn.recv(1 << 20)
                if not data:
                    break
                start = start or time.perf_counter()
                left -= len(data)
            got["s"], got["bytes"] = time.perf_counter() - start, nbytes - left

    reader = threading.Thread(target=receive)
    reader.start()
    with server:
        with cluster.driver(src):
            client = socket.create_connection((cluster.nodes[dst].ip, port), timeout=20)
        with client:
            client.sendall(bytes(nbytes))
        reader.join(timeout=60)
    assert got.get("bytes") == nbytes, got
    return nbytes * 8 / got["s"]


@pytest.mark.timeout(200)
def test_parties_on_three_nodes_give_the_plaintext_argmax(cluster: NetnsCluster, onnx_files, fashion_cnn, fashion_test):
    """twinfer.infer joins the cluster as a user would: one party per node, gRPC between node addresses."""
    import twinfer

    images = fashion_test[0][:4]
    ends = [(i, j) for i in range(3) for j in range(3) if i != j]
    before = {(i, j): _sent(cluster, i, j) for i, j in ends}
    t0 = time.monotonic()
    # The driver runs on the head node (a driver in the root namespace is unreachable for the workers).
    with cluster.driver(0):
        result = twinfer.infer(onnx_files["fashion_cnn"], images, ray_address=cluster.address, insecure=True)
    print(f"private inference on the netns cluster: {time.monotonic() - t0:.1f} s")

    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    np.testing.assert_array_equal(result.logits.argmax(axis=1), reference.argmax(axis=1))

    placed = {role: cluster.node_by_id(report.node) for role, report in result.reports.items()}
    print({role: (node.index, node.ip) for role, node in placed.items()})
    assert len({node.index for node in placed.values()}) == 3, placed
    assert {role: r.node_address for role, r in result.reports.items()} == {role: node.ip for role, node in placed.items()}
    server, client, dealer = placed["server"].index, placed["client"].index, placed["dealer"].index
    sent = {(i, j): _sent(cluster, i, j) - before[(i, j)] for i, j in ends}
    reports = result.reports
    # Each channel crossed its own pair's link: shares between server and client nodes, the
    # dealer's correlations on the dealer-server and dealer-client links.
    assert sent[(server, client)] >= sum(reports["server"].batch_bytes_sent)
    assert sent[(client, server)] >= sum(reports["client"].batch_bytes_sent)
    assert sent[(dealer, server)] + sent[(dealer, client)] >= reports["dealer"].bytes_offline > 0


def _sent(cluster: NetnsCluster, i: int, j: int) -> int:
    """Bytes node i has sent to node j over their link."""
    forward, backward = cluster.link_bytes(min(i, j), max(i, j))
    return forward if i < j else backward


def test_a_killed_node_loses_every_process_of_its_own(cluster: NetnsCluster):
    """Last of the cluster's tests: node 2 dies as a machine would; the others keep running."""
    daemons = {i: _daemons(cluster, i) for i in (0, 1)}  # workers may come and go; the daemons stay
    assert {"raylet", "gcs_server"} <= set(daemons[0].values()) and "raylet" in daemons[1].values()
    assert "raylet" in _daemons(cluster, 2).values()
    cluster.kill_node(2)
    assert _pids(cluster, 2) == set()
    for i, pids in daemons.items():
        assert _daemons(cluster, i) == pids, f"node {i} lost its daemons"


def _pids(cluster: NetnsCluster, i: int) -> set[int]:
    out = subprocess.run(["ip", "netns", "pids", cluster.namespaces[i]], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in out.split()} - {os.getpid()}


def _daemons(cluster: NetnsCluster, i: int) -> dict[int, str]:
    """Node i's raylet and GCS server by pid."""
    names = {}
    for pid in _pids(cluster, i):
        try:
            names[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
    return {pid: name for pid, name in names.items() if name in ("raylet", "gcs_server")}


def test_a_failed_start_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch):
    """Node 1 fails to join after the head is up: the head's Ray processes, the namespaces, the
    links and the temp folder all go, and the error says which node failed."""
    skip_without_netns()
    real = NetnsCluster._wait_started

    def fail_node_1(self, i, proc):
        real(self, i, proc)
        if i == 1:
            raise ShapingError("node 1 failed on purpose")

    monkeypatch.setattr(NetnsCluster, "_wait_started", fail_node_1)
    cluster = NetnsCluster(3)
    with pytest.raises(ShapingError, match="on purpose"):
        with cluster:
            pass
    assert leftovers(cluster) == []
    assert not {cluster.hub_ns, *cluster.namespaces} & set(list_namespaces())
