"""Optimizing the latency the user pays for, against the ReLU budget as a proxy, measured in one run.

    python benchmarks/latency_budget.py [--models lenet5 resnet_fmnist] [--protocols crypten,fss]
        [--budgets 0.7 0.3] [--train-samples 4000] [--epochs 2] [--max-candidates 4] [--shaping transport]

For each model and backend, the base model's latency under the network profile (wan: 40 ms RTT,
100 Mbit/s) is predicted (protocols' cost model + a compute term fitted, in this run, to a
session of the base model under that profile) and measured. Each --budgets value places a latency budget
between the cheapest structure's predicted latency (0: every max-pool an average pool, every
ReLU a polynomial) and the base model's (1). Each budget is met two ways, fine-tuned from the
same base model on the same Fashion-MNIST samples with the same AutoReP settings:
- cost-aware: `twinfer optimize --latency-budget --drop-relu-sites` (optimizer/budget/search.py):
  which max-pools become average pools, which ReLU sites become polynomials or are dropped, and
  how many ReLUs stay, the most accurate on held-out training data;
- relu-budget: `twinfer optimize --relu-budget R` (AutoReP alone, max-pools kept), R the most
  ReLUs whose predicted latency fits the same budget (0 when even none does not: the row says so).
Every model then runs privately (three processes over gRPC: dealer, server, client) under the
profile, shaped in twinfer's transport between client and server with the dealer beside the
server, as deploy/bench/latency.py does (--shaping kernel: tbf and the delay relay of
deploy/netem instead, where the client's dealer traffic, about 1 KB per ReLU on fss, crosses
the shaped link too, and the prediction adds it: `--keys-over-link`). Latency is the median batch (of one
image) after the first. Test accuracy is on the first --test-samples of the
Fashion-MNIST test split. Every row records the server's numeric-range check verdict on the artifact
calibrated on 500 training images (margin 4) and the measured logits against plaintext PyTorch.
Targets are evaluated from these measurements and printed as met or
not met: at equal measured latency (within --equal-latency) the cost-aware model is at least
1 point more accurate, or at equal accuracy (within --equal-accuracy points) at least 1.5x
faster; measured latency within 15% of predicted.
Writes results/latency_budget/latency_budget.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from twinfer.deploy.cli.cmd_optimize import measure_compute
from twinfer.deploy.config.paths import cache_dir
from twinfer.deploy.launch.local import run_local_session
from twinfer.optimizer.autorep.autorep import AutoRepConfig, BudgetError, optimize_relus
from twinfer.optimizer.budget.latency import LatencyModel
from twinfer.optimizer.budget.search import Budget, LatencyBudgetError, most_relus, plan, pruning_levels, range_refusal, search
from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.training import evaluate_accuracy
from twinfer.optimizer.common.validation import validation_split
from twinfer.optimizer.data.datasets import load_fashion_mnist
from twinfer.optimizer.mofhei.mofhei import artifact_graph, model_graph
from twinfer.optimizer.zoo.demo_models import lenet5, load_or_train_demo_model, save_state_dict, train_classifier
from twinfer.parties.runtime.model_file import load_model, read_model_bytes
from twinfer.parties.wire.network_profile import NetworkProfile, parse_profile
from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.protocols.passes.plain import run_plain
from twinfer.parties.runtime.session_spec import SessionSpec

SHAPE = (1, 28, 28)
CALIBRATION = 500  # training images whose ranges each artifact declares (the server's range check)
LENET_RECIPE = "fashion-mnist train, 60000, 2 epochs, adam 2e-3, seed 0"


def base_model(name: str, quiet: bool) -> torch.nn.Module:
    """The model every method starts from: ResNetFMNIST (relu_budget.py's) or a LeNet-5 with max-pools."""
    if name != "lenet5":
        return load_or_train_demo_model(name, cache_dir() / "models", progress=not quiet)
    path = cache_dir() / "models" / "lenet5.safetensors"
    model = lenet5()
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model.eval()
    torch.manual_seed(0)
    images, labels = load_fashion_mnist("train")
    train_classifier(model, images, labels, epochs=2, seed=0, progress=not quiet)
    save_state_dict(model, path, metadata={"recipe": LENET_RECIPE})
    return model.eval()


def measured_run(artifact: Path, profile: NetworkProfile, protocol: str, shaping: str, batches: int) -> dict:
    """One private session of `batches` single images under `profile`: median latency after the first
    batch, and the logits against plaintext PyTorch on the same artifact."""
    inputs = load_fashion_mnist("test")[0][-batches:]  # images no model trained or was tested on
    if shaping == "kernel":
        from twinfer.deploy.netem.kernel_shaping import run_kernel_shaped_session

        client = run_kernel_shaped_session(artifact, inputs, 1, profile, protocol=protocol)
    else:
        options = TransportOptions(recv_timeout_s=300, connect_timeout_s=120, network=profile)
        client = run_local_session(read_model_bytes(artifact), inputs, 1, spec=SessionSpec(options=options, protocol=protocol))["client"]
    graph, weights = load_model(artifact)
    with torch.no_grad():
        plain = run_plain(graph, {k: torch.from_numpy(v) for k, v in weights.items()}, torch.from_numpy(inputs)).numpy()
    logits = np.asarray(client.logits)
    return {
        "latency_s": statistics.median(client.batch_latency_s[1:]),
        "rounds": int(client.batch_rounds[-1]),
        "bytes_online": int(client.batch_bytes_online[-1]),
        "argmax_agreement": float((logits.argmax(1) == plain.argmax(1)).mean()),
        "max_logit_error": float(np.abs(logits - plain).max()),
    }


def _row(method: str, model: torch.nn.Module, calibration: np.ndarray, latency: LatencyModel, test, args, work: Path, **extra) -> dict:
    """A method's model: test accuracy, predicted cost from its artifact's graph, measured private run."""
    # Measured on an artifact that declares no input range: the server's range check (below, as a
    # verdict) must not decide which models the comparison sees; the logits are checked instead.
    path = export_artifact(model, torch.zeros(1, *SHAPE), work, {})
    predicted = latency.report(artifact_graph(path))
    report = predicted["total"]
    row = {
        "method": method,
        "test_accuracy": evaluate_accuracy(model, *test),
        "predicted_latency_s": report["latency_s"],
        "predicted_link_s": report["link_s"],
        "predicted_rounds": report["rounds"],
        "predicted_bytes_online": report["bytes_online"],
        "relu_count": report["relu_count"],
        "predicted_s_by_kind": _by_kind(predicted["layers"]),
    } | extra
    refused = range_refusal(model, torch.zeros(1, *SHAPE), calibration, latency.protocol)
    row["range_check"] = "accepted" if refused is None else f"refused: {refused}"
    measured = measured_run(path, args.profile, latency.protocol, args.shaping, args.private_batches)
    row |= {f"measured_{k}": v for k, v in measured.items()}
    row["measured_over_predicted"] = measured["latency_s"] / report["latency_s"]
    return row


KINDS = {"Relu": "activations", "MaskedRelu": "activations", "MaxPool": "max-pool", "Conv": "linear", "Gemm": "linear"}


def _by_kind(layers: list[dict]) -> dict[str, float]:
    """Where the predicted seconds go: activations (ReLUs and polynomials), max-pools, linear layers, the rest."""
    out: dict[str, float] = {}
    for r in layers:
        kind = KINDS.get(r["op"], "other")
        out[kind] = out.get(kind, 0.0) + r["latency_s"]
    return out


def study(name: str, protocol: str, args, console: Console, work: Path) -> list[dict]:
    base = base_model(name, args.quiet)
    train = load_fashion_mnist("train")
    train = (train[0][: args.train_samples], train[1][: args.train_samples])
    test = tuple(a[: args.test_samples] for a in load_fashion_mnist("test"))
    fit, val = validation_split(*train, fraction=0.1, seed=args.seed, rounding="down", at_least=1)
    example = torch.zeros(1, *SHAPE)
    console.print(f"[bold]{name} on {protocol}[/]: compute fitted to a session of the base model under {args.network} ...")
    # Kernel shaping puts the client's dealer traffic on the shaped link: priced (keys_over_link).
    link = LatencyModel(protocol, args.profile.describe(), args.profile.rtt_s, args.profile.bandwidth_bps, keys_over_link=args.shaping == "kernel")
    latency = replace(link, compute=measure_compute(export_onnx(base, example), SHAPE, link))
    base_graph = model_graph(base, example)
    full_s = latency.latency_s(base_graph)
    cheapest_s = plan(base, torch.zeros(2, *SHAPE), latency, Budget(full_s))[1]
    calibration = fit[0][:CALIBRATION]
    rows = [_row("base", base, calibration, latency, test, args, work / f"{name}-{protocol}-base", budget_s=None)]
    config = AutoRepConfig(relu_budget=0, epochs=args.epochs, lr=args.lr, seed=args.seed)
    sparsities, pruning = pruning_levels(args.prune_blocks, args.epochs)
    for fraction in args.budgets:
        budget = Budget(cheapest_s + fraction * (full_s - cheapest_s))
        tag = f"{name}-{protocol}-{fraction:g}"
        console.print(
            f"  budget {budget.latency_s:.3f} s ({fraction:g} of the way from the cheapest structure's predicted "
            f"{cheapest_s:.3f} s to the base model's {full_s:.3f} s)"
        )
        started = time.perf_counter()
        try:
            found = search(
                base, fit, val, latency, budget, autorep=config, max_candidates=args.max_candidates, progress=not args.quiet,
                sparsities=sparsities, pruning=pruning,
                calibration=calibration if args.range_check else None, linearize=args.drop_relu_sites,
            )  # fmt: skip
        except (LatencyBudgetError, BudgetError) as err:  # recorded: this budget was not met
            rows.append({"method": "cost-aware", "budget_s": budget.latency_s, "error": str(err)})
            continue
        aware = _row(
            "cost-aware", found.model, calibration, latency, test, args, work / f"{tag}-aware",
            budget_s=budget.latency_s, structure=found.chosen.describe(), train_s=time.perf_counter() - started,
            candidates=[{k: c.__dict__[k] for k in ("pools", "sparsity", "polynomial_sites", "identity_sites", "relu_budget", "val_accuracy", "latency_s", "error")} for c in found.candidates],
        )  # fmt: skip
        rows.append(aware)
        relus = most_relus(base_graph, latency, budget)
        note = None if relus is not None else "the ReLU budget cannot reach this latency: even 0 ReLUs keep the max-pools"
        relus = 0 if relus is None else relus
        chosen = found.chosen
        if not (chosen.pools or chosen.sparsity or chosen.polynomial_sites or chosen.identity_sites) and chosen.relu_budget == relus:
            # The search chose the baseline's own structure and ReLU budget: the same training, the same model.
            rows.append(aware | {"method": "relu-budget", "relu_budget": relus, "note": "the cost-aware search chose this same model"})
            continue
        started = time.perf_counter()
        try:
            # No ReLU at all is AutoReP's all-polynomial baseline (--granularity polynomial).
            baseline = replace(config, relu_budget=relus, granularity="polynomial" if relus == 0 else "element")
            result = optimize_relus(base, fit, val, baseline, progress=not args.quiet)
        except BudgetError as err:
            rows.append({"method": "relu-budget", "budget_s": budget.latency_s, "relu_budget": relus, "error": str(err)})
            continue
        rows.append(_row(
            "relu-budget", result.model, calibration, latency, test, args, work / f"{tag}-relu",
            budget_s=budget.latency_s, relu_budget=relus, note=note, train_s=time.perf_counter() - started,
        ))  # fmt: skip
    return [r | {"model": name, "protocol": protocol} for r in rows]


def targets(rows: list[dict], equal_latency: float, equal_accuracy: float) -> dict:
    """The issue's targets, each from this run's measurements."""
    pairs = []
    for a in rows:
        if a["method"] != "cost-aware" or "error" in a or "measured_latency_s" not in a:
            continue
        b = next((r for r in rows if r["method"] == "relu-budget" and r["model"] == a["model"] and r["protocol"] == a["protocol"]
                  and r.get("budget_s") == a["budget_s"] and "error" not in r), None)  # fmt: skip
        if b is None:
            continue
        speedup = b["measured_latency_s"] / a["measured_latency_s"]
        gain = 100 * (a["test_accuracy"] - b["test_accuracy"])
        equal_lat = abs(speedup - 1) <= equal_latency
        pairs.append({
            "model": a["model"], "protocol": a["protocol"], "budget_s": a["budget_s"],
            "accuracy_gain_points": gain, "measured_speedup_x": speedup,
            "more_accurate_at_equal_latency": equal_lat and gain >= 1.0,
            "faster_at_equal_accuracy": gain >= -equal_accuracy and speedup >= 1.5,
        })  # fmt: skip
    measured = [r for r in rows if "measured_over_predicted" in r]
    return {
        "pairs": pairs,
        "cost_aware_wins (1 point at equal latency, or 1.5x at equal accuracy), every pair": bool(pairs)
        and all(p["more_accurate_at_equal_latency"] or p["faster_at_equal_accuracy"] for p in pairs),
        "pairs_won": sum(p["more_accurate_at_equal_latency"] or p["faster_at_equal_accuracy"] for p in pairs),
        "measured_within_15%_of_predicted, every model": bool(measured) and all(abs(r["measured_over_predicted"] - 1) <= 0.15 for r in measured),
        "worst_measured_over_predicted": max((r["measured_over_predicted"] for r in measured), key=lambda v: abs(v - 1), default=None),
    }


def print_tables(console: Console, report: dict) -> None:
    t = Table(title=f"latency budgets under {report['network']} ({report['shaping']} shaping): predicted beside measured, batch 1")
    cols = (
        "model", "protocol", "budget s", "method", "test acc", "ReLUs", "predicted s", "measured s", "meas/pred", "rounds",
        "MB online", "predicted s: act / pool / linear", "argmax agree", "range check", "structure",
    )  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "protocol", "method", "structure") else "right")
    for r in report["rows"]:
        budget = "-" if r.get("budget_s") is None else f"{r['budget_s']:.3f}"
        if "error" in r:
            t.add_row(r["model"], r["protocol"], budget, r["method"], *["-"] * 10, r["error"][:100])
            continue
        structure = r.get("structure") or (f"ReLU budget {r['relu_budget']}" if "relu_budget" in r else "as trained")
        if r.get("note"):
            structure += f" ({r['note']})"
        t.add_row(
            r["model"], r["protocol"], budget, r["method"], f"{r['test_accuracy']:.4f}", str(r["relu_count"]),
            f"{r['predicted_latency_s']:.3f}", f"{r['measured_latency_s']:.3f}", f"{r['measured_over_predicted']:.2f}",
            f"{r['measured_rounds']} ({r['predicted_rounds']})", f"{r['measured_bytes_online'] / 1e6:.2f}",
            " / ".join(f"{r['predicted_s_by_kind'].get(k, 0.0):.2f}" for k in ("activations", "max-pool", "linear")),
            f"{r['measured_argmax_agreement']:.2f}", r["range_check"].split(":")[0], structure,
        )  # fmt: skip
    console.print(t)
    t = Table(title="cost-aware against relu-budget at the same budget (measured)")
    for c in ("model", "protocol", "budget s", "accuracy gain (pts)", "speedup", "1 pt at equal latency", "1.5x at equal accuracy"):
        t.add_column(c, justify="right")
    for p in report["targets"]["pairs"]:
        t.add_row(
            p["model"], p["protocol"], f"{p['budget_s']:.3f}", f"{p['accuracy_gain_points']:+.2f}", f"{p['measured_speedup_x']:.2f}x",
            "met" if p["more_accurate_at_equal_latency"] else "not met", "met" if p["faster_at_equal_accuracy"] else "not met",
        )  # fmt: skip
    console.print(t)
    for key, value in report["targets"].items():
        if key != "pairs":
            shown = ("met" if value else "not met") if isinstance(value, bool) else value
            console.print(f"target {key}: {shown}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet5", "resnet_fmnist"], choices=["lenet5", "resnet_fmnist", "tiny_resnet", "fashion_cnn"])
    p.add_argument("--protocols", default="crypten,fss")
    p.add_argument("--network", default="wan")
    p.add_argument(
        "--budgets", type=float, nargs="+", default=[0.7, 0.3],
        help="where each budget lies between the cheapest structure's predicted latency (0) and the base model's (1)",
    )  # fmt: skip
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--test-samples", type=int, default=5000)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-candidates", type=int, default=4)
    p.add_argument(
        "--drop-relu-sites", action=argparse.BooleanOptionalAction, default=True,
        help="the cost-aware search may drop whole ReLU sites too (twinfer optimize --drop-relu-sites; default on)",
    )  # fmt: skip
    p.add_argument(
        "--prune-blocks", type=float, default=None, metavar="S",
        help="the cost-aware search may also block-prune, at S/2 and S (twinfer optimize --prune-blocks S); default: no pruning",
    )  # fmt: skip
    p.add_argument(
        "--private-batches", type=int, default=5,
        help="single-image batches per private run; the median of all but the first is reported (the second still waits on the dealer's first keys)",
    )  # fmt: skip
    p.add_argument(
        "--shaping", default="transport", choices=["transport", "kernel"],
        help="transport: twinfer's own link shaping between client and server, the dealer beside the server (default); "
        "kernel: tbf and the delay relay of deploy/netem, where the client's dealer traffic crosses the shaped link too",
    )  # fmt: skip
    p.add_argument("--equal-latency", type=float, default=0.10, help="measured latencies this close (relative) count as equal")
    p.add_argument("--equal-accuracy", type=float, default=0.5, help="accuracies this close (points) count as equal")
    p.add_argument(
        "--range-check", action="store_true",
        help="let the search pass over candidates the server's numeric-range check (margin 4) refuses, as twinfer optimize "
        "does; by default every row records the check's verdict and is measured regardless",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/latency_budget")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.profile = parse_profile(args.network)
    if args.shaping == "kernel":
        from twinfer.deploy.netem.kernel_shaping import check_kernel_shaping_available

        reason = check_kernel_shaping_available()
        if reason:
            p.error(f"--shaping kernel: {reason}")
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=200)
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="twinfer-latency-budget-") as tmp:
        for name in args.models:
            for protocol in protocols:
                rows += study(name, protocol, args, console, Path(tmp))
    report = {
        "benchmark": "latency_budget",
        "network": args.profile.describe(),
        "shaping": args.shaping,
        "protocols": protocols,
        "settings": {k: v for k, v in vars(args).items() if k not in ("profile", "quiet")},
        "data": {"train": f"Fashion-MNIST train, first {args.train_samples} (10% held out)", "test": f"Fashion-MNIST test, first {args.test_samples}"},
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "targets": targets(rows, args.equal_latency, args.equal_accuracy),
        "elapsed_s": time.perf_counter() - started,
    }
    (out / "latency_budget.json").write_text(json.dumps(report, indent=2, default=str))
    print_tables(console, report)
    console.print(f"wrote {out / 'latency_budget.json'} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
