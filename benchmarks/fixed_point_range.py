"""Input scale against logit error: the demo CNN on Fashion-MNIST images times each scale, at
the default fixed point (16 fractional bits) and at fewer bits, which trade precision for range.

    python benchmarks/fixed_point_range.py [--scales 1 1e2 1e4 1e6 1e9] [--bits 16 12 8] [--protocols crypten,fss] [--samples 16]

Each cell first goes through the range check every launch runs before any party starts
(protocols/ir/ranges.py: what these inputs do in every layer, against what the encoding and the
two-party truncation hold): refused cells say why and run nothing; the others run privately
(dealer, server and client as three local processes over gRPC on loopback) and print the
measured max |logit error| against the plaintext model (float64) beside the error the check
stated (6 x its RMS estimate) and its bound on the probability that a sample's inference has a
failed truncation. Prints one table per protocol, then JSON (also --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from twinfer.deploy.config.paths import cache_dir
from twinfer.deploy.launch.local import run_local_session
from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model
from twinfer.parties.runtime.model_file import encoding_report, parse_model
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.ir.onnx_export import export_onnx
from twinfer.protocols.ir.ranges import observed_ranges


def _short(problem: str) -> str:
    if "wraps around" in problem:
        return "refused: a product wraps"
    if "per sample over the model" in problem:
        return "refused: truncation risk"
    if "too coarse" in problem:
        return "refused: too coarse"
    return "refused: " + problem.split(";")[0][:40]


def measure(args: argparse.Namespace) -> list[dict]:
    model = load_or_train_demo_model("fashion_cnn", cache_dir() / "models", progress=False)
    onnx_bytes = export_onnx(model, torch.zeros(1, 1, 28, 28))
    graph, weights = parse_model(onnx_bytes)
    images = load_fashion_mnist("test")[0][: args.samples]
    rows = []
    for protocol in args.protocols:
        for scale in args.scales:
            x = (images * scale).astype(np.float32)
            with torch.no_grad():
                reference = model.double()(torch.from_numpy(x).double()).numpy()
            seen = observed_ranges(graph, weights, x)
            for bits in args.bits:
                report = encoding_report(graph, weights, seen, bits, protocol)
                row = {
                    "protocol": protocol, "scale": scale, "fraction_bits": bits, "max_abs_logit": float(np.abs(reference).max()),
                    "stated_error": report.error_bound, "failure_per_sample": report.failure_probability,
                    "refused": [f"{f.node}: {f.problem}" for f in report.refused], "measured_error": None,
                }  # fmt: skip
                if not report.refused:
                    reports = run_local_session(
                        onnx_bytes, x, len(x), options=TransportOptions(recv_timeout_s=300), protocol=protocol, fraction_bits=bits
                    )
                    row["measured_error"] = float(np.abs(reports["client"].logits - reference).max())
                else:
                    row["why"] = _short(report.refused[0].problem)
                rows.append(row)
                print(f"{protocol} scale {scale:g} f={bits}: {row.get('why') or row['measured_error']}", file=sys.stderr, flush=True)
    return rows


def print_tables(rows: list[dict], bits: list[int], console: Console) -> None:
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        table = Table(title=f"demo CNN, {protocol}: max |logit error| (measured / stated) by input scale and fractional bits")
        table.add_column("input scale", justify="right")
        table.add_column("max |logit|", justify="right")
        for f in bits:
            table.add_column(f"f = {f}" + (" (default)" if f == 16 else ""), justify="right")
        for scale in dict.fromkeys(r["scale"] for r in rows):
            cells = {r["fraction_bits"]: r for r in rows if r["protocol"] == protocol and r["scale"] == scale}
            first = next(iter(cells.values()))
            out = [f"{scale:g}", f"{first['max_abs_logit']:.3g}"]
            for f in bits:
                r = cells[f]
                out.append(r["why"] if r["measured_error"] is None else f"{r['measured_error']:.3g} / {r['stated_error']:.3g}")
            table.add_row(*out)
        console.print(table)
        for f in bits:
            ok = [r["scale"] for r in rows if r["protocol"] == protocol and r["fraction_bits"] == f and r["measured_error"] is not None]
            console.print(f"  f = {f}: largest scale computed {max(ok):g}" if ok else f"  f = {f}: every scale refused")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1e2, 1e4, 1e6, 1e9])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 12, 8])
    parser.add_argument("--protocols", default="crypten,fss", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args)
    print_tables(rows, args.bits, Console(width=130))
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
