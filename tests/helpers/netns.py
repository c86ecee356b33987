"""A real Ray cluster of network namespaces for tests: skipped where namespaces cannot be made,
checked to leave nothing behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from twinfer.deploy.netem.netns_cluster import NetnsCluster, check_netns_cluster_available, leftovers


def skip_without_netns() -> None:
    """Skip the calling test where this machine cannot make a cluster of namespaces (not root, no `ip`...)."""
    reason = check_netns_cluster_available()
    if reason is not None:
        pytest.skip(f"no Ray cluster of network namespaces on this machine: {reason}")


@contextmanager
def netns_cluster(nodes: int = 3, **kwargs) -> Iterator[NetnsCluster]:
    """A started NetnsCluster (one CPU per node by default); afterwards, asserts nothing of it is left."""
    skip_without_netns()
    cluster = NetnsCluster(nodes, **kwargs)
    with cluster:
        print(f"netns cluster: {nodes} nodes up in {cluster.start_s:.1f} s ({', '.join(n.ip for n in cluster.nodes)})")
        yield cluster
    print(f"netns cluster: torn down in {cluster.stop_s:.1f} s")
    left = leftovers(cluster)
    assert not left, f"the cluster left behind: {left}"
