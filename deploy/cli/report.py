"""Readable tables of what a run measured."""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from ..console import new_console


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(title: str, rows: list[tuple[str, Any]], console: Console | None = None) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value if isinstance(value, str) else f"{value}")
    (console or new_console()).print(table)


_OP_KINDS = {"Gemm": "linear", "Affine": "linear", "Conv": "linear", "Embedding": "lookup", "PublicAdd": "public", "PublicMul": "public"}


def op_kind(op: str) -> str:
    """What a table groups a graph op under (matmul with a weight: linear; the private lookup: lookup)."""
    return _OP_KINDS.get(op, op)


def per_op_kind(ops: dict[str, str], layers: dict[str, dict]) -> dict[str, dict[str, float]]:
    """A party's measured layers (PartyReport.layers) summed per op kind; `ops`: each node's op by
    name. Layers that are no node (share_input, reveal_output, ...) keep their own names."""
    kinds: dict[str, dict[str, float]] = {}
    for name, c in layers.items():
        if name in ("", "share_weights"):
            continue
        row = kinds.setdefault(op_kind(ops[name]) if name in ops else name, dict.fromkeys(("rounds", "bytes_online", "bytes_offline", "wall_s"), 0.0))
        row["rounds"] += c["rounds"]
        row["bytes_online"] += c["bytes_sent"] + c["bytes_received"]
        row["bytes_offline"] += c["bytes_offline"]
        row["wall_s"] += c["wall_s"]
    return kinds


def print_op_kinds(title: str, kinds: dict[str, dict[str, float]], console: Console | None = None) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    for col in ("op kind", "rounds", "online", "dealer (this party)", "seconds"):
        table.add_column(col, justify="right" if col != "op kind" else "left")
    for kind, c in sorted(kinds.items(), key=lambda kv: -kv[1]["wall_s"]):
        table.add_row(kind, f"{c['rounds']:.0f}", human_bytes(c["bytes_online"]), human_bytes(c["bytes_offline"]), f"{c['wall_s']:.2f}")
    (console or new_console()).print(table)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("samples / batch size", f"{summary['n_samples']} / {summary['batch_size']}"),
        ("latency per batch", f"{summary['latency_per_batch_s']:.3f} s"),
        ("setup (connect, share weights)", f"{summary['setup_s']:.3f} s"),
        ("rounds per batch", summary["rounds_per_batch"]),
        ("bytes_online (client<->server)", human_bytes(summary["bytes_online"])),
        ("bytes_offline (from dealer)", human_bytes(summary["bytes_offline"])),
        ("relu_count", f"{summary['relu_count']} ({summary['relu_per_sample']} per sample)"),
        ("comparisons (ReLU, max-pool, clip)", summary["comparisons"]),
        ("protocol", summary["protocol"]),
    ] + (
        [("public inputs (sent in the clear)", f"{', '.join(summary['public_inputs'])}: the server learns which tokens are padding")]
        if summary.get("public_inputs")
        else []
    ) + (
        encoding_rows(summary)
        if "fraction_bits" in summary
        else []
    ) + (
        [
            ("network", summary["network"]),
            ("last batch: measured / lower bound", f"{summary['last_batch_latency_s']:.3f} s / {summary['lower_bound_s']:.3f} s"),
            ("measured / lower bound", f"{summary['latency_over_lower_bound']:.2f}" if summary["latency_over_lower_bound"] else "-"),
        ]
        if "network" in summary
        else []
    )


def encoding_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The session's fixed point as its server settled it (SessionEncoding.summary)."""
    kinds = summary["truncation"]
    exact = summary["exact_truncations"]
    lo, hi = summary["input_range_held"]
    rows = [
        ("fixed point", f"{summary['fraction_bits']} fractional bits"),
        ("stated error", f"{summary['stated_error']:.3g} ({summary['stated_error_source']})"),
        ("truncation", f"exact in {exact} of {len(kinds)} layers, local elsewhere" if exact else f"local in all {len(kinds)} layers"),
        ("truncation failure risk per sample", f"{summary['truncation_failure_per_sample']:.1e}"),
        ("inputs the server holds", f"[{lo:g}, {hi:g}]"),
    ]
    if summary.get("fraction_bits_chosen"):
        rows.insert(1, ("fraction bits chosen", summary["fraction_bits_chosen"]))
    return rows


def predicted_beside_measured(predicted: dict[str, Any], layers: dict[str, dict], batch_latency_s: list[float]) -> dict[str, Any]:
    """The manifest's predicted cost per layer (batch 1) beside what the client measured, per batch.

    `layers` are the client's counters summed over the session's batches (PartyReport.layers);
    the total's measured latency is the median batch after the first (which records the dealer's plan).
    """
    batches = max(len(batch_latency_s), 1)
    rows = []
    for p in predicted["layers"]:
        m = layers.get(p["layer"])
        rows.append({
            "layer": p["layer"], "op": p["op"],
            "latency_s_predicted": p["latency_s"], "latency_s_measured": None if m is None else m["wall_s"] / batches,
            "bytes_online_predicted": p["bytes_online"],
            "bytes_online_measured": None if m is None else (m["bytes_sent"] + m["bytes_received"]) / batches,
            "rounds_predicted": p["rounds"], "rounds_measured": None if m is None else m["rounds"] / batches,
        })  # fmt: skip
    steady = batch_latency_s[1:] or batch_latency_s
    measured = statistics.median(steady) if steady else None
    total = predicted["total"]
    return {
        "protocol": predicted["protocol"],
        "network": predicted["network"],
        "layers": rows,
        "total": {
            "latency_s_predicted": total["latency_s"],
            "latency_s_measured": measured,
            "measured_over_predicted": None if measured is None or not total["latency_s"] else measured / total["latency_s"],
            "bytes_online_predicted": total["bytes_online"],
            "rounds_predicted": total["rounds"],
        },
    }


def print_predicted_beside_measured(cmp: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=f"per layer, one batch: predicted ({cmp['protocol']}, {cmp['network']}) beside measured", header_style="bold")
    for col in ("layer", "op", "latency predicted", "latency measured", "bytes predicted", "bytes measured", "rounds pred.", "rounds meas."):
        table.add_column(col, justify="right" if col not in ("layer", "op") else "left")

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in cmp["layers"]:
        table.add_row(
            r["layer"], r["op"], num(r["latency_s_predicted"], ".4f"), num(r["latency_s_measured"], ".4f"),
            human_bytes(r["bytes_online_predicted"]), "-" if r["bytes_online_measured"] is None else human_bytes(r["bytes_online_measured"]),
            str(r["rounds_predicted"]), num(r["rounds_measured"], "g"),
        )  # fmt: skip
    t = cmp["total"]
    ratio = "-" if t["measured_over_predicted"] is None else f"{t['measured_over_predicted']:.2f}x predicted"
    table.add_row("total", "-", num(t["latency_s_predicted"], ".4f"), f"{num(t['latency_s_measured'], '.4f')} ({ratio})",
                  human_bytes(t["bytes_online_predicted"]), "", str(t["rounds_predicted"]), "")  # fmt: skip
    (console or new_console()).print(table)
