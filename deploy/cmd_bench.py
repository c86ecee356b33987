"""`twinfer bench latency`: latency of a model under network profiles, beside the lower bound."""

from __future__ import annotations

import argparse
from pathlib import Path

from twinfer.parties.model_file import parse_model, read_model_bytes
from twinfer.parties.network_profile import parse_profile


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from twinfer.benchmarks.network_profiles import latency_study

    # Profiles are parsed first: a typo fails before any party starts.
    profiles = [parse_profile(p) for p in args.profiles.split(",") if p.strip()]
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
    )
    return 0
