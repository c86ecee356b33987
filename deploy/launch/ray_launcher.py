"""Run the three parties as Ray actors and collect what each reports.

The embedded default starts a local Ray instance (loopback only, no dashboard, temp dir in
the project's cache); `ray_address` joins an existing cluster instead. On a cluster of three
or more nodes the parties go to three distinct nodes (a STRICT_SPREAD placement group), or to
the nodes the user names (a node id or a custom resource such as `twinfer_server`). Each
party binds its gRPC listener on its node's address (on loopback when every node is this
machine; a non-loopback listener without TLS needs `insecure`) and reports it; the launcher
wires the peers together. One launch may run several sessions at once on the same three parties.
Ray's per-run session folder under the project cache is removed when the embedded instance
stops, and those of earlier runs that were killed are pruned at the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twinfer.protocols.passes.encoding import SessionEncoding
from twinfer.parties.errors import PeerError, PeerTimeoutError, TwinferError
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, ClientInputs, PartyConfig, PartyReport
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.parties.wire.transport import TransportOptions

from ..config.paths import cache_dir
from .wiring import ROLES, new_session_id, party_config, root_cause, start_parties

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "spread", "pack")
PLACEMENT_TIMEOUT_S = 60.0


class PartyActor:
    """One party in its own Ray worker process, serving one or more sessions.

    max_concurrency=2 lets progress() answer while run() waits for the sessions.
    """

    def __init__(self, role: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.role = role
        self.host: Any = None

    def listen(self, template: PartyConfig, payload: Any = None, max_sessions: int = 16, host: str | None = None) -> str | None:
        """Build this party's host on `host` (else its node's address); the address peers dial (None for the client)."""
        import ray

        from twinfer.parties.runtime.host import ClientHost, DealerHost, ServerHost
        from twinfer.parties.runtime.model_file import parse_model

        node_id, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        template = dataclasses.replace(template, listen=f"{host or node_ip}:0", node=node_id, node_address=node_ip)
        if self.role == DEALER:
            self.host = DealerHost(template, max_sessions)
        elif self.role == SERVER:
            graph, weights = parse_model(payload, source="model")
            self.host = ServerHost(graph, weights, template, max_sessions)
        else:
            self.host = ClientHost(template, max_sessions)
            return None
        return self.host.address

    def open(self, session_ids: list[str], inputs: list[np.ndarray] | None = None, batch_size: int = 1) -> None:
        """Server and dealer: expect these sessions. Client: start them, one input each."""
        for i, session_id in enumerate(session_ids):
            if self.role == CLIENT:
                self.host.open(session_id, inputs[i], batch_size)
            else:
                self.host.open(session_id)

    def run(self, session_ids: list[str], timeout_s: float) -> dict[str, PartyReport | TwinferError]:
        """Each of these sessions' report, or the error it ended with."""
        return self.host.wait(timeout_s, session_ids)

    def progress(self) -> tuple[int, int]:
        return self.host.progress() if self.role == CLIENT and self.host is not None else (0, 0)


@dataclass
class RayOptions:
    """Where the parties run.

    placement: "auto" spreads the three parties over three distinct nodes when the cluster
    has at least three, else lets them share; "spread" requires three distinct nodes; "pack"
    never spreads. `nodes` pins roles to nodes instead: a node id, or the name of a custom
    resource (e.g. `twinfer_server`) that the intended node offers.
    """

    address: str | None = None  # None: start an embedded local instance
    num_cpus_per_party: float = 0.5
    placement: str = "auto"
    nodes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got '{self.placement}'")
        unknown = set(self.nodes) - set(ROLES)
        if unknown:
            raise ValueError(f"nodes may name {', '.join(ROLES)}; got {', '.join(sorted(unknown))}")
        if self.num_cpus_per_party <= 0:
            raise ValueError("num_cpus_per_party must be positive")


RAY_SESSION_KEEP_S = 24 * 3600.0  # a session folder nothing has written to for this long is an earlier run's leftover
RAY_SESSION_GRACE_S = 60.0  # ... or for this long, when the process that started it (its name ends in its pid) is gone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def prune_ray_sessions(temp: Path, keep_s: float = RAY_SESSION_KEEP_S, now: float | None = None) -> list[Path]:
    """Remove the per-run `session_*` folders Ray left under `temp` (the project cache): those
    whose starting process is gone and that nothing wrote to for RAY_SESSION_GRACE_S (a run
    killed before it could remove its own), and any nothing wrote to for `keep_s`. Returns them."""
    now = time.time() if now is None else now
    removed = []
    for folder in sorted(temp.glob("session_*")):
        if folder.is_symlink() or not folder.is_dir() or folder.name == "session_latest":
            continue
        try:
            newest = max([p.lstat().st_mtime for p in folder.rglob("*")] + [folder.lstat().st_mtime])
        except OSError:
            continue  # another run is changing it right now
        pid = folder.name.rsplit("_", 1)[-1]
        gone = pid.isdigit() and not _pid_alive(int(pid))
        if now - newest > keep_s or (gone and now - newest > RAY_SESSION_GRACE_S):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    latest = temp / "session_latest"
    if latest.is_symlink() and not latest.exists():
        latest.unlink(missing_ok=True)
    return removed


def shutdown_ray(session_dir: str | None) -> None:
    """ray.shutdown(), then remove this run's session folder (an embedded instance's logs)."""
    import ray

    ray.shutdown()
    if session_dir and Path(session_dir).is_dir() and Path(session_dir).name.startswith("session_"):
        shutil.rmtree(session_dir, ignore_errors=True)
        latest = Path(session_dir).parent / "session_latest"
        if latest.is_symlink() and not latest.exists():
            latest.unlink(missing_ok=True)


def _session_dir() -> str | None:
    try:
        from ray._private import worker

        node = getattr(worker, "_global_node", None)
        return node.get_session_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - a private API; without it the folder stays until pruned
        return None


def init_ray(options: RayOptions) -> bool:
    """Connect to (or start) Ray; returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    _local_ray_environment()
    if options.address:
        ray.init(address=options.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        temp = cache_dir() / "ray"
        temp.mkdir(parents=True, exist_ok=True)
        prune_ray_sessions(temp)
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            _temp_dir=str(temp),
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    return True


def _local_ray_environment() -> None:
    """No usage reporting, no auth tokens, loopback addresses (see research/platform.md)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextmanager
def local_cluster(resources: list[dict[str, float]], cpus_per_node: int = 1) -> Iterator[tuple[Any, list[str]]]:
    """A Ray cluster of len(resources) nodes on this machine (ray.cluster_utils), the driver
    connected; yields the cluster and its node ids in order. Node i offers resources[i]."""
    import tempfile
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    _local_ray_environment()
    Path("/tmp/ray").mkdir(exist_ok=True)  # Cluster writes /tmp/ray/ray_current_cluster
    head = {"num_cpus": cpus_per_node, "resources": resources[0], "include_dashboard": False}
    temp_dir = tempfile.mkdtemp(prefix="twinfer-ray-")
    cluster = Cluster(initialize_head=True, head_node_args=head | {"temp_dir": temp_dir})
    try:
        nodes = [cluster.head_node] + [cluster.add_node(num_cpus=cpus_per_node, resources=r) for r in resources[1:]]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster, [node.node_id for node in nodes]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)  # its logs: every run would leave one behind


def _node_options(ray_options: RayOptions) -> tuple[dict[str, dict], Any, str]:
    """Ray actor options per role, the placement group to remove afterwards (or None), and how
    the parties were placed, in words."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if ray_options.nodes:
        resources = ray.cluster_resources()
        options: dict[str, dict] = {}
        for role, spec in ray_options.nodes.items():
            if spec in alive:
                options[role] = {"scheduling_strategy": NodeAffinitySchedulingStrategy(spec, soft=False)}
            elif spec in resources:
                options[role] = {"resources": {spec: 0.01}}
            else:
                custom = sorted(r for r in resources if r not in ("CPU", "GPU", "memory", "object_store_memory") and not r.startswith("node:"))
                raise ValueError(
                    f"node for the {role}: '{spec}' is neither the id of a live Ray node nor a custom resource "
                    f"of the cluster (custom resources: {', '.join(custom) or 'none'}; {len(alive)} live nodes)"
                )
        return options, None, "named nodes: " + ", ".join(f"{r}={v}" for r, v in ray_options.nodes.items())
    spread = ray_options.placement == "spread" or (ray_options.placement == "auto" and len(alive) >= 3)
    if ray_options.placement == "spread" and len(alive) < 3:
        raise ValueError(f"placement 'spread' needs three live Ray nodes; the cluster has {len(alive)}")
    if not spread:
        return {}, None, f"shared ({len(alive)} node{'s' if len(alive) != 1 else ''})"
    group = placement_group([{"CPU": ray_options.num_cpus_per_party}] * len(ROLES), strategy="STRICT_SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise PeerError(
            f"Ray could not place the three parties on three distinct nodes with {ray_options.num_cpus_per_party:g} "
            f"CPU free each within {PLACEMENT_TIMEOUT_S:g} s ({len(alive)} live nodes)"
        )
    options = {
        role: {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
        for i, role in enumerate(ROLES)
    }
    return options, group, "three distinct nodes (STRICT_SPREAD)"


def _all_nodes_here() -> bool:
    """Whether every live Ray node runs on this machine (the address Ray knows this one by)."""
    import ray

    here = ray.util.get_node_ip_address()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") == here for n in nodes)


def _unwrap(err: BaseException) -> BaseException:
    import ray.exceptions as rex

    if isinstance(err, rex.RayTaskError):
        cause = err.as_instanceof_cause()
        return getattr(cause, "cause", None) or err.cause or cause
    return err


def run_parties(
    onnx_bytes: bytes,
    inputs: ClientInputs,
    *,
    batch_size: int,
    spec: SessionSpec,
    ray_options: RayOptions | None = None,
    tls: dict[str, TlsIdentity] | None = None,
    progress: bool = False,
    encoding: SessionEncoding | None = None,
) -> dict[str, PartyReport]:
    """Launch server, client and dealer actors, wire them, run one session; reports by role.
    `encoding`: what the launcher's check settled on these inputs, which the server adopts."""
    return run_sessions(
        onnx_bytes, [inputs], batch_size=batch_size, spec=spec, ray_options=ray_options, tls=tls, progress=progress, encoding=encoding
    )[0]


def run_sessions(
    onnx_bytes: bytes,
    inputs: list[np.ndarray],
    *,
    batch_size: int,
    spec: SessionSpec,
    ray_options: RayOptions | None = None,
    tls: dict[str, TlsIdentity] | None = None,
    progress: bool = False,
    timeout_s: float = 3600.0,
    encoding: SessionEncoding | None = None,
) -> list[dict[str, PartyReport]]:
    """One server, client and dealer actor running one session per input array, all at once.

    Returns each session's reports by role, in the order of `inputs`; if any session failed,
    raises the error where that failure started. Without `tls`, parties on a cluster listen on
    their nodes' addresses in plaintext only with `spec.insecure`.
    """
    with party_pool(onnx_bytes, spec=spec, ray_options=ray_options, tls=tls, max_sessions=len(inputs), encoding=encoding) as pool:
        return pool.run(inputs, batch_size=batch_size, progress=progress, timeout_s=timeout_s)


@contextmanager
def party_pool(
    onnx_bytes: bytes,
    *,
    spec: SessionSpec,
    ray_options: RayOptions | None = None,
    tls: dict[str, TlsIdentity] | None = None,
    max_sessions: int = 16,
    encoding: SessionEncoding | None = None,
) -> Iterator[PartyPool]:
    """Three placed, wired party actors that serve run() calls until the block ends."""
    import ray
    from ray.util.placement_group import remove_placement_group

    if tls is not None and set(tls) != set(ROLES):
        raise ValueError(f"TLS needs an identity for each of {', '.join(ROLES)}")
    ray_options = ray_options or RayOptions()
    started = init_ray(ray_options)
    session_dir = _session_dir() if started and not ray_options.address else None
    group = None
    actors: dict[str, Any] = {}
    try:
        per_role, group, placed = _node_options(ray_options)
        log.info("parties placed on %s", placed)
        remote = ray.remote(num_cpus=ray_options.num_cpus_per_party, max_concurrency=2, max_restarts=0)(PartyActor)
        roles = [SERVER, CLIENT] + ([] if spec.insecure_trusted_first_party else [DEALER])
        actors = {role: remote.options(**per_role.get(role, {})).remote(role) for role in roles}
        pool = PartyPool(actors, spec, tls, max_sessions, placed, encoding)
        # Where every node is this machine (the embedded instance, a cluster on one host), the
        # parties listen on loopback only; else on their nodes' addresses.
        pool.start(onnx_bytes, listen_host="127.0.0.1" if _all_nodes_here() else None)
        yield pool
    finally:
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        if group is not None:
            remove_placement_group(group)
        if started:
            shutdown_ray(session_dir)


def _session_reports(session_id: str, results: dict[str, dict | BaseException]) -> dict[str, PartyReport]:
    reports, errors = {}, {}
    for role, by_session in results.items():
        outcome = by_session if isinstance(by_session, BaseException) else by_session.get(session_id)
        if isinstance(outcome, PartyReport):
            reports[role] = outcome
        else:
            errors[role] = outcome if outcome is not None else PeerError(f"{role} has no record of session {session_id}")
    if errors:
        raise root_cause(errors)
    return reports


@dataclass
class PartyPool:
    """Party actors wired once (dealer first, then the server, then the client); each run() a batch of sessions."""

    actors: dict[str, Any]
    spec: SessionSpec
    tls: dict[str, TlsIdentity] | None
    max_sessions: int
    placement: str = ""
    encoding: SessionEncoding | None = None

    def run(
        self, inputs: list[np.ndarray], *, batch_size: int, progress: bool = False, timeout_s: float = 3600.0
    ) -> list[dict[str, PartyReport]]:
        """One session per input array, all at once; each session's reports by role, in order."""
        if not 1 <= len(inputs) <= self.max_sessions:
            raise ValueError(f"this pool runs 1 to {self.max_sessions} sessions at once, got {len(inputs)}")
        session_ids = [new_session_id() for _ in inputs]
        self.open(session_ids, inputs, batch_size)
        results = self.collect(session_ids, timeout_s, progress)
        return [_session_reports(session_id, results) for session_id in session_ids]

    def _template(self, role: str, **addresses: str | None) -> PartyConfig:
        return party_config(role, "-", self.spec, tls=self.tls, encoding=self.encoding, **addresses)

    def start(self, onnx_bytes: bytes, listen_host: str | None = None) -> None:
        timeout = self.spec.options.connect_timeout_s + 120.0  # actor start-up includes importing torch
        payloads = {SERVER: onnx_bytes}

        def listen(role: str, **addresses: str | None) -> str | None:
            ref = self.actors[role].listen.remote(self._template(role, **addresses), payloads.get(role), self.max_sessions, listen_host)
            return _get(ref, timeout=timeout)

        start_parties(listen, dealer=DEALER in self.actors)

    def open(self, session_ids: list[str], inputs: list[np.ndarray], batch_size: int) -> None:
        # Server and dealer expect the sessions before the client dials them.
        _get([self.actors[r].open.remote(session_ids) for r in (DEALER, SERVER) if r in self.actors], timeout=60)
        _get(self.actors[CLIENT].open.remote(session_ids, inputs, batch_size), timeout=60)

    def collect(self, session_ids: list[str], timeout_s: float, progress: bool) -> dict[str, dict | BaseException]:
        refs = {self.actors[role].run.remote(session_ids, timeout_s): role for role in self.actors}
        return _collect(self.actors, refs, self.spec.options, progress)


def _get(refs, timeout: float):
    """ray.get for set-up calls: a party's own error as itself, a stalled start as a timeout."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise PeerTimeoutError(f"the party actors did not answer within {timeout:g} s (is the cluster busy?)") from None
    except RayError as err:
        cause = _unwrap(err)
        raise cause if isinstance(cause, (TwinferError, ValueError)) else PeerError(f"a party actor failed: {cause}") from None


def _collect(actors, refs: dict, options: TransportOptions, progress: bool) -> dict[str, dict | BaseException]:
    """Each role's outcomes by session, or the error its process ended with."""
    import ray
    from tqdm import tqdm

    results: dict[str, dict | BaseException] = {}
    pending = list(refs)
    bar = None
    failed_at: float | None = None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.25)
        for ref in ready:
            role = refs[ref]
            try:
                results[role] = ray.get(ref)
                if any(not isinstance(r, PartyReport) for r in results[role].values()):
                    failed_at = failed_at or time.monotonic()
            except Exception as err:  # each party's failure is collected, then the root cause reported
                results[role] = _unwrap(err)
                failed_at = failed_at or time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > options.recv_timeout_s + 5:
            for ref in pending:
                results[refs[ref]] = PeerError(f"{refs[ref]} did not stop within the deadline after a failure")
            break
        if progress and CLIENT not in results:
            try:
                done, total = ray.get(actors[CLIENT].progress.remote(), timeout=5)
            except Exception:
                continue
            if bar is None and total:
                bar = tqdm(total=total, desc="private inference", unit="sample")
            if bar is not None:
                bar.update(done - bar.n)
    if bar is not None:
        bar.update(bar.total - bar.n)
        bar.close()
    return results
