"""`twinfer optimize`: make a model cheap to run privately and write an artifact directory.

--relu-budget learns ReLU masks and DaPa polynomials (AutoReP); --convert he-friendly and
--prune-blocks run MOFHEI's conversion and packing-aware block pruning. With --convert and
--relu-budget together, pooling is converted first and the masks are learned after.
--latency-budget / --bytes-budget with --network and --protocol decide all three from the
backend's cost model instead (optimizer/budget/search.py); the network profile is resolved
here and the optimizer gets its plain numbers (optimizer/ does not import parties/).
--data is a built-in data set or the user's own (.npz with x and y, or an image folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from twinfer.deploy.console import new_console
from twinfer.optimizer.common.artifact import export_artifact
from twinfer.optimizer.common.graph_module import GraphModule
from twinfer.optimizer.common.training import evaluate_accuracy
from twinfer.optimizer.common.validation import validation_split
from twinfer.optimizer.data.datasets import load_fashion_mnist, load_mnist_digits
from twinfer.optimizer.data.user_data import VALIDATION_FRACTION, DataError, Normalization, UserData, check_fits, load_user_data
from twinfer.parties.errors import InputError, ModelError
from twinfer.protocols.artifact import Artifact
from twinfer.protocols.backends import DEFAULT_PROTOCOL, protocols
from twinfer.protocols.passes.onnx_export import export_onnx
from twinfer.parties.runtime.session_spec import SessionSpec

DATASETS = ("fashion-mnist", "mnist")


CALIBRATION_SAMPLES = 2000  # training samples: the declared input range, each layer's range, the comparison widths

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="learn ReLU masks / convert and prune a model; write an artifact directory")
    p.add_argument("--model", required=True, help="ONNX file, or a torch class as 'package.module:Class' with --weights")
    p.add_argument("--weights", default=None, help="safetensors state dict for a --model given as an import path")
    p.add_argument(
        "--data", required=True,
        help=f"training data: {' or '.join(DATASETS)}, a .npz file with arrays x (samples, channels first) and y "
        "(class numbers), or a folder with one sub-folder of images per class (pixels scaled to [0, 1])",
    )  # fmt: skip
    p.add_argument(
        "--normalize", default=None, metavar="MEAN,STD",
        help="the normalisation the model expects, (x - MEAN) / STD, applied to the data once and recorded in the "
        "artifact beside the input range; per channel as M1/M2/M3,S1/S2/S3",
    )  # fmt: skip
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
    p.add_argument(
        "--latency-budget", type=float, default=None, metavar="S",
        help="seconds per inference of one sample, predicted under --network on --protocol: the optimizer decides which "
        "ReLUs are kept, which max-pools become average pools and (with --prune-blocks) how much to prune",
    )  # fmt: skip
    p.add_argument("--bytes-budget", type=int, default=None, metavar="B", help="online bytes per inference of one sample (one party, sent + received)")
    p.add_argument("--network", default=None, help="the link the budget is for: loopback, lan, wan, mobile, or 'rtt=40ms,bw=100mbit'")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=protocols(), help="the backend whose cost model prices the layers")
    p.add_argument("--max-candidates", type=int, default=4, help="structures the budget search trains at most (default 4)")
    p.add_argument(
        "--drop-relu-sites", action="store_true",
        help="let the budget search also drop whole ReLU sites (the identity: no rounds at all, where a polynomial still "
        "costs a square's round and bytes); the model strays further from the original, so training decides",
    )  # fmt: skip
    p.add_argument(
        "--keys-over-link", action="store_true",
        help="the client reaches the dealer over --network too (not beside it): a batch then takes at least the "
        "transfer of the client's correlations (about 1 KB per ReLU on fss), which the prediction adds",
    )  # fmt: skip
    p.add_argument(
        "--calibrate-compute", action="store_true",
        help="measure the local compute per layer with one session of the model under --network (three processes) "
        "instead of the stored defaults; the prediction adds it to the link's lower bound",
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


def load_data(
    name: str, train_samples: int | None, normalization: Normalization | None = None, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], UserData | None]:
    """(train, test, the user's data) of a data set; train is cut to `train_samples` when given.

    The user's own data has no test split: a seeded tenth is held out (the one validation
    split) and reported as the test accuracy; the methods hold out their own part of the rest.
    """
    user = None
    if name == "fashion-mnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    elif name == "mnist":
        xt, yt, xs, ys = load_mnist_digits()
        train, test = (xt, yt), (xs, ys)
    elif not Path(name).exists():
        raise DataError(f"--data {name} is neither a built-in data set ({', '.join(DATASETS)}) nor an existing .npz file or image folder")
    else:
        user = load_user_data(name, normalization)
        train, test = validation_split(user.x, user.y, fraction=VALIDATION_FRACTION, seed=seed, rounding="down")
    if normalization is not None and user is None:
        train, test = (normalization.apply(train[0]), train[1]), (normalization.apply(test[0]), test[1])
    if train_samples is not None:
        if train_samples < 10:
            raise ValueError(f"--train-samples must be at least 10, got {train_samples}")
        train = (train[0][:train_samples], train[1][:train_samples])
    return train, test, user


def _check_user_data(model: nn.Module, user: UserData) -> None:
    """The model's input shape (ONNX) and its number of outputs against the user's samples and labels."""
    shape = tuple(model.graph.input_shape) if isinstance(model, GraphModule) else tuple(user.x.shape[1:])
    if tuple(user.x.shape[1:]) == shape:
        try:
            with torch.no_grad():
                logits = model.eval()(torch.as_tensor(user.x[:1]))
        except RuntimeError as err:
            raise ModelError(f"the model does not run on samples of shape {shape} from {user.source}: {err}") from None
        classes = int(logits.shape[1]) if logits.ndim == 2 else 1
    else:
        classes = 0  # check_fits names the shape first
    check_fits(user, shape, classes)


def optimize(model: str | nn.Module, data: str, out: str | Path, **options: Any) -> Artifact:
    """`twinfer.optimize`: train and write an artifact as `twinfer optimize` does; `model` a torch
    module, an ONNX file or 'package.module:Class' (with weights=FILE), `data` a built-in data set,
    an .npz file or an image folder; `options` are the command's long options with underscores
    (relu_budget=5000, convert="he-friendly", latency_budget=0.5, network="wan", ...). Returns the
    artifact written to `out`.

        artifact = twinfer.optimize("model.onnx", "fashion-mnist", "art/", relu_budget=5000)
        artifact.manifest["accuracy_after"]
    """
    parser = argparse.ArgumentParser(prog="twinfer")
    register(parser.add_subparsers())
    args = parser.parse_args(["optimize", "--model", "-", "--data", str(data), "--out", str(out)])
    unknown = sorted((set(options) - set(vars(args))) | (set(options) & {"model", "data", "out", "func", "json"}))
    if unknown:
        raise TypeError(f"optimize() got options `twinfer optimize` does not take: {', '.join(unknown)}")
    vars(args).update(options, model=model)
    return _optimize(args, new_console(stderr=True))


def run(args: argparse.Namespace) -> int:
    artifact = _optimize(args, new_console(stderr=True))
    if args.json:
        print(json.dumps(artifact.manifest))
    return 0


def _optimize(args: argparse.Namespace, console: Console) -> Artifact:
    """What `run` and `optimize` share: check, load, train and write the artifact (and, without
    --json, say what was written)."""
    budgeted = args.latency_budget is not None or args.bytes_budget is not None
    if args.relu_budget is None and args.convert is None and args.prune_blocks is None and not budgeted:
        raise ValueError("nothing to do: give --latency-budget/--bytes-budget, --relu-budget, --convert he-friendly and/or --prune-blocks")
    _check_options(args)
    latency = _latency_model(args)  # an unknown --network fails before any data is loaded
    model = args.model if isinstance(args.model, nn.Module) else load_trainable(args.model, args.weights)
    try:
        normalization = Normalization.parse(args.normalize) if args.normalize else None
        train, test, user = load_data(args.data, args.train_samples, normalization, args.seed)
        if user is not None:
            _check_user_data(model, user)
    except DataError as err:
        raise InputError(str(err)) from None
    example = torch.as_tensor(train[0][:1], dtype=torch.float32)
    try:
        export_onnx(model, example)  # fail now, not after training, if the model cannot export
        accuracy_before = evaluate_accuracy(model, *test)
    except RuntimeError as err:
        raise ModelError(f"the model does not run on {args.data} samples of shape {tuple(example.shape[1:])}: {err}") from None
    if latency is not None and args.calibrate_compute:
        latency = dataclasses.replace(latency, compute=measure_compute(export_onnx(model, example), tuple(example.shape[1:]), latency))
    started = time.perf_counter()
    manifest: dict = {"dataset": args.data, "seed": args.seed, "accuracy_before": accuracy_before, "methods": []}
    manifest["data"] = user.manifest() if user is not None else {"source": args.data}
    manifest["input_normalization"] = None if normalization is None else normalization.as_dict()
    if budgeted:
        model = _budget_search(model, train, args, latency, manifest)
    if not budgeted and (args.convert is not None or args.prune_blocks is not None):
        model = _mofhei(model, train, args, manifest)
    if not budgeted and args.relu_budget is not None:
        model = _autorep(model, train, args, manifest)
    manifest["accuracy_after"] = evaluate_accuracy(model, *test)
    manifest["optimize_s"] = round(time.perf_counter() - started, 1)
    calibration = train[0][:CALIBRATION_SAMPLES]  # the input range and layer ranges the manifest declares
    out = export_artifact(
        model, example, args.out, manifest, calibration=calibration, margin=args.comparison_margin,
        widths=args.comparison_bits == "auto",
    )  # fmt: skip
    artifact = Artifact.read(out)
    if latency is not None:  # priced on the artifact's own graph (sites and widths applied), after writing it
        artifact = artifact.with_sections(cost_predicted=latency.report(artifact.graph()))
        artifact.write(out)
    if not args.json:
        _announce(artifact.manifest, out, args, len(test[0]), user is not None, latency, console)
    return artifact


def _announce(written: dict, out: Path, args: argparse.Namespace, tested: int, held_out: bool, latency, console: Console) -> None:
    console.print(
        f"wrote {out}: relu_count {written['relu_count']} per sample, test accuracy "
        f"{written['accuracy_before']:.4f} -> {written['accuracy_after']:.4f} ({args.data}, {tested} "
        f"{'held-out' if held_out else 'test'} samples)"
    )
    if latency is not None:
        total = written["cost_predicted"]["total"]
        console.print(
            f"predicted on {latency.protocol} under {latency.network}: {total['latency_s']:.3f} s per sample "
            f"({total['link_s']:.3f} s link + {total['compute_s']:.3f} s compute), {total['rounds']} rounds, "
            f"{total['bytes_online']:,} bytes online"
        )


def _check_options(args: argparse.Namespace) -> None:
    """Every option's value, before any data is loaded or a step trained."""
    budgeted = args.latency_budget is not None or args.bytes_budget is not None
    if budgeted and (args.relu_budget is not None or args.convert is not None):
        raise ValueError("--latency-budget/--bytes-budget decide the ReLUs and the pooling themselves: drop --relu-budget and --convert")
    if args.drop_relu_sites and not budgeted:
        raise ValueError("--drop-relu-sites is a choice of the budget search: give --latency-budget or --bytes-budget")
    if args.keys_over_link and args.network is None:
        raise ValueError("--keys-over-link prices the dealer's bytes on --network PROFILE: give one")
    if args.calibrate_compute and args.network is None:
        raise ValueError("--calibrate-compute measures the compute under --network PROFILE: give one")
    if args.latency_budget is not None and args.network is None:
        raise ValueError("--latency-budget needs --network PROFILE (loopback, lan, wan, mobile, or 'rtt=40ms,bw=100mbit')")
    if budgeted:
        from twinfer.optimizer.budget.search import Budget

        Budget(args.latency_budget, args.bytes_budget)  # a budget that makes no sense fails here
        if args.max_candidates < 1:
            raise ValueError(f"--max-candidates must be at least 1, got {args.max_candidates}")
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


def _latency_model(args: argparse.Namespace):
    """The budget's link and backend as the optimizer's LatencyModel (None without --network or a budget)."""
    from twinfer.optimizer.budget.latency import DEFAULT_COMPUTE, LatencyModel
    from twinfer.parties.wire.network_profile import parse_profile

    if args.network is None and args.bytes_budget is None:
        return None
    profile = parse_profile(args.network or "loopback")
    return LatencyModel(
        args.protocol, profile.describe(), profile.rtt_s, profile.bandwidth_bps, DEFAULT_COMPUTE[args.protocol], args.keys_over_link
    )


def measure_compute(onnx_bytes: bytes, sample_shape: tuple[int, ...], link, batches: int = 6):
    """The compute model of `link` (a LatencyModel) fitted to one session of batch 1 on that link.

    Three local processes over gRPC, the link shaped in the transport (the dealer beside the
    server); what each layer took beyond its share of the link is its compute. Measured on the
    link itself, not on loopback: there the dealer's work for the next batch competes with the
    parties for the CPU, under a real link it runs while they wait.
    """
    from twinfer.deploy.launch.local import run_local_session
    from twinfer.optimizer.budget.latency import ComputeModel
    from twinfer.parties.runtime.model_file import parse_model
    from twinfer.parties.wire.network_profile import NetworkProfile
    from twinfer.parties.wire.transport import TransportOptions
    from twinfer.protocols.cost_model import graph_cost

    if batches < 3:
        raise ValueError(f"a compute fit needs at least 3 batches (the first is not timed), got {batches}")
    inputs = np.random.default_rng(0).random((batches, *sample_shape), dtype=np.float32)
    profile = NetworkProfile(link.network, link.rtt_s, link.bandwidth_bps)
    options = TransportOptions(connect_timeout_s=120, recv_timeout_s=300, network=profile)
    client = run_local_session(onnx_bytes, inputs, 1, spec=SessionSpec(options=options, protocol=link.protocol))["client"]
    # The statistic a measured run reports (the median batch after the first), per layer too: the
    # first batches wait for the dealer's keys inside their comparisons, which a session-wide
    # average would bill to every comparison.
    steady = client.batch_layer_wall_s[1:]
    latency = float(np.median(client.batch_latency_s[1:]))
    graph = parse_model(onnx_bytes)[0]
    costs = graph_cost(graph, 1, link.protocol)
    links = {r["layer"]: r["link_s"] for r in dataclasses.replace(link, compute=ComputeModel()).layers(graph)}
    # Not clipped at zero: a layer's message is often waited for in the next layer, which then
    # looks slower by what this one looks faster; clipping would bill that time twice.
    measured = {n: {"wall_s": float(np.median([b.get(n, 0.0) for b in steady])) - links.get(n, 0.0)} for n in steady[-1]}
    rest = latency - sum(links.values())
    return ComputeModel.fit(costs, measured, rest, f"fitted to a session under {link.network} on this machine ({link.protocol}, batch 1)")


def _budget_search(model: nn.Module, train, args: argparse.Namespace, latency, manifest: dict) -> nn.Module:
    from twinfer.optimizer.autorep.autorep import AutoRepConfig
    from twinfer.optimizer.budget.search import Budget, pruning_levels, search

    budget = Budget(args.latency_budget, args.bytes_budget)
    config = AutoRepConfig(relu_budget=0, granularity=args.granularity, epochs=args.epochs, penalty=args.penalty, seed=args.seed)
    sparsities, pruning = pruning_levels(args.prune_blocks, args.epochs)
    fit, val = validation_split(*train, fraction=0.1, seed=args.seed, rounding="down", at_least=1)
    result = search(
        model, fit, val, latency, budget, autorep=config, sparsities=sparsities, pruning=pruning,
        max_candidates=args.max_candidates, progress=not args.json,
        calibration=train[0][:CALIBRATION_SAMPLES], margin=args.comparison_margin, linearize=args.drop_relu_sites,
    )  # fmt: skip
    manifest["methods"].append("budget")
    manifest["budget_search"] = result.manifest(budget, latency)
    return result.model
