"""Readable tables of what a run measured."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


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
    (console or Console()).print(table)


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
        [
            ("fixed point", f"{summary['fraction_bits']} fractional bits"),
            (f"stated error ({summary['stated_error_sigmas']:g} sigma)", f"{summary['stated_error']:.3g}"),
            ("truncation failure risk per sample", f"{summary['truncation_failure_per_sample']:.1e}"),
        ]
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
