"""`twinfer train-dp`: DP training of an embedding model (dense DP-SGD, DP-FEST, DP-AdaFEST).

    twinfer train-dp --data movielens-100k --model embedding-mlp --epsilon 3 --delta auto \\
        --selection adafest --out ml-dp/
    twinfer infer --model ml-dp/ --input ml-dp/queries.npy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from twinfer.deploy.console import new_console
from twinfer.optimizer.data.dp_data import DATASETS, load_dataset
from twinfer.optimizer.dp.accounting import ACCOUNTANTS
from twinfer.optimizer.dp.ledger import PrivacyLedger
from twinfer.optimizer.dp.sparse_training import (
    FREQUENCY_SOURCES,
    METHODS,
    DPTrainConfig,
    encode_for_artifact,
    plan_privacy,
    sparsity_note,
    train_dp,
    write_dp_artifact,
)

from .report import print_table

MODELS = ("embedding-mlp",)
QUERIES = 16  # test examples written, encoded, as queries.npy beside the artifact


def register(sub: argparse._SubParsersAction) -> None:
    d = DPTrainConfig()
    p = sub.add_parser("train-dp", help="train an embedding model with differential privacy, keeping gradients sparse")
    p.add_argument("--data", required=True, choices=DATASETS, help="movielens-100k, or generated-zipf (synthetic, 1e6 rows)")
    p.add_argument("--model", default="embedding-mlp", choices=MODELS)
    p.add_argument("--epsilon", type=float, required=True, help="target epsilon; the noise multiplier is solved from it")
    p.add_argument("--delta", default="auto", help="target delta (below 1/N), or 'auto' for 0.1/N (N training examples)")
    p.add_argument("--selection", default=d.method, choices=METHODS, help="dense DP-SGD, DP-FEST or DP-AdaFEST")
    p.add_argument("--accountant", default=d.accountant, choices=ACCOUNTANTS)
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="expected Poisson batch size")
    p.add_argument("--clip", type=float, default=d.clip, help="per-example L2 clipping norm C")
    p.add_argument("--lr-embedding", type=float, default=d.lr_embedding)
    p.add_argument("--lr-mlp", type=float, default=d.lr_mlp)
    p.add_argument("--dim", type=int, default=d.dim, help="embedding dimension")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--selection-share", type=float, default=d.selection_share, help="AdaFEST: share of 1/s_eff^2 spent on selection")
    p.add_argument(
        "--contribution-norm", default=d.contribution_norm, choices=["l2", "l1"], help="AdaFEST: per-example map scaled to L2 norm 1 or total 1"
    )
    p.add_argument("--threshold-sigmas", type=float, default=d.threshold_sigmas, help="AdaFEST: tau in units of s1")
    p.add_argument("--fest-topk", type=int, default=d.fest_topk, help="FEST: rows kept per field")
    p.add_argument("--fest-frequencies", default=d.fest_frequencies, choices=FREQUENCY_SOURCES)
    p.add_argument("--topk-noise", type=float, default=d.topk_noise_multiplier, help="FEST: DP top-k noise multiplier")
    p.add_argument("--dense-fields-max-vocab", type=int, default=d.dense_fields_max_vocab)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps; the epsilon reported is what those steps spent"
    )
    p.add_argument("--zipf-vocab", type=int, default=1_000_000, help="generated-zipf: id rows")
    p.add_argument("--zipf-examples", type=int, default=200_000, help="generated-zipf: examples")
    p.add_argument("--out", default=None, help="write the artifact here (model.onnx, manifest.json, tensors.safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _delta(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--delta must be a number or 'auto', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    config = DPTrainConfig(
        method=args.selection,
        epsilon=args.epsilon,
        delta=_delta(args.delta),
        accountant=args.accountant,
        epochs=args.epochs,
        batch_size=args.batch_size,
        clip=args.clip,
        lr_embedding=args.lr_embedding,
        lr_mlp=args.lr_mlp,
        dim=args.dim,
        hidden=args.hidden,
        selection_share=args.selection_share,
        threshold_sigmas=args.threshold_sigmas,
        contribution_norm=args.contribution_norm,
        fest_topk=args.fest_topk,
        fest_frequencies=args.fest_frequencies,
        topk_noise_multiplier=args.topk_noise,
        dense_fields_max_vocab=args.dense_fields_max_vocab,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    data = load_dataset(args.data, seed=args.seed, zipf_vocab=args.zipf_vocab, zipf_examples=args.zipf_examples)
    console = new_console(stderr=args.json)
    label = f"{data.name} (GENERATED, synthetic)" if data.generated else data.name
    privacy = plan_privacy(config, len(data.train_ids))  # fails here, before training, if impossible
    with Progress(
        TextColumn(f"[bold]{config.method}[/] on {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=args.json,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=min(privacy.steps, args.max_steps or privacy.steps), info="")

        def progress(step: int, total: int, info: dict) -> None:
            bar.update(task, completed=step, info=f"loss {info['loss']:.4f}, gradient rows {info['rows']}")

        ledger = PrivacyLedger()
        try:
            result = train_dp(data, config, privacy=privacy, progress=progress, ledger=ledger)
        except KeyboardInterrupt:
            spent = ledger.to_dict(privacy.delta)
            console.print(
                f"interrupted after {spent['steps_run']} of {privacy.steps} steps; nothing was written. Spent so far: "
                f"epsilon {spent['epsilon_rdp']:.3f} (RDP), {spent['epsilon_pld']:.3f} (PLD) at delta {privacy.delta:.3g}"
            )
            raise
    summary = {"dataset": data.summary()} | result.summary() | {"rows": result.rows_kept_per_field()}
    note = sparsity_note(config, data.vocab_total, len(data.train_ids), len(data.vocab_sizes))
    if note:
        summary["note"] = note
    if args.out:
        out = write_dp_artifact(args.out, result, data)
        queries = encode_for_artifact(out, data.test_ids[:QUERIES])
        np.save(Path(out) / "queries.npy", queries.astype(np.float32))
        summary["artifact"] = str(out)
        summary["queries"] = str(Path(out) / "queries.npy")
    if args.json:
        print(json.dumps(summary))
        return 0
    p = result.privacy
    s = result.summary()
    spent = result.spent
    rows = [
        ("dataset", label),
        ("selection", config.method),
        ("test AUC", f"{result.test_auc:.4f}"),
        (
            f"epsilon spent ({spent['steps_run']} steps run)",
            f"{spent['epsilon_rdp']:.3f} (RDP), {spent['epsilon_pld']:.3f} (PLD); {p.accountant.upper()} is reported",
        ),
        (f"epsilon planned ({p.steps} steps, target {p.epsilon_target:g})", f"{p.epsilon_rdp:.3f} (RDP), {p.epsilon_pld:.3f} (PLD)"),
        ("delta", f"{p.delta:.3g}"),
        ("noise multiplier: effective", f"{p.noise_multiplier_effective:.4f}"),
        ("noise multiplier: gradient / selection", f"{p.noise_multiplier_gradient:.4f} / " + (f"{p.noise_multiplier_selection:.4f}" if p.noise_multiplier_selection else "-")),
        ("DP top-k noise multiplier", p.topk_noise_multiplier or "-"),
        ("sampling rate / steps", f"{p.sampling_rate:.4f} / {p.steps}"),
        ("mean gradient rows per step", f"{s['mean_gradient_rows']:.1f} of {s['vocab_total']}"),
        ("median step time", f"{s['step_s_median'] * 1e3:.1f} ms"),
        ("rows kept / dropped", f"{sum(result.rows_kept_per_field()['kept'])} / {sum(result.rows_kept_per_field()['dropped'])}"),
    ]
    rows += [
        (
            f"ledger: {m['name']}",
            f"{m['count']} x Gaussian, noise multiplier {m['noise_multiplier']:.4g}, sensitivity {m['l2_sensitivity']:.3g}, "
            + (f"Poisson rate {m['sampling_rate']:.4g}" if m["sampling"] == "poisson" else "all examples"),
        )
        for m in spent["mechanisms"]
    ]
    if args.out:
        rows += [("artifact", str(out)), ("example queries", summary["queries"])]
    print_table("twinfer train-dp", rows, console)
    if note:
        console.print(f"note: {note}")
    return 0
