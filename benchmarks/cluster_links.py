"""Shaping the links between cluster nodes against shaping twinfer's transport, on the same cluster.

A real Ray cluster of network namespaces on this machine (deploy/netem/netns_cluster.py), one
party per node. Each bandwidth is run twice in this one run, alternating:

- `link`: the kernel shapes every link between two nodes (tbf at the bandwidth, both ends);
  the transport is not shaped;
- `transport`: the links are left alone and twinfer's transport paces client<->server and the
  dealer's links at the same bandwidth (`network` and `dealer_network`).

The two should agree within 15 % (issue 26): a latency study on a cluster can then be trusted
whichever way it shapes. This kernel has no netem, so links are shaped in bandwidth only, and
the transport's profiles carry no RTT either. Latency is the median of every batch after each
session's first; the ratio is link / transport.

    python benchmarks/cluster_links.py [--bandwidths 20mbit 100mbit] [--sessions 3] [--samples 8]
        [--batch 4] [--model fashion_cnn|PATH] [--out FILE]

Needs root and network namespaces (like `twinfer bench latency --shaping kernel`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

AGREEMENT = 0.15


def _session(cluster, data: bytes, x: np.ndarray, batch: int, network) -> list[float]:
    """One private session from the head node; its batch latencies after the first."""
    from twinfer.deploy.launch.inference import private_inference
    from twinfer.deploy.launch.ray_launcher import RayOptions
    from twinfer.parties.runtime.session_spec import SessionSpec
    from twinfer.parties.wire.transport import TransportOptions

    options = TransportOptions(recv_timeout_s=600, connect_timeout_s=60, network=network, dealer_network=network)
    spec = SessionSpec(options=options, insecure=True)  # plaintext between the cluster's own namespaces
    with cluster.driver(0):
        result = private_inference(data, x, spec, batch_size=batch, ray_options=RayOptions(address=cluster.address, placement="spread"))
    nodes = {r.node_address for r in result.reports.values()}
    if len(nodes) != 3:
        raise RuntimeError(f"the parties shared nodes: {nodes}")
    return result.client.batch_latency_s[1:]


def measure(args: argparse.Namespace) -> list[dict]:
    from twinfer.deploy.netem.netns_cluster import NetnsCluster
    from twinfer.parties.wire.network_profile import parse_profile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cluster_throughput import _model

    data, shape = _model(args.model)
    x = np.random.default_rng(0).random((args.samples, *shape), dtype=np.float32)
    rows = []
    with NetnsCluster(nodes=3) as cluster:
        _session(cluster, data, x, args.batch, None)  # every node imports torch once, unshaped
        for bandwidth in args.bandwidths:
            profile = parse_profile(f"bw={bandwidth}")
            latencies: dict[str, list[float]] = {"link": [], "transport": []}
            for _ in range(args.sessions):  # alternating, so that drifting load hits both alike
                cluster.shape_all(profile)
                latencies["link"] += _session(cluster, data, x, args.batch, None)
                cluster.shape_all(None)
                latencies["transport"] += _session(cluster, data, x, args.batch, profile)
            link, transport = (statistics.median(latencies[k]) for k in ("link", "transport"))
            rows.append({
                "bandwidth": bandwidth, "link_s": link, "transport_s": transport, "ratio": link / transport,
                "within": abs(link / transport - 1) <= AGREEMENT, "batches": {k: len(v) for k, v in latencies.items()},
                "link_all_s": latencies["link"], "transport_all_s": latencies["transport"],
            })  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    from twinfer.deploy.console import new_console

    table = Table(title=f"link shaping / transport shaping, one party per node (agree within {AGREEMENT:.0%})")
    for column in ("bandwidth", "link s", "transport s", "ratio", "agree"):
        table.add_column(column, justify="left" if column == "bandwidth" else "right")
    for r in rows:
        table.add_row(r["bandwidth"], f"{r['link_s']:.3f}", f"{r['transport_s']:.3f}", f"{r['ratio']:.2f}", "yes" if r["within"] else "NO")
    new_console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidths", nargs="+", default=["20mbit", "100mbit"])
    parser.add_argument("--sessions", type=int, default=3, help="sessions per bandwidth and mode (default 3)")
    parser.add_argument("--samples", type=int, default=8, help="samples each session infers (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4: two batches, the second measured)")
    parser.add_argument("--model", default="fashion_cnn", help="fashion_cnn, tiny_resnet, or an ONNX file / artifact folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.batch < 1 or args.samples <= args.batch:
        parser.error("--sessions must be at least 1 and --samples more than one --batch (the first batch is not measured)")
    from twinfer.deploy.netem.netns_cluster import check_netns_cluster_available

    problem = check_netns_cluster_available()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0]
    rows = measure(args)
    result = {
        "model": args.model, "samples": args.samples, "batch": args.batch, "sessions": args.sessions,
        "machine": {"cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]},
        "rows": rows,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
