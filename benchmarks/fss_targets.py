"""fss as the default? Issue 24's targets, each a ratio measured in this one run.

Three models: the issue's LeNet-5 with 32 and 64 channels (conv 1->32 3x3 pad 1, ReLU, 2x2
max-pool, conv 32->64, ReLU, 2x2 max-pool, fc 3136->200, ReLU, fc 200->10; PyTorch's default
initialisation with seed 0, untrained: latency does not depend on training), the demo CNN
(fashion_cnn) and the small ResNet (tiny_resnet). Each on crypten, fss and fss-compact, in
three local processes with the link shaped in twinfer's transport (`twinfer bench latency`'s
`measure`): eight images a batch on loopback, one image under wan; three batches, the first
fetching its correlations on demand, the others with the dealer making the next batch's while
one runs (overlapped, as a service runs). Prints JSON, a table (with where the client's time
went per batch, the mean over all three: its own compute, waiting on the peer, waiting on the
dealer), and each target met or missed:

- the LeNet-5, one image, wan: fss at most 0.5 s and 1.5x its lower bound, at most 40 MB of
  keys per party per image;
- eight images on loopback: an fss protocol no slower than crypten on each model;
- the demo CNN under wan: fss at least 15x faster than crypten.

    python benchmarks/fss_targets.py [--models lenet_32_64 fashion_cnn tiny_resnet] [--out results/fss_targets.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROTOCOLS = ("crypten", "fss", "fss-compact")
FSS = ("fss", "fss-compact")


def lenet_32_64():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 200), nn.ReLU(), nn.Linear(200, 10),
    ).eval()  # fmt: skip


def _models(names: list[str]) -> dict[str, tuple[bytes, tuple[int, ...]]]:
    import torch

    from twinfer.deploy.config.paths import cache_dir
    from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model
    from twinfer.protocols.passes.onnx_export import export_onnx

    out = {}
    for name in names:
        model = lenet_32_64() if name == "lenet_32_64" else load_or_train_demo_model(name, cache_dir() / "models", progress=False)
        out[name] = (export_onnx(model, torch.zeros(1, 1, 28, 28)), (1, 28, 28))
    return out


def run(names: list[str]) -> list[dict]:
    from twinfer.deploy.bench.latency import measure
    from twinfer.parties.wire.network_profile import parse_profile

    rows = []
    for name, (data, shape) in _models(names).items():
        for profile, batch in (("loopback", 8), ("wan", 1)):
            for protocol in PROTOCOLS:
                r = measure(name, data, shape, parse_profile(profile), batch=batch, reps=2, protocol=protocol)
                r.pop("layers_per_batch")
                rows.append(r)
                print(
                    f"{name} {protocol} {profile} batch {batch}: {r['latency_s']:.3f} s (first batch {r['first_batch_latency_s']:.3f} s)",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
    return rows


def _at(rows: list[dict], model: str, protocol: str, profile: str) -> dict | None:
    return next((r for r in rows if (r["model"], r["protocol"], r["profile"]) == (model, protocol, profile)), None)


def targets(rows: list[dict]) -> dict[str, bool]:
    met = {}
    lenet = _at(rows, "lenet_32_64", "fss", "wan")
    if lenet:
        keys_mb = lenet["bytes_offline_per_batch"] / 1e6  # the client's, one image a batch
        met[f"LeNet-5, one image, wan: fss at most 0.5 s ({lenet['latency_s']:.3f} s)"] = lenet["latency_s"] <= 0.5
        met[f"LeNet-5, one image, wan: fss at most 1.5x its lower bound ({lenet['latency_over_lower_bound']:.2f}x)"] = (
            lenet["latency_over_lower_bound"] <= 1.5
        )
        met[f"LeNet-5, one image: at most 40 MB of keys per party (fss {keys_mb:.1f} MB)"] = keys_mb <= 40
    for model in sorted({r["model"] for r in rows}):
        base = _at(rows, model, "crypten", "loopback")
        best = min((r for p in FSS if (r := _at(rows, model, p, "loopback"))), key=lambda r: r["latency_s"], default=None)
        if base and best:
            met[f"{model}, 8 images, loopback: {best['protocol']} no slower than crypten"] = best["latency_s"] <= base["latency_s"]
    fss, crypten = _at(rows, "fashion_cnn", "fss", "wan"), _at(rows, "fashion_cnn", "crypten", "wan")
    if fss and crypten:
        met[f"demo CNN, wan: fss at least 15x faster than crypten ({crypten['latency_s'] / fss['latency_s']:.1f}x)"] = (
            crypten["latency_s"] >= 15 * fss["latency_s"]
        )
    return met


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="latency per batch (median of the batches after the first), three local processes")
    for col in ("model", "protocol", "link", "batch", "latency s", "1st batch s", "vs crypten", "bound s", "/ bound", "rounds", "client's MB from dealer", "compute s", "peer s", "dealer s"):
        table.add_column(col, justify="right")
    for r in rows:
        base = _at(rows, r["model"], "crypten", r["profile"])
        table.add_row(
            r["model"], r["protocol"], r["profile"], str(r["batch"]), f"{r['latency_s']:.3f}", f"{r['first_batch_latency_s']:.3f}",
            f"{r['latency_s'] / base['latency_s']:.2f}" if base else "-", f"{r['lower_bound_s']:.3f}",
            f"{r['latency_over_lower_bound']:.2f}" if r["latency_over_lower_bound"] else "-", str(r["rounds"]),
            f"{r['bytes_offline_per_batch'] / 1e6:.1f}",
            *(f"{r[k]:.3f}" if k in r else "-" for k in ("compute_s", "peer_wait_s", "dealer_wait_s")),
        )  # fmt: skip
    Console(width=190).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet_32_64", "fashion_cnn", "tiny_resnet"])
    parser.add_argument("--out", type=Path, default=Path("results/fss_targets.json"))
    parser.add_argument("--tables-from", type=Path, default=None, help="print the tables and targets of an earlier run's JSON, running nothing")
    args = parser.parse_args(argv)
    rows = json.loads(args.tables_from.read_text())["rows"] if args.tables_from else run(args.models)
    met = targets(rows)
    if not args.tables_from:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "targets": met}, indent=1, default=str))
        print(json.dumps({"rows": rows, "targets": met}, indent=1, default=str))
    print_table(rows)
    for name, ok in met.items():
        print(f"{'met   ' if ok else 'MISSED'}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
