"""Accuracy at a ReLU budget: AutoReP against a channel-granular and an all-polynomial baseline,
and what the budget buys in a private run (rounds, online bytes, latency), all in one run.

    python benchmarks/relu_budget.py [--budgets 5000 2500 1000] [--train-samples 60000] [--epochs 2] [--lr 3e-3]

Model: ResNetFMNIST (56,448 ReLUs per image) trained to convergence on all 60k Fashion-MNIST
training images (8 epochs, cosine-decayed rate), then fine-tuned per method on the first
--train-samples (10% held out to pick checkpoints) with the same steps and rate each. The ReLU
model itself is fine-tuned the same way, every ReLU kept, as a control for what the extra
steps alone buy. Accuracy is on the full 10k test split. The private runs use three local
processes over gRPC on loopback (dealer, server, client): --private-batches
batches of --private-batch images; latency is the median of all but the first (which records
the dealer's plan).
Writes results/relu_budget/relu_budget.json and accuracy_vs_relus.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from twinfer.deploy.bench.latency import OFFLINE_MODES
from twinfer.deploy.launch.local import run_local_session
from twinfer.optimizer.autorep.autorep import AutoRepConfig, BudgetError, optimize_relus
from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.training import evaluate_accuracy
from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model
from twinfer.parties.runtime.model_file import parse_model, read_model_bytes
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.artifact import Artifact, ArtifactError
from twinfer.protocols.passes.plain import run_plain
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.parties.runtime.session_spec import SessionSpec

METHODS = ("autorep", "channel", "polynomial")
# The settings a stored row was produced with; a row is reused only when all of them match.
_SETTINGS = ("train_samples", "epochs", "lr", "seed", "model")
_GRANULARITY = {"autorep": "element", "channel": "channel", "polynomial": "polynomial"}


def _cache() -> Path:
    return Path(os.environ.get("TWINFER_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def fine_tune(base, method: str, budget: int, train, args) -> dict:
    fit_n = int(len(train[0]) * 0.9)
    fit, val = (train[0][:fit_n], train[1][:fit_n]), (train[0][fit_n:], train[1][fit_n:])
    config = AutoRepConfig(relu_budget=budget, granularity=_GRANULARITY[method], epochs=args.epochs, lr=args.lr, seed=args.seed)
    started = time.perf_counter()
    result = optimize_relus(base, fit, val, config, progress=not args.quiet)
    return {"result": result, "train_s": time.perf_counter() - started}


def private_run(
    model_bytes: bytes, images: np.ndarray, batch: int, batches: int, protocol: str = "crypten", offline: str = "overlap"
) -> dict:
    """Measured: rounds and online bytes of one batch, median latency of the batches after the
    first (which records the dealer's plan), and the logits' agreement with plaintext. `offline`:
    the dealer makes the next batch's correlations while this one runs (overlap) or between them (ahead)."""
    # A loaded 2-core machine can take more than the default 10 s to start a party process.
    reports = run_local_session(model_bytes, images, batch, spec=SessionSpec(options=TransportOptions(connect_timeout_s=120), protocol=protocol, prefetch_ahead=offline == "ahead"))  # fmt: skip
    client = reports["client"]
    graph, weights = parse_model(model_bytes)
    with torch.no_grad():
        plain = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, torch.from_numpy(images)).numpy()
    logits = np.asarray(client.logits)
    return {
        "protocol": protocol,
        "offline": offline,
        "batch": batch,
        "batches_measured": batches - 1,
        "rounds": int(client.batch_rounds[1]),
        "bytes_online_per_image": int(client.batch_bytes_online[1]) / batch,
        "latency_s": float(np.median(client.batch_latency_s[1:])),
        "relu_count_per_image": int(client.relu_count) / len(images),
        "argmax_agreement": float((logits.argmax(1) == plain.argmax(1)).mean()),
        "max_logit_error": float(np.abs(logits - plain).max()),
    }


def _earlier_row(path: Path, args) -> dict | None:
    """A row rebuilt from an artifact this benchmark wrote before with the same settings."""
    try:
        m = Artifact.read(path).manifest
    except ArtifactError:
        return None
    if not _same_settings(m, args):
        return None
    return {
        "method": m["method"], "budget": m["budget"], "relu_count": m["relu_count"], "test_accuracy": m["accuracy_after"],
        "val_accuracy": m.get("val_accuracy"), "train_s": m.get("train_s"), "reused": True,
    }  # fmt: skip


def _earlier_control(path: Path, args) -> dict | None:
    """The control row this benchmark wrote before with the same settings."""
    try:
        control = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return control if _same_settings(control, args) else None


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in _SETTINGS}


def _same_settings(record: dict, args) -> bool:
    return all(record.get(k) == v for k, v in _settings(args).items())


def plot(rows: list[dict], base: dict, path: Path, title: str, control: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        pts = sorted((r["relu_count"], r["test_accuracy"]) for r in rows if r["method"] == method and r["test_accuracy"] is not None)
        if pts:
            ax.plot([max(p[0], 1) for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(base["test_accuracy"], color="gray", linestyle="--", label=f"ReLU model ({base['relu_count']} ReLUs)")
    ax.axhline(base["test_accuracy"] - 0.01, color="gray", linestyle=":", label="ReLU model - 1 point")
    if control is not None:
        ax.axhline(control["test_accuracy"], color="black", linestyle="-.", label="ReLU model, fine-tuned the same steps")
    ax.set_xscale("log")
    ax.set_xlabel("ReLUs per image (log; all-polynomial drawn at 1)")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_title(f"{title}: accuracy at a ReLU budget (measured)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet_fmnist", help="demo model (resnet_fmnist; tiny_resnet for a quick check)")
    p.add_argument("--budgets", type=int, nargs="+", default=[5000, 2500, 1000])
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=3e-3, help="fine-tuning rate (cosine-decayed), the same for every method")
    p.add_argument("--private-batch", type=int, default=2)
    p.add_argument("--private-batches", type=int, default=4, help="batches per private run; all but the first are timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/relu_budget")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--resume", action="store_true", help="reuse artifacts of an earlier run with the same settings in --out")
    p.add_argument("--protocols", default="crypten,fss", help="backends the private runs use, crypten first (the reference)")
    p.add_argument(
        "--offline", default="overlap", choices=OFFLINE_MODES,
        help="private runs: the dealer makes the next batch's correlations while a batch runs (overlap, as a service "
        "back to back) or between batches (ahead: the online phase alone)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    if not args.protocols or args.protocols[0] != "crypten":
        p.error("--protocols must start with crypten, the reference the ratios use")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=120)
    started = time.perf_counter()

    base = load_or_train_demo_model(args.model, _cache() / "models", progress=not args.quiet)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    base_bytes = export_onnx(base, torch.zeros(1, 1, 28, 28))
    base_row = {
        "method": "relu model",
        "relu_count": parse_model(base_bytes)[0].relu_count(),
        "test_accuracy": evaluate_accuracy(base, *test),
    }
    subset = (train[0][: args.train_samples], train[1][: args.train_samples])
    # Control: the ReLU model fine-tuned by the same pipeline and steps with every ReLU kept, so
    # that an optimized model's accuracy is not credited with what extra training alone buys.
    control_file = out / "relu_model_fine_tuned.json"
    control = _earlier_control(control_file, args) if args.resume else None
    if control is None:
        console.print("[bold]relu model, fine-tuned[/] with every ReLU kept ...")
        run = fine_tune(base, "autorep", base_row["relu_count"], subset, args)
        control = {
            "method": "relu model, fine-tuned", "relu_count": run["result"].relu_count,
            "test_accuracy": evaluate_accuracy(run["result"].model, *test), "train_s": run["train_s"],
        } | _settings(args)  # fmt: skip
        control_file.write_text(json.dumps(control, indent=2))
    rows: list[dict] = []
    artifacts: dict[str, Path] = {}
    for method in METHODS:
        for budget in args.budgets if method != "polynomial" else [min(args.budgets)]:
            name = f"{method}-{budget}"
            earlier = _earlier_row(out / "artifacts" / name, args) if args.resume else None
            if earlier is not None:
                console.print(f"[bold]{method}[/] at budget {budget}: reusing {out / 'artifacts' / name}")
                rows.append(earlier | {"relu_reduction_x": base_row["relu_count"] / max(earlier["relu_count"], 1),
                                       "accuracy_drop_points": 100 * (base_row["test_accuracy"] - earlier["test_accuracy"])})  # fmt: skip
                artifacts[name] = out / "artifacts" / name
                continue
            console.print(f"[bold]{method}[/] at budget {budget} ...")
            try:
                run = fine_tune(base, method, budget, subset, args)
            except BudgetError as err:  # recorded, not hidden: this method missed the budget
                console.print(f"[red]{method} at budget {budget}: {err}[/]")
                rows.append({"method": method, "budget": budget, "relu_count": None, "test_accuracy": None, "error": str(err)})
                continue
            result = run["result"]
            acc = evaluate_accuracy(result.model, *test)
            artifacts[name] = export_artifact(
                result.model, torch.zeros(1, 1, 28, 28), out / "artifacts" / name,
                {"dataset": "fashion-mnist", "budget": budget, "accuracy_before": base_row["test_accuracy"],
                 "accuracy_after": acc, "method": method, "train_s": run["train_s"], "val_accuracy": result.val_accuracy}
                | _settings(args),
            )  # fmt: skip
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "relu_count": result.relu_count,
                    "test_accuracy": acc,
                    "val_accuracy": result.val_accuracy,
                    "accuracy_drop_points": 100 * (base_row["test_accuracy"] - acc),
                    "relu_reduction_x": base_row["relu_count"] / max(result.relu_count, 1),
                    "train_s": run["train_s"],
                    "steps": result.history[-1]["step"] if result.history else 0,
                }
            )

    # The private cost of the original and of every AutoReP model, measured in this run.
    images = test[0][: args.private_batches * args.private_batch]
    private = {"relu model": private_run(base_bytes, images, args.private_batch, args.private_batches, offline=args.offline)}
    for row in rows:
        if row["method"] == "autorep" and row["test_accuracy"] is not None:
            private[f"autorep-{row['budget']}"] = private_run(
                read_model_bytes(artifacts[f"autorep-{row['budget']}"]), images, args.private_batch, args.private_batches,
                offline=args.offline,
            )
    ref = private["relu model"]
    for key, run in private.items():
        run["bytes_online_reduction_x"] = ref["bytes_online_per_image"] / run["bytes_online_per_image"]
        run["latency_ratio_vs_relu_model"] = run["latency_s"] / ref["latency_s"]
        run["rounds_ratio_vs_relu_model"] = run["rounds"] / ref["rounds"]
    for key, run in private.items():  # the same models on the other backends, in the same run
        for protocol in args.protocols:
            if protocol != "crypten":
                model = base_bytes if key == "relu model" else read_model_bytes(artifacts[key])
                other = private_run(model, images, args.private_batch, args.private_batches, protocol, args.offline)
                other["latency_ratio_vs_crypten"] = other["latency_s"] / run["latency_s"]
                run[protocol] = other

    for row in rows:
        if row["test_accuracy"] is not None:
            row["accuracy_drop_vs_fine_tuned_relu_points"] = 100 * (control["test_accuracy"] - row["test_accuracy"])
    targets = _targets(rows, base_row, private, args.budgets)
    report = {
        "benchmark": "relu_budget",
        "model": args.model,
        "protocols": list(args.protocols),
        "offline": args.offline,
        "data": {"train": f"Fashion-MNIST train, first {args.train_samples} (10% held out)", "test": "Fashion-MNIST test, 10,000"},
        "epochs": args.epochs,
        "lr": args.lr,
        "cpu_count": os.cpu_count(),
        "base": base_row,
        "control": control,
        "rows": rows,
        "private": private,
        "targets": targets,
        "elapsed_s": time.perf_counter() - started,
    }
    (out / "relu_budget.json").write_text(json.dumps(report, indent=2))
    plot(rows, base_row, out / "accuracy_vs_relus.png", args.model, control)
    print(json.dumps(report))
    _print_tables(console, report)
    return 0


def _targets(rows: list[dict], base: dict, private: dict, budgets: list[int]) -> dict:
    """The issue's targets, each evaluated from this run's measurements."""
    def acc(r: dict | None) -> float:  # a missed budget counts as no model at all
        return -1.0 if r is None or r["test_accuracy"] is None else r["test_accuracy"]

    auto = {r["budget"]: r for r in rows if r["method"] == "autorep"}
    poly = next(r for r in rows if r["method"] == "polynomial")
    chan = {r["budget"]: r for r in rows if r["method"] == "channel"}
    ten_x = [r for r in auto.values() if acc(r) >= 0 and r["relu_reduction_x"] >= 10 and r["accuracy_drop_points"] <= 1.0]
    ten_x_control = [r for r in auto.values() if acc(r) >= 0 and r["relu_reduction_x"] >= 10 and r["accuracy_drop_vs_fine_tuned_relu_points"] <= 1.0]
    best_bytes = max([v["bytes_online_reduction_x"] for k, v in private.items() if k != "relu model"], default=0.0)
    return {
        "10x_fewer_relus_within_1_point": bool(ten_x),
        "autorep_above_both_baselines_at_every_budget": all(acc(auto.get(b)) > max(acc(chan.get(b)), acc(poly)) for b in budgets),
        "online_bytes_5x_lower": best_bytes >= 5,
        "best_online_bytes_reduction_x": best_bytes,
        "10x_fewer_relus_within_1_point_of_the_fine_tuned_relu_model": bool(ten_x_control),
    }


def _print_tables(console: Console, report: dict) -> None:
    base = report["base"]
    t = Table(title=f"{report['model']} on Fashion-MNIST: ReLU model {base['relu_count']} ReLUs, test accuracy {base['test_accuracy']:.4f}")
    for col in ("method", "budget", "ReLUs", "fewer", "test acc", "drop (pts)", "drop vs fine-tuned ReLU", "train s"):
        t.add_column(col, justify="right")
    c = report["control"]
    t.add_row(c["method"], "-", str(c["relu_count"]), "1.0x", f"{c['test_accuracy']:.4f}", f"{100 * (base['test_accuracy'] - c['test_accuracy']):+.2f}", "0.00", f"{c['train_s']:.0f}")
    for r in report["rows"]:
        if r["test_accuracy"] is None:
            t.add_row(r["method"], str(r["budget"]), "missed", "-", "-", "-", "-", "-")
            continue
        t.add_row(r["method"], str(r["budget"]), str(r["relu_count"]), f"{r['relu_reduction_x']:.1f}x", f"{r['test_accuracy']:.4f}", f"{r['accuracy_drop_points']:+.2f}", f"{r['accuracy_drop_vs_fine_tuned_relu_points']:+.2f}", f"{r['train_s']:.0f}" if r.get("train_s") else "-")
    console.print(t)
    t = Table(title=f"private inference, measured (median batch after the first; three processes over gRPC, loopback; offline {report['offline']})")
    others = [p for p in report["protocols"] if p != "crypten"]
    cols = ["model", "ReLUs/img", "rounds", "MB online/img", "bytes ratio", "latency s", "latency ratio", "argmax agree"]
    for p in others:
        cols += [f"{p} rounds", f"{p} MB/img", f"{p} latency s", f"{p} agree"]
    for col in cols:
        t.add_column(col, justify="right")
    for k, v in report["private"].items():
        extra = []
        for p in others:
            o = v[p]
            extra += [str(o["rounds"]), f"{o['bytes_online_per_image'] / 1e6:.2f}", f"{o['latency_s']:.2f}", f"{o['argmax_agreement']:.2f}"]
        t.add_row(
            k, f"{v['relu_count_per_image']:.0f}", str(v["rounds"]), f"{v['bytes_online_per_image'] / 1e6:.2f}", f"{1 / v['bytes_online_reduction_x']:.3f}",
            f"{v['latency_s']:.2f}", f"{v['latency_ratio_vs_relu_model']:.2f}", f"{v['argmax_agreement']:.2f}", *extra,
        )  # fmt: skip
    console.print(t)
    console.print("targets:", json.dumps(report["targets"]))


if __name__ == "__main__":
    sys.exit(main())
