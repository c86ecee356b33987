"""`twinfer bench latency`: latency of a model under network profiles, beside the lower bound."""

from __future__ import annotations

import argparse
from pathlib import Path

from twinfer.parties.runtime.model_file import parse_model, read_model_bytes
from twinfer.parties.wire.network_profile import parse_profile

from ..bench.latency import add_offline_arg, latency_study, parse_offline, parse_protocols
from ..bench.sweep import SweepConfig
from ..bench.sweep import run_sweep as sweep


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("latency", help="latency under network profiles: table, latency.json and plots")
    p.add_argument("--model", required=True, help="ONNX model file")
    p.add_argument("--profiles", default="loopback,lan,wan,mobile", help="comma-separated profiles (named or rtt=..,bw=..)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=2, help="batches measured after the first of each session")
    p.add_argument(
        "--no-sweep", dest="sweep", action="store_false",
        help="skip the RTT and bandwidth sweeps behind the latency-vs-RTT and latency-vs-bandwidth plots",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--protocols", default="crypten", help="comma-separated backends, run side by side (e.g. crypten,fss)")
    add_offline_arg(p)
    p.set_defaults(func=run)
    sweep = bench.add_parser("sweep", help="models x protocols x batch sizes x networks as Ray tasks: sweep.json, a table and plots")
    sweep.add_argument("--config", required=True, type=Path, help="sweep.yaml or .toml (models, protocols, batch_sizes, networks, reps, cpus_per_run)")
    sweep.add_argument("--out", type=Path, default=Path("results"))
    sweep.add_argument("--ray-address", default=None, help="run on this Ray cluster instead of a local one")
    sweep.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    rows = sweep(SweepConfig.load(args.config), args.out, ray_address=args.ray_address)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(rows)} runs failed; see {args.out / 'sweep.json'}")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    # Profiles are parsed first: a typo fails before any party starts.
    profiles = [parse_profile(p) for p in args.profiles.split(",") if p.strip()]
    protocols = parse_protocols(args.protocols)
    offline = parse_offline(args.offline)
    if args.batch < 1 or args.reps < 1:
        raise ValueError("--batch and --reps must be at least 1")
    data = read_model_bytes(args.model)
    graph, _ = parse_model(data, source=str(args.model))
    latency_study(
        {Path(args.model).stem: (data, graph.input_shape)},
        profiles,
        batch=args.batch,
        reps=args.reps,
        sweep=args.sweep,
        out=args.out,
        protocols=protocols,
        offline=offline,
    )
    return 0
