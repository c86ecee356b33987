"""`twinfer bench sweep`: a grid of private-inference runs as Ray tasks; one JSON, a table, plots.

The grid is models x protocols x batch sizes x network profiles. A model is an ONNX file or an artifact
folder from `twinfer optimize` (one per ReLU budget, say), so a ReLU-budget axis is a list of
artifact folders. Each run is one session of three local party processes inside one Ray task
(`measure` of deploy/bench/latency.py: the profile shapes twinfer's transport, one
warm-up batch records the dealer's plan, then `reps` measured batches; the median is
reported beside the network's lower bound). Each task reserves `cpus_per_run` Ray CPUs, so
two runs share a node's CPUs only when the config asks for it. A failed run is recorded with
its error and the sweep goes on.

sweep.yaml (or .toml); paths are relative to the file:

    models: [fashion_cnn.onnx, artifacts/budget_2000/, artifacts/budget_500/]
    protocols: [fss-compact, crypten]   # default: twinfer's default protocol
    batch_sizes: [1, 8]
    networks: [loopback, lan, "rtt=40ms,bw=100mbit"]
    reps: 2            # measured batches per run (default 2)
    cpus_per_run: 2    # Ray CPUs each run reserves (default 2: a run is three processes)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from twinfer.parties.wire.network_profile import NetworkProfile, parse_profile
from twinfer.protocols.backends import DEFAULT_PROTOCOL
from twinfer.protocols.backends import protocols as known_protocols

KEYS = {
    "models": "ONNX files or artifact folders",
    "protocols": "secure backends, side by side",
    "batch_sizes": "samples per private batch",
    "networks": "network profiles: loopback, lan, wan, mobile or 'rtt=..,bw=..'",
    "reps": "measured batches per run",
    "cpus_per_run": "Ray CPUs each run reserves",
}


@dataclass
class SweepConfig:
    models: dict[str, Path]  # name in the results -> file or artifact folder
    batch_sizes: list[int]
    networks: list[NetworkProfile]
    reps: int = 2
    cpus_per_run: float = 2.0
    source: Path | None = field(default=None, compare=False)
    protocols: list[str] = field(default_factory=lambda: [DEFAULT_PROTOCOL])

    @classmethod
    def load(cls, path: str | Path) -> SweepConfig:
        from twinfer.deploy.config.party_config import check_value, read_config_file, reject_unknown

        path = Path(path)
        data = read_config_file(path)
        reject_unknown(path, data, KEYS)
        for key in ("models", "batch_sizes", "networks"):
            if key not in data:
                raise ValueError(f"{path}: key '{key}' is required ({KEYS[key]})")
            check_value(path, key, data[key], list, KEYS[key])
            if not data[key]:
                raise ValueError(f"{path}: key '{key}' must not be empty")
        for key, kind in (("reps", int), ("cpus_per_run", (int, float))):
            if key in data:
                check_value(path, key, data[key], kind, KEYS[key])
        for i, value in enumerate(data["models"]):
            check_value(path, f"models[{i}]", value, str, "a model file or artifact folder")
        for i, value in enumerate(data["batch_sizes"]):
            check_value(path, f"batch_sizes[{i}]", value, int, "samples per batch")
            if value < 1:
                raise ValueError(f"{path}: key 'batch_sizes[{i}]' must be at least 1, got {value}")
        networks = []
        for i, value in enumerate(data["networks"]):
            check_value(path, f"networks[{i}]", value, str, KEYS["networks"])
            try:
                networks.append(parse_profile(value))
            except ValueError as err:
                raise ValueError(f"{path}: key 'networks[{i}]': {err}") from None
        protocols = data.get("protocols", [DEFAULT_PROTOCOL])
        check_value(path, "protocols", protocols, list, KEYS["protocols"])
        for i, value in enumerate(protocols):
            if value not in known_protocols():
                raise ValueError(f"{path}: key 'protocols[{i}]' must be one of {', '.join(known_protocols())}, got {value!r}")
        if not protocols or len(set(protocols)) != len(protocols):
            raise ValueError(f"{path}: key 'protocols' must name distinct protocols, got {protocols}")
        reps, cpus = data.get("reps", 2), float(data.get("cpus_per_run", 2.0))
        if reps < 1 or cpus <= 0:
            raise ValueError(f"{path}: 'reps' must be at least 1 and 'cpus_per_run' positive")
        models: dict[str, Path] = {}
        for value in data["models"]:
            model = (path.parent / value).resolve()
            if not model.exists():
                raise ValueError(f"{path}: model {value} does not exist ({model})")
            name = model.stem if model.is_file() else model.name
            while name in models:
                name += "'"
            models[name] = model
        return cls(models, list(data["batch_sizes"]), networks, reps, cpus, path, list(protocols))


def _run_point(
    name: str, kind: str, data: bytes, shape: tuple[int, ...], protocol: str, profile: NetworkProfile, batch: int, reps: int
) -> dict:
    """One run, inside a Ray task: one session of three local processes on `protocol` under `profile`."""
    import ray

    from twinfer.deploy.bench.latency import measure

    start = time.perf_counter()
    row = measure(name, data, shape, profile, batch=batch, reps=reps, protocol=protocol)
    row.pop("layers_per_batch", None)
    row.update(
        model_kind=kind,
        samples_per_s=batch / row["latency_s"],
        run_wall_s=time.perf_counter() - start,
        node=ray.get_runtime_context().get_node_id(),
    )
    return row


def run_sweep(config: SweepConfig, out: Path, *, ray_address: str | None = None, progress: bool = True) -> list[dict]:
    """Every grid point as a Ray task; writes sweep.json, sweep.md and plots to `out`; returns the rows."""
    import ray
    from tqdm import tqdm

    from twinfer.deploy.launch.ray_launcher import RayOptions, init_ray
    from twinfer.parties.runtime.model_file import parse_model, read_model_bytes

    models = {}
    for name, path in config.models.items():  # parsed here: a bad model fails before any task starts
        data = read_model_bytes(path)
        graph, _ = parse_model(data, source=str(path))
        models[name] = (data, graph.input_shape, "artifact" if path.is_dir() else "onnx", graph.relu_count())
    points = [(m, q, b, p) for m in models for q in config.protocols for b in config.batch_sizes for p in config.networks]
    started = init_ray(RayOptions(address=ray_address))
    rows: list[dict] = []
    try:
        available = ray.cluster_resources().get("CPU", 0)
        if available < config.cpus_per_run:
            raise ValueError(f"each run reserves {config.cpus_per_run:g} CPUs (cpus_per_run), the Ray cluster has {available:g}")
        task = ray.remote(num_cpus=config.cpus_per_run, max_retries=0)(_run_point)
        refs = {}
        stored = {name: ray.put(m[0]) for name, m in models.items()}
        for name, protocol, batch, profile in points:
            _, shape, kind, _ = models[name]
            refs[task.remote(name, kind, stored[name], shape, protocol, profile, batch, config.reps)] = (name, protocol, batch, profile)
        bar = tqdm(total=len(refs), desc="sweep", unit="run", disable=not progress)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                name, protocol, batch, profile = refs[ref]
                try:
                    row = ray.get(ref)
                except Exception as err:  # a failed run is recorded, the sweep goes on
                    row = {"model": name, "protocol": protocol, "batch": batch, "profile": profile.name, "error": str(err).splitlines()[-1][:500]}
                row["relu_per_sample"] = models[name][3]
                rows.append(row)
                bar.update(1)
        bar.close()
    finally:
        if started:
            ray.shutdown()
    order = {(m, q, b, p.name): i for i, (m, q, b, p) in enumerate(points)}
    rows.sort(key=lambda r: order[(r["model"], r["protocol"], r["batch"], r["profile"])])
    write_results(config, rows, out)
    return rows


# Short headers, so that the table stands in 80 columns; sweep.md and the help say what each holds.
HEADER = ["model", "protocol", "network", "batch", "latency s", "bound s", "ratio", "rounds", "MB online", "ReLU per sample", "samples per s"]
_TEXT_COLUMNS = ("model", "protocol", "network")


def _table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    body = []
    for r in rows:
        head = [r["model"], r.get("protocol", "-"), r["profile"], str(r["batch"])]
        if "error" in r:
            body.append(head + ["failed: " + r["error"][:60], "", "", "", "", str(r["relu_per_sample"]), ""])
            continue
        ratio = f"{r['latency_over_lower_bound']:.2f}" if r.get("latency_over_lower_bound") else "-"
        body.append(
            head + [f"{r['latency_s']:.3f}", f"{r['lower_bound_s']:.3f}", ratio, str(r["rounds"]), f"{r['bytes_online'] / 1e6:.2f}",
                    str(r["relu_per_sample"]), f"{r['samples_per_s']:.2f}"]
        )  # fmt: skip
    return HEADER, body


def sweep_table(rows: list[dict]) -> Table:
    """The terminal table: cells and headers fold onto a second line rather than being cut ('late…')."""
    from rich import box

    header, body = _table_rows(rows)
    table = Table(title=f"twinfer sweep ({len(rows)} runs)", box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
    for column in header:
        words = column.split()  # a header breaks between its words, never inside one
        table.add_column("\n".join(words), justify="left" if column in _TEXT_COLUMNS else "right", overflow="fold",
                         min_width=max(len(w) for w in words))  # fmt: skip
    for r in body:
        table.add_row(*r)
    return table


def write_results(config: SweepConfig, rows: list[dict], out: Path) -> list[Path]:
    """sweep.json (every row and the machine), sweep.md (the table) and the plots; prints the table."""
    from twinfer.deploy.console import new_console

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": str(config.source) if config.source else None,
        "models": {k: str(v) for k, v in config.models.items()},
        "protocols": config.protocols,
        "batch_sizes": config.batch_sizes,
        "networks": [p.name for p in config.networks],
        "reps": config.reps,
        "cpus_per_run": config.cpus_per_run,
        "cpu_count": os.cpu_count(),
        "note": "latency_s: median of the measured batches of one session; lower_bound_s: predicted from rounds and bytes",
    }
    (out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header, body = _table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    new_console().print(sweep_table(rows))
    written = [out / "sweep.json", out / "sweep.md", *plot(rows, out)]
    for path in written:
        print(f"wrote {path}")
    return written


def draw_series(ax: Any, pts: list[tuple[float, float, float]], label: str, bound: bool) -> None:
    """One model's measured points (batch, value, lower bound) and, for latency, its lower bound:
    marked points on both, so that a sweep of one batch size still shows the bound."""
    line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)[0]
    if bound:
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "_:", markersize=14, color=line.get_color(), label=f"{label} lower bound")


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Latency and throughput against batch size (one panel per network, a line per model), and
    latency against ReLUs per sample when the models differ in ReLU count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    if not ok:
        return []
    networks = list(dict.fromkeys(r["profile"] for r in ok))
    models = list(dict.fromkeys((r["model"], r.get("protocol", "-")) for r in ok))
    written = []
    for key, label, fname in (("latency_s", "latency per batch (s)", "sweep_latency.png"), ("samples_per_s", "samples per second", "sweep_throughput.png")):
        fig, axes = plt.subplots(1, len(networks), figsize=(4 * len(networks), 3.5), squeeze=False)
        for ax, network in zip(axes[0], networks):
            for model, protocol in models:
                pts = sorted(
                    (r["batch"], r[key], r["lower_bound_s"]) for r in ok
                    if (r["model"], r.get("protocol", "-")) == (model, protocol) and r["profile"] == network
                )  # fmt: skip
                if pts:
                    draw_series(ax, pts, f"{model} ({protocol})", bound=key == "latency_s")
            ax.set_title(network, fontsize=9)
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    relus = {r["relu_per_sample"] for r in ok}
    if len(relus) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for network in networks:
            for protocol in dict.fromkeys(r.get("protocol", "-") for r in ok):
                for batch in sorted({r["batch"] for r in ok}):
                    pts = sorted(
                        (r["relu_per_sample"], r["latency_s"]) for r in ok
                        if r["profile"] == network and r["batch"] == batch and r.get("protocol", "-") == protocol
                    )  # fmt: skip
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{protocol}, {network}, batch {batch}")
        ax.set_xlabel("ReLUs per sample")
        ax.set_ylabel("latency per batch (s)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "sweep_relu.png", dpi=120)
        plt.close(fig)
        written.append(out / "sweep_relu.png")
    return written

