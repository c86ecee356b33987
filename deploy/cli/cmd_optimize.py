"""`twinfer optimize`: make a model cheap to run privately and write an artifact directory.

--relu-budget learns ReLU masks and DaPa polynomials (AutoReP); --convert he-friendly and
--prune-blocks run MOFHEI's conversion and packing-aware block pruning. With --convert and
--relu-budget together, pooling is converted first and the masks are learned after.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.graph_module import GraphModule
from twinfer.optimizer.common.training import evaluate_accuracy
from twinfer.optimizer.data.datasets import load_fashion_mnist, load_mnist_digits
from twinfer.parties.errors import ModelError
from twinfer.protocols.ir.onnx_export import export_onnx

DATASETS = ("fashion-mnist", "mnist")


CALIBRATION_SAMPLES = 2000  # training samples: the declared input range, each layer's range, the comparison widths

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="learn ReLU masks / convert and prune a model; write an artifact directory")
    p.add_argument("--model", required=True, help="ONNX file, or a torch class as 'package.module:Class' with --weights")
    p.add_argument("--weights", default=None, help="safetensors state dict for a --model given as an import path")
    p.add_argument("--data", required=True, choices=DATASETS, help="training data set")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--relu-budget", type=int, default=None, help="AutoReP: at most this many ReLU elements per sample")
    p.add_argument("--granularity", default="element", choices=("element", "channel", "polynomial"), help="AutoReP mask granularity (channel and polynomial are baselines)")
    p.add_argument("--convert", default=None, help="MOFHEI conversion: he-friendly")
    p.add_argument("--prune-blocks", type=float, default=None, help="MOFHEI block pruning target sparsity in [0, 1)")
    p.add_argument("--epochs", type=float, default=2.0, help="AutoReP training epochs over the training samples (default 2)")
    p.add_argument("--train-samples", type=int, default=None, help="use only the first N training samples (CPU budgets)")
    p.add_argument("--penalty", type=float, default=10.0, help="AutoReP budget hinge weight (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--comparison-bits", default="full", choices=("full", "auto"),
        help="full: every secure comparison on all 64 bits, exact for any value (default); auto: per layer, the "
        "narrowest width that holds --comparison-margin x the largest value the training data reached there "
        "(smaller fss keys and faster evaluation; the manifest names the risk)",
    )  # fmt: skip
    p.add_argument(
        "--comparison-margin", type=float, default=4.0,
        help="headroom factor over what the calibration samples reached in each layer: the server's range check "
        "and, with --comparison-bits auto, the comparison widths (default 4)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def load_trainable(spec: str, weights: str | None) -> nn.Module:
    """A torch module from an ONNX file, or from 'package.module:Class' plus a safetensors state dict."""
    path = Path(spec)
    if path.suffix == ".onnx" or path.exists():
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        try:
            return GraphModule.from_onnx(path.read_bytes())
        except ValueError as err:
            raise ModelError(f"{path}: {err}") from None
    if ":" not in spec:
        raise ModelError(f"--model {spec!r} is neither an existing .onnx file nor 'package.module:Class'")
    module_name, _, cls_name = spec.partition(":")
    try:
        model = getattr(importlib.import_module(module_name), cls_name)()
    except (ImportError, AttributeError, TypeError) as err:
        raise ModelError(f"cannot build {spec}: {err}") from None
    if weights is None:
        raise ModelError(f"--model {spec} is a torch class: give its trained weights with --weights FILE.safetensors")
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except (OSError, RuntimeError) as err:
        raise ModelError(f"weights {weights} do not load into {spec}: {err}") from None
    return model.eval()


def load_data(name: str, train_samples: int | None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) arrays of a data set; train is cut to `train_samples` when given."""
    if name == "fashion-mnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    else:
        xt, yt, xs, ys = load_mnist_digits()
        train, test = (xt, yt), (xs, ys)
    if train_samples is not None:
        if train_samples < 10:
            raise ValueError(f"--train-samples must be at least 10, got {train_samples}")
        train = (train[0][:train_samples], train[1][:train_samples])
    return train, test


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    if args.relu_budget is None and args.convert is None and args.prune_blocks is None:
        raise ValueError("nothing to do: give --relu-budget, --convert he-friendly and/or --prune-blocks")
    _check_options(args)
    model = load_trainable(args.model, args.weights)
    train, test = load_data(args.data, args.train_samples)
    example = torch.as_tensor(train[0][:1], dtype=torch.float32)
    try:
        export_onnx(model, example)  # fail now, not after training, if the model cannot export
        accuracy_before = evaluate_accuracy(model, *test)
    except RuntimeError as err:
        raise ModelError(f"the model does not run on {args.data} samples of shape {tuple(example.shape[1:])}: {err}") from None
    started = time.perf_counter()
    manifest: dict = {"dataset": args.data, "seed": args.seed, "accuracy_before": accuracy_before, "methods": []}
    if args.convert is not None or args.prune_blocks is not None:
        model = _mofhei(model, train, args, manifest)
    if args.relu_budget is not None:
        model = _autorep(model, train, args, manifest)
    manifest["accuracy_after"] = evaluate_accuracy(model, *test)
    manifest["optimize_s"] = round(time.perf_counter() - started, 1)
    calibration = train[0][:CALIBRATION_SAMPLES]  # the input range and layer ranges the manifest declares
    out = export_artifact(
        model, example, args.out, manifest, calibration=calibration, margin=args.comparison_margin,
        widths=args.comparison_bits == "auto",
    )  # fmt: skip
    written = json.loads((out / "manifest.json").read_text())
    if args.json:
        print(json.dumps(written))
    else:
        console.print(
            f"wrote {out}: relu_count {written['relu_count']} per sample, test accuracy "
            f"{written['accuracy_before']:.4f} -> {written['accuracy_after']:.4f} ({args.data}, {len(test[0])} test samples)"
        )
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Every option's value, before any data is loaded or a step trained."""
    if args.comparison_margin < 1:
        raise ValueError(f"--comparison-margin multiplies the observed range and must be at least 1, got {args.comparison_margin}")
    from twinfer.optimizer.autorep.autorep import AutoRepConfig
    from twinfer.optimizer.mofhei.block_pruning import check_sparsity
    from twinfer.optimizer.mofhei.mofhei import check_convert

    check_convert(args.convert)
    if args.prune_blocks is not None:
        check_sparsity(args.prune_blocks)
    if args.relu_budget is not None:
        AutoRepConfig(relu_budget=args.relu_budget, granularity=args.granularity, epochs=args.epochs, penalty=args.penalty)


def _autorep(model: nn.Module, train, args: argparse.Namespace, manifest: dict) -> nn.Module:
    from twinfer.optimizer.autorep.autorep import AutoRepConfig, config_dict, optimize_relus
    from twinfer.optimizer.common.validation import validation_split

    config = AutoRepConfig(relu_budget=args.relu_budget, granularity=args.granularity, epochs=args.epochs, penalty=args.penalty, seed=args.seed)
    # A seeded tenth of the training data, never the test set, picks the checkpoint.
    fit, val = validation_split(*train, fraction=0.1, seed=args.seed, rounding="down", at_least=1)
    result = optimize_relus(model, fit, val, config)
    manifest["methods"].append("autorep")
    manifest["budget"] = args.relu_budget
    manifest["autorep"] = {
        "config": config_dict(config),
        "relu_total": result.relu_total,
        "val_accuracy": result.val_accuracy,
        "history": result.history,
    }
    return result.model


def _mofhei(model: nn.Module, train, args: argparse.Namespace, manifest: dict) -> nn.Module:
    from twinfer.optimizer.mofhei.he_friendly import Split
    from twinfer.optimizer.mofhei.mofhei import optimize_mofhei

    result = optimize_mofhei(
        model,
        Split.of(*train, seed=args.seed),
        convert=args.convert,
        prune_blocks=args.prune_blocks,
        activations=args.relu_budget is None,  # with a ReLU budget, masks replace activations next
    )
    manifest["methods"].append("mofhei")
    manifest.update(result.manifest)
    return result.model
