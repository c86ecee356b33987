"""Private-inference latency under network profiles: measured beside the lower bound.

For each model and profile, one session of 1 + reps batches runs as three local processes
with the profile applied in twinfer's transport (both directions between client and server;
the dealer sits next to the server). With --kernel, the same sessions also run as real
`twinfer party` processes in two network namespaces joined by a tbf-limited veth pair, with
the delay added by a TCP relay (deploy/netem/kernel_shaping.py). The first batch records the dealer's tuple plan; the reported
latency is the median of the others. Each row prints the lower bound
`rounds * rtt/2 + bytes of the busier direction / bandwidth` and measured / bound.

    python benchmarks/network_profiles.py [--models fashion_cnn tiny_resnet] [--profiles loopback lan wan mobile]
        [--batch 1] [--reps 2] [--sweep] [--kernel] [--out results/network]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from twinfer.parties.wire.network_profile import NetworkProfile, parse_profile
from twinfer.protocols.backends import DEFAULT_PROTOCOL, backend_class
from twinfer.parties.runtime.session import PartyReport
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.wire.transport import TransportOptions

RTT_SWEEP_MS = (0.5, 10, 40, 80)  # at 100 Mbit/s
BW_SWEEP_MBIT = (20, 100, 1000)  # at 40 ms


def sweep_profiles() -> list[NetworkProfile]:
    """RTT swept at 100 Mbit/s, bandwidth swept at 40 ms; the 40 ms / 100 Mbit point is shared."""
    rtt = [NetworkProfile(f"sweep rtt={r:g}ms,bw=100mbit", r / 1e3, 100e6) for r in RTT_SWEEP_MS]
    bw = [NetworkProfile(f"sweep rtt=40ms,bw={b:g}mbit", 0.040, b * 1e6) for b in BW_SWEEP_MBIT if b != 100]
    return rtt + bw


OFFLINE_MODES = ("overlap", "ahead")


def _row(model: str, profile: NetworkProfile, shaping: str, batch: int, client: PartyReport, offline: str = "overlap") -> dict[str, Any]:
    """One measured point; `label` is the model and, beside it, the protocol that ran."""
    steady = slice(1, None) if len(client.batch_latency_s) > 1 else slice(None)
    rounds = client.batch_rounds[-1]
    online = client.batch_bytes_online[-1]
    one_way = max(client.batch_bytes_sent[-1], online - client.batch_bytes_sent[-1])
    latency = statistics.median(client.batch_latency_s[steady])
    bound = profile.lower_bound_s(rounds, one_way)
    batches = len(client.batch_latency_s)
    layers = {
        name: {k: v / batches for k, v in counters.items()}
        for name, counters in client.layers.items()
        if name not in ("", "share_weights")
    }
    return {
        "model": model,
        "protocol": client.protocol,
        "label": f"{model} ({client.protocol})",
        "profile": profile.name,
        "shaping": shaping,
        "offline": offline,
        "rtt_s": profile.rtt_s,
        "bandwidth_bps": profile.bandwidth_bps,
        "batch": batch,
        "latency_s": latency,
        "first_batch_latency_s": client.batch_latency_s[0],
        "lower_bound_s": bound,
        "latency_over_lower_bound": latency / bound if bound > 0 else None,
        "rounds": rounds,
        "bytes_online": online,
        "bytes_one_way": one_way,
        "relu_count": client.relu_count // batches,
        "comparisons": client.comparisons // batches,
        "bytes_offline_per_batch": client.bytes_offline / batches,
        # where the client's time went, per batch over every layer: its own work, the peer, the dealer
        "compute_s": sum(c["compute_s"] for c in layers.values()),
        "peer_wait_s": sum(c["wait_s"] for c in layers.values()),
        "dealer_wait_s": sum(c["dealer_wait_s"] for c in layers.values()),
        "layers_per_batch": layers,
    }


def measure(
    model: str, onnx_bytes: bytes, sample_shape: tuple[int, ...], profile: NetworkProfile, *, batch: int, reps: int,
    protocol: str = DEFAULT_PROTOCOL, offline: str = "overlap", inputs: np.ndarray | None = None, settle: bool = False,
) -> dict:
    """One session under `profile`, shaped in twinfer's transport; `inputs` (batch x (1 + reps)
    samples, e.g. token ids), else uniform random ones of `sample_shape`. `settle`: the encoding
    is settled on these inputs before the parties start, as `twinfer infer` does (for a model
    that declares no input range and whose server's own search would find none).

    The dealer sits next to the server (its links unshaped), as in the kernel-shaped runs,
    where it shares the server's namespace. `offline`: overlap (the dealer makes the next
    batch's correlations while this one runs, as a service does back to back) or ahead (made
    between batches: the online phase alone, with no dealer work competing for the CPU).
    """
    if offline not in OFFLINE_MODES:
        raise ValueError(f"offline mode must be one of {', '.join(OFFLINE_MODES)}, got '{offline}'")
    from twinfer.deploy.launch.local import run_local_session

    if inputs is None:
        inputs = np.random.default_rng(0).random((batch * (1 + reps), *sample_shape), dtype=np.float32)
    # The server waits for the client while the client's process starts (imports torch and
    # crypten): on a loaded machine that takes far longer than the 10 s default.
    options = TransportOptions(recv_timeout_s=300, connect_timeout_s=120, network=profile)
    spec = SessionSpec(protocol=protocol, options=options, prefetch=True, prefetch_ahead=offline == "ahead")
    encoding = None
    if settle:
        from twinfer.deploy.launch.inference import check_session
        from twinfer.parties.runtime.model_file import parse_model

        graph, weights = parse_model(onnx_bytes)
        encoding = check_session(graph, weights, inputs, spec)[1]
    reports = run_local_session(
        onnx_bytes, inputs, batch, spec,
        listen_timeout_s=900.0,  # a large model's server checks its fixed point for minutes before it listens
        encoding=encoding,
    )
    return _row(model, profile, "transport", batch, reports["client"], offline) | {"logits": np.asarray(reports["client"].logits).tolist()}


def measure_kernel(model: str, onnx_path: Path, sample_shape: tuple[int, ...], profile: NetworkProfile, *, batch: int, reps: int) -> dict:
    """The same session with parties in network namespaces: tc tbf bandwidth, relay delay."""
    from twinfer.deploy.netem.kernel_shaping import run_kernel_shaped_session

    inputs = np.random.default_rng(0).random((batch * (1 + reps), *sample_shape), dtype=np.float32)
    client = run_kernel_shaped_session(onnx_path, inputs, batch, profile)
    return _row(model, profile, "kernel", batch, client)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':<12} {'protocol':<11} {'profile':<22} {'shaping':<9} {'offline':<7} {'batch':>5} {'measured s':>10} {'bound s':>8} "
        f"{'ratio':>6} {'rounds':>6} {'MB one way':>10} {'1st batch s':>11} {'compute s':>9} {'peer s':>7} {'dealer s':>8}"
    )
    for r in rows:
        ratio = f"{r['latency_over_lower_bound']:.2f}" if r["latency_over_lower_bound"] else "-"
        print(
            f"{r['model']:<12} {r['protocol']:<11} {r['profile']:<22} {r['shaping']:<9} {r.get('offline', 'overlap'):<7} {r['batch']:>5} {r['latency_s']:>10.3f} "
            f"{r['lower_bound_s']:>8.3f} {ratio:>6} {r['rounds']:>6} {r['bytes_one_way'] / 1e6:>10.2f} "
            f"{r['first_batch_latency_s']:>11.3f} {r['compute_s']:>9.3f} {r['peer_wait_s']:>7.3f} {r['dealer_wait_s']:>8.3f}"
        )


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Latency against RTT and against bandwidth (measured beside bound), and per-layer time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    swept = [r for r in rows if r["profile"].startswith("sweep") and r["shaping"] == "transport"]
    for axis, key, unit, scale, fname in (
        ("rtt", "rtt_s", "RTT (ms)", 1e3, "latency_vs_rtt.png"),
        ("bw", "bandwidth_bps", "bandwidth (Mbit/s)", 1e-6, "latency_vs_bandwidth.png"),
    ):
        # The RTT sweep holds the bandwidth at 100 Mbit/s; the bandwidth sweep holds the RTT at 40 ms.
        sweep = [r for r in swept if (r["bandwidth_bps"] == 100e6 if axis == "rtt" else r["rtt_s"] == 0.040)]
        if not sweep:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in sorted({r["label"] for r in sweep}):
            pts = sorted((r[key] * scale, r["latency_s"], r["lower_bound_s"]) for r in sweep if r["label"] == model)
            xs = [p[0] for p in pts]
            line = ax.plot(xs, [p[1] for p in pts], "o-", label=f"{model} measured")[0]
            ax.plot(xs, [p[2] for p in pts], "--", color=line.get_color(), label=f"{model} lower bound")
        ax.set_xlabel(unit)
        ax.set_ylabel("latency per batch (s)")
        if axis == "bw":
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)
    layered = [r for r in rows if r["profile"] == "wan" and r["shaping"] == "transport"]
    modes = {r.get("offline", "overlap") for r in layered}
    for r in layered:
        names = [n for n in r["layers_per_batch"]]
        compute = [r["layers_per_batch"][n]["compute_s"] for n in names]
        dealer = [r["layers_per_batch"][n].get("dealer_wait_s", 0.0) for n in names]
        wait = [r["layers_per_batch"][n]["wait_s"] for n in names]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
        ax.barh(names, compute, label="local compute")
        ax.barh(names, dealer, left=compute, label="waiting on the dealer")
        ax.barh(names, wait, left=[c + d for c, d in zip(compute, dealer)], label="waiting on the peer (the network)")
        ax.invert_yaxis()
        ax.set_xlabel("seconds per batch")
        mode = r.get("offline", "overlap")
        ax.set_title(f"{r['model']} on {r['protocol']} under wan, batch {r['batch']}, offline {mode}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        tail = f"_{mode}" if len(modes) > 1 else ""  # both modes in one study: a plot each
        path = out / f"layers_{r['model']}_{r['protocol']}_wan{tail}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def latency_study(
    models: dict[str, tuple[bytes, tuple[int, ...]]],
    profiles: list[NetworkProfile],
    *,
    batch: int,
    reps: int,
    sweep: bool,
    kernel_profiles: list[NetworkProfile] = (),
    onnx_paths: dict[str, Path] | None = None,
    out: Path,
    protocols: tuple[str, ...] = (DEFAULT_PROTOCOL,),
    offline: tuple[str, ...] = ("overlap",),
) -> list[dict]:
    """Measure every model under every profile (and the sweeps) on every protocol, the protocols
    side by side in the same run; write JSON, table and plots. Kernel shaping runs the default
    protocol only."""
    from tqdm import tqdm

    points: list[tuple[str, NetworkProfile, str, str, str]] = [
        (m, p, "transport", proto, o) for m in models for p in profiles for o in offline for proto in protocols
    ]
    if sweep:
        points += [(m, p, "transport", proto, offline[0]) for m in models for p in sweep_profiles() for proto in protocols]
    points += [(m, p, "kernel", DEFAULT_PROTOCOL, "overlap") for m in models for p in kernel_profiles]
    rows = []
    for model, profile, shaping, protocol, mode in tqdm(points, desc="latency study", unit="run"):
        data, shape = models[model]
        if shaping == "kernel":
            rows.append(measure_kernel(model, onnx_paths[model], shape, profile, batch=batch, reps=reps))
        else:
            rows.append(measure(model, data, shape, profile, batch=batch, reps=reps, protocol=protocol, offline=mode))
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(rows, indent=2))
    print_table(rows)
    for path in plot(rows, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'latency.json'}")
    return rows


def _demo_models() -> tuple[dict[str, tuple[bytes, tuple[int, ...]]], dict[str, Path]]:
    from twinfer.deploy.launch.inference import model_bytes
    from twinfer.deploy.config.paths import cache_dir
    from twinfer.optimizer.zoo.demo_models import load_or_train_demo_model

    models, paths = {}, {}
    for name in ("fashion_cnn", "tiny_resnet"):
        data = model_bytes(load_or_train_demo_model(name, cache_dir() / "models", progress=False), (1, 28, 28))
        models[name] = (data, (1, 28, 28))
        paths[name] = cache_dir() / "models" / f"{name}.onnx"
        paths[name].write_bytes(data)
    return models, paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion_cnn", "tiny_resnet"])
    parser.add_argument("--profiles", nargs="+", default=["loopback", "lan", "wan", "mobile"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2, help="batches measured after the first of each session")
    parser.add_argument("--sweep", action="store_true", help="also sweep RTT and bandwidth for the plots")
    parser.add_argument("--kernel", nargs="*", default=None, help="profiles to also run with kernel shaping (default: wan)")
    parser.add_argument("--out", type=Path, default=Path("results/network"))
    parser.add_argument("--protocols", default=DEFAULT_PROTOCOL, help="comma-separated backends, side by side (e.g. crypten,fss)")
    add_offline_arg(parser)
    args = parser.parse_args(argv)
    protocols_run = parse_protocols(args.protocols)
    offline = parse_offline(args.offline)
    models, paths = _demo_models()
    models = {m: models[m] for m in args.models}
    kernel = []
    if args.kernel is not None:
        from twinfer.deploy.netem.kernel_shaping import check_kernel_shaping_available

        reason = check_kernel_shaping_available()
        if reason:
            print(f"kernel shaping skipped: {reason}")
        else:
            kernel = [parse_profile(p) for p in (args.kernel or ["wan"])]
    latency_study(
        models,
        [parse_profile(p) for p in args.profiles],
        batch=args.batch,
        reps=args.reps,
        sweep=args.sweep,
        kernel_profiles=kernel,
        onnx_paths=paths,
        out=args.out,
        protocols=protocols_run,
        offline=offline,
    )
    return 0


def add_offline_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offline", default="overlap",
        help="when the dealer makes a batch's correlations: overlap (while the previous batch runs, as a service "
        "does back to back), ahead (between batches: online latency alone), or both, comma-separated",
    )  # fmt: skip


def parse_offline(text: str) -> tuple[str, ...]:
    """'overlap,ahead' -> ('overlap', 'ahead'); anything else is refused before a party starts."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in OFFLINE_MODES]
    if bad or not modes:
        raise ValueError(f"--offline takes {' or '.join(OFFLINE_MODES)} (comma-separated), got '{text}'")
    return modes


def parse_protocols(text: str) -> tuple[str, ...]:
    """'crypten,fss' -> ('crypten', 'fss'); an unknown name fails before any party starts."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    for name in names:
        backend_class(name)
    if not names:
        raise ValueError("--protocols names no protocol")
    return names
