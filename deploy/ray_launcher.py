"""Run the three parties as Ray actors and collect what each reports.

The embedded default starts a local Ray instance (loopback only, no dashboard, temp dir in
the project's cache); `ray_address` joins an existing cluster instead.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinfer.parties.errors import PeerError, TwinferError
from twinfer.parties.session import CLIENT, DEALER, SERVER, PartyConfig, PartyReport
from twinfer.parties.transport import TransportOptions

from .paths import cache_dir

log = logging.getLogger(__name__)


class PartyActor:
    """One party in its own Ray worker process; max_concurrency=2 lets progress() answer mid-run."""

    def __init__(self, role: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.role = role
        self.party: Any = None

    def start(self, config: PartyConfig, payload: Any = None, batch_size: int = 1) -> str | None:
        """Build the party and bind its listener; returns the address peers should dial."""
        import ray

        from twinfer.parties.model_file import parse_model
        from twinfer.parties.session import ClientParty, DealerParty, ServerParty

        os.environ["TWINFER_NODE"] = ray.get_runtime_context().get_node_id()
        if self.role == DEALER:
            self.party = DealerParty(config)
        elif self.role == SERVER:
            graph, weights = parse_model(payload, source="model")
            self.party = ServerParty(graph, weights, config)
        else:
            self.party = ClientParty(payload, batch_size, config)
            return None
        return self.party.address

    def run(self) -> PartyReport:
        return self.party.run()

    def progress(self) -> tuple[int, int]:
        report = getattr(self.party, "report", None)
        inputs = getattr(self.party, "inputs", None)
        done = sum(report.batch_sizes) if report is not None else 0
        return done, (len(inputs) if inputs is not None else 0)


@dataclass
class RayOptions:
    address: str | None = None  # None: start an embedded local instance
    num_cpus_per_party: float = 0.5


def _init_ray(options: RayOptions) -> bool:
    """Connect to (or start) Ray; returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if options.address:
        ray.init(address=options.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        temp = cache_dir() / "ray"
        temp.mkdir(parents=True, exist_ok=True)
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            _temp_dir=str(temp),
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    return True


def _root_cause(errors: dict[str, BaseException]) -> TwinferError:
    """Of the errors the parties raised, the one where the failure started."""
    twinfer_errors = {role: e for role, e in errors.items() if isinstance(e, TwinferError)}
    for role, err in twinfer_errors.items():
        if err.origin == role:
            return err
    if twinfer_errors:
        return next(iter(twinfer_errors.values()))
    role, err = next(iter(errors.items()))
    return PeerError(f"{role} process ended unexpectedly: {err}", origin=role)


def _unwrap(err: BaseException) -> BaseException:
    import ray.exceptions as rex

    if isinstance(err, rex.RayTaskError):
        cause = err.as_instanceof_cause()
        return getattr(cause, "cause", None) or err.cause or cause
    return err


def run_parties(
    onnx_bytes: bytes,
    inputs: np.ndarray,
    *,
    batch_size: int,
    options: TransportOptions,
    insecure_trusted_first_party: bool = False,
    ray_options: RayOptions | None = None,
    progress: bool = False,
) -> dict[str, PartyReport]:
    """Launch server, client and dealer actors, wire them, run one session; reports by role."""
    import ray

    ray_options = ray_options or RayOptions()
    started = _init_ray(ray_options)
    remote = ray.remote(num_cpus=ray_options.num_cpus_per_party, max_concurrency=2, max_restarts=0)(PartyActor)
    session_id = uuid.uuid4().hex[:16]
    actors = {role: remote.remote(role) for role in (DEALER, SERVER, CLIENT)}
    try:
        return _run_session(actors, session_id, onnx_bytes, inputs, batch_size, options, insecure_trusted_first_party, progress)
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def _run_session(actors, session_id, onnx_bytes, inputs, batch_size, options, insecure_tfp, progress):
    import ray

    def config(role: str, **kw: Any) -> PartyConfig:
        return PartyConfig(role=role, session_id=session_id, options=options, insecure_trusted_first_party=insecure_tfp, **kw)

    start_timeout = options.connect_timeout_s + 120.0  # actor start-up includes importing torch
    dealer_address = None
    if not insecure_tfp:
        dealer_address = ray.get(actors[DEALER].start.remote(config(DEALER)), timeout=start_timeout)
    server_address = ray.get(
        actors[SERVER].start.remote(config(SERVER, dealer_address=dealer_address), onnx_bytes), timeout=start_timeout
    )
    ray.get(
        actors[CLIENT].start.remote(
            config(CLIENT, server_address=server_address, dealer_address=dealer_address), inputs, batch_size
        ),
        timeout=start_timeout,
    )
    roles = [SERVER, CLIENT] + ([] if insecure_tfp else [DEALER])
    refs = {actors[r].run.remote(): r for r in roles}
    return _collect(actors, refs, options, progress)


def _collect(actors, refs: dict, options: TransportOptions, progress: bool) -> dict[str, PartyReport]:
    import ray
    from tqdm import tqdm

    reports: dict[str, PartyReport] = {}
    errors: dict[str, BaseException] = {}
    pending = list(refs)
    bar = None
    failed_at: float | None = None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.25)
        for ref in ready:
            role = refs[ref]
            try:
                reports[role] = ray.get(ref)
            except Exception as err:  # each party's failure is collected, then the root cause reported
                errors[role] = _unwrap(err)
                failed_at = failed_at or time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > options.recv_timeout_s + 5:
            for ref in pending:
                errors[refs[ref]] = PeerError(f"{refs[ref]} did not stop within the deadline after a failure")
            break
        if progress and CLIENT not in reports and CLIENT not in errors:
            try:
                done, total = ray.get(actors[CLIENT].progress.remote(), timeout=5)
            except Exception:
                continue
            if bar is None and total:
                bar = tqdm(total=total, desc="private inference", unit="img")
            if bar is not None:
                bar.update(done - bar.n)
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    if errors:
        raise _root_cause(errors)
    return reports
