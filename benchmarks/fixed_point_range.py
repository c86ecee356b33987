"""The fixed point as each run settles it: the stated error against the measured one, the fraction
bits chosen, each layer's truncation, and what exact truncation costs against local truncation.

    python benchmarks/fixed_point_range.py [--models fashion_cnn tiny_resnet pixel_cnn] [--protocols crypten,fss]
        [--samples 16] [--scales 1 1e4 1e6 1e9] [--network wan] [--out results/fixed_point_range.json]
        [--report docs/benchmarks/fixed_point_range.md]

Every private run is three local processes over gRPC on loopback (dealer, server, client), with
the encoding `twinfer infer` settles for these very inputs (deploy/launch/inference.py:
check_session: --fraction-bits auto, --truncation auto, the error stated from a simulation of
the fixed point on them), against the plaintext model in float64:

1. per model and protocol, the default settings beside the previous ones (16 fractional bits,
   every truncation local: run even where the check would refuse their risk), measured in the
   same run: rounds, online and offline bytes, latency;
2. the demo CNN on inputs times each --scale: chosen bits, stated / measured, or the refusal;
3. the demo CNN at 16 bits, every truncation exact against every one local, under --network
   (shaped in the transport): what exact truncation costs in rounds, bytes and latency.

pixel_cnn takes raw 0-255 pixels (Fashion-MNIST x 255), its BatchNorms after its ReLUs.
Prints the tables, then the JSON (also --out); --report writes the tables as Markdown for docs/.
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
from twinfer.deploy.launch.inference import check_session
from twinfer.deploy.launch.local import run_local_session
from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import INPUT_SCALE, load_or_train_demo_model
from twinfer.parties.errors import InputError
from twinfer.parties.runtime.model_file import parse_model
from twinfer.parties.wire.network_profile import parse_profile
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.passes.encoding import SessionEncoding, encoding_report
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.protocols.passes.plain import run_plain
from twinfer.protocols.passes.ranges import observed_ranges
from twinfer.parties.runtime.session_spec import SessionSpec

MB = 1e6


def _model(name: str):
    model = load_or_train_demo_model(name, cache_dir() / "models", progress=False)
    data = export_onnx(model, torch.zeros(1, 1, 28, 28))
    graph, weights = parse_model(data)
    return data, graph, weights


def _reference(graph, weights, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return run_plain(graph, {k: torch.from_numpy(v).double() for k, v in weights.items()}, torch.from_numpy(x).double()).numpy()


def _forced(graph, weights, x: np.ndarray, protocol: str, bits: int, truncation: str) -> SessionEncoding:
    """The encoding of `bits` with every truncation `truncation`, whatever the check would say of it."""
    report = encoding_report(graph, weights, observed_ranges(graph, weights, x, source=f"these {len(x)} inputs"), bits, protocol, truncation=truncation)
    return SessionEncoding.of(report, (float(x.min()), float(x.max())))


def _run(data: bytes, x: np.ndarray, reference: np.ndarray, protocol: str, encoding: SessionEncoding, options: TransportOptions) -> dict:
    reports = run_local_session(data, x, len(x), spec=SessionSpec(options=options, protocol=protocol, fraction_bits=encoding.fraction_bits), encoding=encoding)
    client, server = reports["client"], reports["server"]
    return {
        "measured_error": float(np.abs(client.logits.astype(np.float64) - reference).max()),
        "rounds": int(sum(client.batch_rounds)),
        "mb_online": sum(client.batch_bytes_online) / MB,
        "mb_offline": (client.bytes_offline + server.bytes_offline) / MB,
        "latency_s": float(sum(client.batch_latency_s)),
    }


def _layers(kinds: dict[str, str]) -> str:
    """'n of m exact (k fused)' or 'local x m' from a run's truncation per layer."""
    exact = [k for k in kinds.values() if k.startswith("exact")]
    fused = [k for k in exact if "fused" in k]
    return f"{len(exact)} of {len(kinds)} exact" + (f" ({len(fused)} fused)" if fused else "") if exact else f"local x {len(kinds)}"


def models_rows(args, console: Console) -> list[dict]:
    rows = []
    images = load_fashion_mnist("test")[0][: args.samples]
    for name in args.models:
        data, graph, weights = _model(name)
        x = (images * INPUT_SCALE.get(name, 1.0)).astype(np.float32)
        reference = _reference(graph, weights, x)
        for protocol in args.protocols:
            report, encoding = check_session(graph, weights, x, SessionSpec(protocol=protocol))
            default = _run(data, x, reference, protocol, encoding, TransportOptions(recv_timeout_s=600))
            previous = _run(data, x, reference, protocol, _forced(graph, weights, x, protocol, 16, "local"), TransportOptions(recv_timeout_s=600))
            rows.append({
                "model": name, "protocol": protocol, "fraction_bits": encoding.fraction_bits, "chosen": encoding.chosen,
                "stated_error": encoding.stated_error, "stated_source": encoding.error_source, "truncation": encoding.truncation,
                "failure_per_sample": encoding.failure_probability, "max_abs_logit": float(np.abs(reference).max()),
                "default": default, "previous_16_local": previous,
            })  # fmt: skip
            console.print(f"{name} {protocol}: f={encoding.fraction_bits}, stated {encoding.stated_error:.3g}, measured {default['measured_error']:.3g}", style="dim")
    return rows


def scale_rows(args, console: Console) -> list[dict]:
    data, graph, weights = _model("fashion_cnn")
    images = load_fashion_mnist("test")[0][: args.samples]
    rows = []
    for protocol in args.protocols:
        for scale in args.scales:
            x = (images * scale).astype(np.float32)
            row = {"protocol": protocol, "scale": scale}
            try:
                report, encoding = check_session(graph, weights, x, SessionSpec(protocol=protocol))
            except InputError as err:
                rows.append(row | {"refused": str(err)})
                console.print(f"scale {scale:g} {protocol}: refused", style="dim")
                continue
            measured = _run(data, x, _reference(graph, weights, x), protocol, encoding, TransportOptions(recv_timeout_s=600))
            rows.append(row | {"fraction_bits": encoding.fraction_bits, "stated_error": encoding.stated_error, "truncation": _layers(encoding.truncation)} | measured)
    return rows


def exact_cost_rows(args, console: Console) -> list[dict]:
    data, graph, weights = _model("fashion_cnn")
    x = load_fashion_mnist("test")[0][: args.samples]
    reference = _reference(graph, weights, x)
    options = TransportOptions(recv_timeout_s=600, network=parse_profile(args.network) if args.network else None)
    rows = []
    for protocol in args.protocols:
        for truncation in ("local", "exact"):
            encoding = _forced(graph, weights, x, protocol, 16, truncation)
            rows.append({"protocol": protocol, "truncation": truncation, "layers": _layers(encoding.truncation), "network": args.network} | _run(
                data, x, reference, protocol, encoding, options
            ))  # fmt: skip
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_tables(result: dict, console: Console) -> None:
    t = Table(title="per model: the default settings (bits auto, truncation auto) beside the previous ones (16 bits, all local)")
    for col in ("model", "protocol", "bits", "stated err", "measured err", "stated/meas.", "truncation", "rounds (prev.)",
                "MB online (prev.)", "MB offline (prev.)", "latency s (prev.)"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("model", "protocol", "truncation") else "right")
    for r in result["models"]:
        d, p = r["default"], r["previous_16_local"]
        t.add_row(
            r["model"], r["protocol"], str(r["fraction_bits"]), f"{r['stated_error']:.3g}", f"{d['measured_error']:.3g}",
            _ratio(r["stated_error"], d["measured_error"]), _layers(r["truncation"]),
            f"{d['rounds']} ({p['rounds']})", f"{d['mb_online']:.1f} ({p['mb_online']:.1f})", f"{d['mb_offline']:.1f} ({p['mb_offline']:.1f})",
            f"{d['latency_s']:.2f} ({p['latency_s']:.2f})",
        )  # fmt: skip
    console.print(t)
    for r in result["models"]:
        console.print(f"  {r['model']} / {r['protocol']}: {r['chosen']}; per layer: " + ", ".join(f"{k.split('/')[-2] if '/' in k else k} {v}" for k, v in r["truncation"].items()))
    t = Table(title="the demo CNN on scaled inputs (bits auto)")
    for col in ("protocol", "scale", "bits", "stated err", "measured err", "truncation"):
        t.add_column(col, justify="right")
    for r in result["scales"]:
        if "refused" in r:
            t.add_row(r["protocol"], f"{r['scale']:g}", "-", "refused", "-", r["refused"][:60])
        else:
            t.add_row(r["protocol"], f"{r['scale']:g}", str(r["fraction_bits"]), f"{r['stated_error']:.3g}", f"{r['measured_error']:.3g}", r["truncation"])
    console.print(t)
    t = Table(title=f"the demo CNN at 16 bits: exact against local truncation ({result['exact_cost'][0]['network'] or 'loopback'})")
    for col in ("protocol", "truncation", "layers", "rounds", "MB online", "MB offline", "latency s", "measured err"):
        t.add_column(col, justify="right")
    for r in result["exact_cost"]:
        t.add_row(r["protocol"], r["truncation"], r["layers"], str(r["rounds"]), f"{r['mb_online']:.2f}", f"{r['mb_offline']:.2f}",
                  f"{r['latency_s']:.2f}", f"{r['measured_error']:.3g}")  # fmt: skip
    console.print(t)


def markdown(result: dict, command: str) -> str:
    """The tables as markdown, for docs/benchmarks/ (written by the run, never by hand)."""
    lines = [
        "# Fixed point: stated against measured error, and what exact truncation costs", "",
        f"Written by `{command}` (every figure measured in that run; 2-core machine, loopback, three local processes).", "",
        "| model | protocol | bits | stated err | measured err | stated / measured | truncation | rounds (16 bits, local) | "
        "MB online (16, local) | MB offline (16, local) | latency s (16, local) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        d, p = r["default"], r["previous_16_local"]
        lines.append(
            f"| {r['model']} | {r['protocol']} | {r['fraction_bits']} | {r['stated_error']:.3g} | {d['measured_error']:.3g} | "
            f"{_ratio(r['stated_error'], d['measured_error'])} | {_layers(r['truncation'])} | {d['rounds']} ({p['rounds']}) | "
            f"{d['mb_online']:.1f} ({p['mb_online']:.1f}) | {d['mb_offline']:.1f} ({p['mb_offline']:.1f}) | "
            f"{d['latency_s']:.2f} ({p['latency_s']:.2f}) |"
        )
    lines += ["", "Why these bits, and each layer's truncation:", ""]
    for r in result["models"]:
        kinds = ", ".join(f"`{k}` {v}" for k, v in r["truncation"].items())
        lines.append(f"- {r['model']} / {r['protocol']}: {r['chosen']}. {kinds}")
    lines += ["", "The demo CNN on its test images times a scale (bits auto):", "",
              "| protocol | scale | bits | stated err | measured err | truncation |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["scales"]:
        if "refused" in r:
            lines.append(f"| {r['protocol']} | {r['scale']:g} | - | refused before any share is sent | - | - |")
        else:
            lines.append(f"| {r['protocol']} | {r['scale']:g} | {r['fraction_bits']} | {r['stated_error']:.3g} | {r['measured_error']:.3g} | {r['truncation']} |")
    network = result["exact_cost"][0]["network"] or "loopback"
    lines += ["", f"The demo CNN at 16 bits, every truncation exact against every one local, under {network}:", "",
              "| protocol | truncation | layers | rounds | MB online | MB offline | latency s | measured err |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["exact_cost"]:
        lines.append(
            f"| {r['protocol']} | {r['truncation']} | {r['layers']} | {r['rounds']} | {r['mb_online']:.2f} | {r['mb_offline']:.2f} | "
            f"{r['latency_s']:.2f} | {r['measured_error']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fashion_cnn", "tiny_resnet", "pixel_cnn"])
    parser.add_argument("--protocols", default="crypten,fss", type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1e4, 1e6, 1e9])
    parser.add_argument("--network", default="wan", help="the link of the exact-truncation cost table (default wan)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--report", default=None, help="also write the tables as markdown here (docs/benchmarks/fixed_point_range.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=160, stderr=True)
    result = {"models": models_rows(args, console), "scales": scale_rows(args, console), "exact_cost": exact_cost_rows(args, console)}
    print_tables(result, Console(width=160))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(markdown(result, "python benchmarks/fixed_point_range.py " + " ".join(argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    sys.exit(main())
