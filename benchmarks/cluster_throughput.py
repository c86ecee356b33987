"""Inferences per second against the number of concurrent sessions on one party pair.

One server, one client and one dealer actor are placed once (on a local three-node Ray
cluster by default, one party per node; or the cluster at --ray-address) and serve rounds of
1, 2, 4 and 8 concurrent sessions. Each session shares the weights, then infers its own
samples; a round's wall time runs from opening its sessions to the last report, so it includes
each session's set-up. Every number is measured in this run; ratios compare with the
1-session rounds of the same run. The CPU count and the load average are printed beside them:
on a shared machine, other work slows every round down.

    python benchmarks/cluster_throughput.py [--sessions 1 2 4 8] [--samples 4] [--batch 1]
        [--reps 2] [--model fashion_cnn|PATH] [--nodes 3|1] [--ray-address ADDR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _model(spec: str) -> tuple[bytes, tuple[int, ...]]:
    from twinfer.parties.runtime.model_file import parse_model, read_model_bytes

    if spec in ("fashion_cnn", "tiny_resnet"):
        from twinfer.deploy.config.paths import cache_dir
        from twinfer.deploy.launch.inference import model_bytes
        from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model

        data = model_bytes(load_or_train_demo_model(spec, cache_dir() / "models", progress=False), (1, 28, 28))
    else:
        data = read_model_bytes(spec)
    graph, _ = parse_model(data, source=spec)
    return data, graph.input_shape


def measure(args: argparse.Namespace) -> dict:
    from twinfer.deploy.launch.ray_launcher import RayOptions, party_pool
    from twinfer.parties.runtime.session_spec import SessionSpec
    from twinfer.parties.wire.transport import TransportOptions

    data, shape = _model(args.model)
    rng = np.random.default_rng(0)
    options = TransportOptions(recv_timeout_s=600, connect_timeout_s=60)
    rows = []
    ray_options = RayOptions(address=args.ray_address, placement="auto")
    # Plaintext between nodes (no TLS), as this benchmark always ran: on a cluster an explicit choice.
    with party_pool(data, spec=SessionSpec(options=options, insecure=True), ray_options=ray_options, max_sessions=max(args.sessions)) as pool:
        warm = [rng.random((args.samples, *shape), dtype=np.float32)]
        pool.run(warm, batch_size=args.batch)  # actors import torch and crypten, first graph compile
        for n in args.sessions:
            for rep in range(args.reps):
                inputs = [rng.random((args.samples, *shape), dtype=np.float32) for _ in range(n)]
                load_before = os.getloadavg()[0]
                start = time.perf_counter()
                sessions = pool.run(inputs, batch_size=args.batch)
                wall = time.perf_counter() - start
                clients = [s["client"] for s in sessions]
                rows.append(
                    {
                        "sessions": n,
                        "rep": rep,
                        "inferences": n * args.samples,
                        "wall_s": wall,
                        "inferences_per_s": n * args.samples / wall,
                        "mean_setup_s": statistics.mean(c.setup_s for c in clients),
                        "mean_batch_latency_s": statistics.mean(t for c in clients for t in c.batch_latency_s),
                        "load_avg_1min_before": load_before,
                        "nodes": sorted({s[r].node[:8] for s in sessions for r in s}),
                    }
                )
                print(
                    f"  {n} session(s), rep {rep}: {wall:.2f} s, {rows[-1]['inferences_per_s']:.2f} inferences/s",
                    file=sys.stderr,
                    flush=True,
                )
        placement = pool.placement
    return {"rows": rows, "placement": placement}


def summarize(rows: list[dict]) -> list[dict]:
    """Median over reps per session count, with the ratio to the 1-session median of this run."""
    counts = sorted({r["sessions"] for r in rows})
    out = []
    base = None
    for n in counts:
        mine = [r for r in rows if r["sessions"] == n]
        rate = statistics.median(r["inferences_per_s"] for r in mine)
        base = base if base is not None else (rate if n == counts[0] else None)
        out.append(
            {
                "sessions": n,
                "inferences_per_s": rate,
                "ratio_vs_first": rate / base if base else None,
                "wall_s": statistics.median(r["wall_s"] for r in mine),
                "mean_batch_latency_s": statistics.median(r["mean_batch_latency_s"] for r in mine),
                "mean_setup_s": statistics.median(r["mean_setup_s"] for r in mine),
            }
        )
    return out


def saturation(summary: list[dict], gain: float = 1.10) -> str:
    """Where adding sessions stops adding throughput (less than 10% more), in words."""
    for prev, cur in zip(summary, summary[1:]):
        if cur["inferences_per_s"] < prev["inferences_per_s"] * gain:
            return (
                f"saturates at {prev['sessions']} concurrent session(s): going to {cur['sessions']} changes throughput "
                f"by {100 * (cur['inferences_per_s'] / prev['inferences_per_s'] - 1):+.0f}% "
                f"({prev['inferences_per_s']:.2f} -> {cur['inferences_per_s']:.2f} inferences/s)"
            )
    last = summary[-1]
    return f"no saturation up to {last['sessions']} sessions ({last['ratio_vs_first']:.2f}x the 1-session rate)"


def print_table(result: dict) -> None:
    m = result["machine"]
    print(
        f"cluster throughput: model {result['model']}, {result['samples_per_session']} samples per session, batch {result['batch']}, "
        f"placement {result['placement']}"
    )
    print(f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), load average at start {m['load_avg_start']:.2f}")
    print(f"{'sessions':>8} {'inf/s':>8} {'vs 1':>6} {'wall s':>8} {'batch s':>8} {'setup s':>8}")
    for r in result["summary"]:
        print(
            f"{r['sessions']:>8} {r['inferences_per_s']:>8.2f} {r['ratio_vs_first']:>5.2f}x {r['wall_s']:>8.2f} "
            f"{r['mean_batch_latency_s']:>8.3f} {r['mean_setup_s']:>8.3f}"
        )
    print(result["saturation"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=4, help="samples each session infers (default 4)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2, help="rounds per session count (default 2)")
    parser.add_argument("--model", default="fashion_cnn", help="fashion_cnn, tiny_resnet, or an ONNX file / artifact folder")
    parser.add_argument("--nodes", type=int, default=3, help="nodes of the local Ray cluster to start (1: embedded Ray)")
    parser.add_argument("--ray-address", default=None, help="use this Ray cluster instead of starting one")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if min(args.sessions) < 1 or args.samples < 1 or args.batch < 1 or args.reps < 1:
        parser.error("--sessions, --samples, --batch and --reps must be at least 1")
    args.sessions = sorted(set(args.sessions))
    from twinfer.deploy.launch.ray_launcher import local_cluster

    load_start = os.getloadavg()[0]
    if args.ray_address or args.nodes <= 1:
        measured = measure(args)  # the given cluster, or an embedded single-node Ray
    else:
        with local_cluster([{}] * args.nodes):
            measured = measure(args)
    result = {
        "model": args.model,
        "samples_per_session": args.samples,
        "batch": args.batch,
        "reps": args.reps,
        "placement": measured["placement"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg()[0],
        },
        "rows": measured["rows"],
    }
    result["summary"] = summarize(result["rows"])
    result["saturation"] = saturation(result["summary"])
    print(json.dumps(result, indent=1))
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
