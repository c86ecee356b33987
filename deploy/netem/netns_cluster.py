"""A real Ray cluster on one machine: each node a network namespace with an address of its own.

    with NetnsCluster(nodes=3) as cluster:
        cluster.shape(0, 1, "bw=100mbit")            # tbf on the link between nodes 0 and 1
        with cluster.driver(0):                      # the driver runs on the head node
            twinfer.infer(model, x, ray_address=cluster.address, insecure=True)
        cluster.run_in(0, ["twinfer", "infer", "--ray-address", cluster.address, ...])

Node i lives in namespace `tw-<pid>-<tag>-n<i>` and runs its own Ray node (`ray start --head`
in node 0, `ray start --address` in the others), bound to its address 10.77.S.(i+1) with
`--node-ip-address`, offering the custom resource `twinfer_node_<i>` so that a role can be
pinned to it (RayOptions.nodes). Two kinds of links:

- a point-to-point veth pair between every two nodes (`p<j>` in node i, `p<i>` in node j),
  with a /32 host route to the other node's address, so that everything between two nodes,
  Ray's own traffic and the parties' gRPC alike, crosses that pair's link; `shape(i, j, ...)`
  puts a tbf (kernel_shaping.tbf_args) on both ends, so each pair of nodes is shaped on its own;
- a bridge in a hub namespace (`tw-<pid>-<tag>-hub`) joining every node (`lan` in each node,
  10.77.S.(i+1)/24) and the root namespace (`twr<tag>`, 10.77.S.254/24): the driver, this
  process, reaches every node through it. It is never shaped. A Ray driver must still run
  from a node's namespace (`driver()`, `run_in()`): Ray gives a driver the address of the node
  it attaches to, and the workers call back to that address.

Teardown ends every process in the node namespaces (SIGTERM, then SIGKILL: `ray stop` would
also stop every other Ray instance on the machine, since namespaces share the process table),
deletes the namespaces (which removes every veth and the bridge) and the cluster's Ray temp
folder. A later cluster removes what a killed run left behind.

This kernel has no netem: a link's delay cannot be set in the kernel; `shape` refuses an rtt.
Needs root, iproute2 (`ip`, `tc`) and network namespaces, like KernelLink.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from twinfer.parties.wire.network_profile import NetworkProfile, parse_profile

from .kernel_shaping import NETNS_DIR, NamespaceTeardown, ShapingError, _run, check_kernel_shaping_available, list_namespaces, remove_namespace, remove_stale_namespaces, tbf_args

GCS_PORT = 6379  # every node has a network stack of its own: Ray's default ports never collide
SUBNET_PREFIX = "10.77"  # the cluster takes the first free 10.77.S.0/24
HOST_OCTET = 254  # the root namespace's address on the bridge
MAX_NODES = 8
NODE_RESOURCE = "twinfer_node_{}"
OBJECT_STORE_BYTES = 128 * 1024 * 1024
RAY_START_TIMEOUT_S = 120.0
STOP_GRACE_S = 1.0  # Ray's daemons take longer than this to end on SIGTERM; nothing of theirs outlives SIGKILL here
TEMP_PREFIX = "twr-"  # /tmp/twr-<pid>-<tag>: Ray's unix socket paths must stay short
CLONE_NEWNET = 0x40000000
STALE_TEMP = re.compile(r"^twr-(?P<pid>\d+)-[0-9a-f]{8}$")


def ray_cli() -> str | None:
    """The `ray` command of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray")


def check_netns_cluster_available() -> str | None:
    """None when NetnsCluster can work here, else why not."""
    reason = check_kernel_shaping_available()
    if reason is not None:
        return reason
    if ray_cli() is None:
        return "a Ray cluster of namespaces needs the `ray` command (pip install ray), not found"
    return None


def remove_stale_clusters() -> list[str]:
    """Remove what clusters of runs that died left: namespaces (and their processes), Ray temp folders."""
    removed = remove_stale_namespaces()
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        match = STALE_TEMP.match(folder.name)
        if match and not Path(f"/proc/{match['pid']}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _free_subnet() -> str:
    """The first 10.77.S.0/24 that no route or address of the root namespace touches."""
    used = _run(["ip", "-4", "route", "show"]) + _run(["ip", "-4", "-o", "addr", "show"])
    taken = [ipaddress.ip_network(m, strict=False) for m in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", used)]
    for s in range(256):
        net = ipaddress.ip_network(f"{SUBNET_PREFIX}.{s}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return f"{SUBNET_PREFIX}.{s}"
    raise ShapingError(f"no free {SUBNET_PREFIX}.x.0/24 subnet in the root namespace")


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace that `fd` refers to."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, os.CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise ShapingError(f"setns into a network namespace failed: {os.strerror(err)}")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _namespace_pids(ns: str) -> list[int]:
    try:
        return [int(p) for p in _run(["ip", "netns", "pids", ns]).split()]
    except ShapingError:
        return []


@dataclass(frozen=True)
class ClusterNode:
    """One Ray node of a NetnsCluster."""

    index: int
    namespace: str
    ip: str
    resource: str  # its custom resource (twinfer_node_<i>)
    node_id: str  # the Ray node id (hex), as the parties report it


class NetnsCluster(NamespaceTeardown):
    """`nodes` Ray nodes, each in a network namespace of its own, linked pairwise and by a bridge."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        cpus_per_node: int = 1,
        object_store_bytes: int = OBJECT_STORE_BYTES,
        resources: list[dict[str, float]] | None = None,
        ray_env: dict[str, str] | None = None,
    ) -> None:
        """`resources`: custom resources node i offers besides `twinfer_node_<i>` (e.g. `twinfer_server`).
        `ray_env`: environment of every node's Ray processes, e.g. RAY_health_check_period_ms."""
        if not 2 <= nodes <= MAX_NODES:
            raise ValueError(f"a NetnsCluster has 2 to {MAX_NODES} nodes, got {nodes}")
        if resources is not None and len(resources) != nodes:
            raise ValueError(f"resources: one dict per node ({nodes}), got {len(resources)}")
        self.size = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_bytes = object_store_bytes
        self.extra_resources = resources or [{} for _ in range(nodes)]
        self.ray_env = dict(ray_env or {})
        self.tag = uuid.uuid4().hex[:8]
        base = f"tw-{os.getpid()}-{self.tag}"  # the creator's pid lets a later run remove leftovers
        self.namespaces = [f"{base}-n{i}" for i in range(nodes)]
        self.hub_ns = f"{base}-hub"
        self.host_veth = f"twr{self.tag}"  # the root namespace's end of the bridge (15 characters at most)
        self.subnet = ""
        self.nodes: list[ClusterNode] = []
        self.start_s = 0.0  # seconds the last __enter__ took (namespaces, links, Ray nodes)
        self.stop_s = 0.0  # seconds the last close took
        self._created: list[str] = []
        self._temp: Path | None = None
        self._shaped: dict[tuple[int, int], NetworkProfile] = {}
        self._starting: list[subprocess.Popen] = []  # `ray start` commands not yet finished

    # ------------------------------------------------------------------ addresses

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def host_ip(self) -> str:
        """The root namespace's address on the bridge (where the driver dials from)."""
        return f"{self.subnet}.{HOST_OCTET}"

    @property
    def address(self) -> str:
        """The head's GCS address: `ray.init(address=...)`, `twinfer infer --ray-address`."""
        return f"{self.ip(0)}:{GCS_PORT}"

    def node_by_id(self, node_id: str) -> ClusterNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node of this cluster has id {node_id}")

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> NetnsCluster:
        reason = check_netns_cluster_available()
        if reason is not None:
            raise ShapingError(f"cannot build a Ray cluster of network namespaces here: {reason}")
        t0 = time.monotonic()
        try:
            remove_stale_clusters()
            self._temp = Path(tempfile.gettempdir()) / f"{TEMP_PREFIX}{os.getpid()}-{self.tag}"
            self._temp.mkdir()
            self._wire()
            self._start_ray()
        except BaseException:
            self.close()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def _in(self, ns: str, *argv: str) -> str:
        return _run(["ip", "netns", "exec", ns, *argv])

    def _wire(self) -> None:
        self.subnet = _free_subnet()
        for ns in (self.hub_ns, *self.namespaces):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
        hub = self.hub_ns
        self._in(hub, "ip", "link", "set", "lo", "up")
        self._in(hub, "ip", "link", "add", "br0", "type", "bridge")
        self._in(hub, "ip", "link", "set", "br0", "up")
        # The root namespace's end: created there, so that deleting the hub removes the pair.
        _run(["ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", "host", "netns", hub])
        _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_veth])
        _run(["ip", "link", "set", self.host_veth, "up"])
        self._in(hub, "ip", "link", "set", "host", "master", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            _run(["ip", "link", "add", "lan", "netns", ns, "type", "veth", "peer", "name", f"n{i}", "netns", hub])
            self._in(hub, "ip", "link", "set", f"n{i}", "master", "br0", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(ns, "ip", "addr", "add", f"{self.ip(i)}/24", "dev", "lan")
            self._in(ns, "ip", "link", "set", "lan", "up")
        for i in range(self.size):
            for j in range(i + 1, self.size):
                _run(["ip", "link", "add", f"p{j}", "netns", self.namespaces[i], "type", "veth",
                      "peer", "name", f"p{i}", "netns", self.namespaces[j]])  # fmt: skip
                for a, b in ((i, j), (j, i)):
                    ns = self.namespaces[a]
                    self._in(ns, "ip", "link", "set", f"p{b}", "up")
                    # More specific than the bridge's /24: node a reaches node b over their own link.
                    self._in(ns, "ip", "route", "add", f"{self.ip(b)}/32", "dev", f"p{b}", "src", self.ip(a))

    def _ray_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        # "0" there (the embedded instance's setting) makes a worker's `ray start` refuse to join.
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env.pop("RAY_ADDRESS", None)
        env.update(self.ray_env)
        return env

    def _ray_start(self, i: int) -> subprocess.Popen:
        assert self._temp is not None
        resources = {NODE_RESOURCE.format(i): 1.0, **self.extra_resources[i]}
        argv = [ray_cli(), "start", "--node-ip-address", self.ip(i), "--num-cpus", str(self.cpus_per_node),
                "--resources", json.dumps(resources), "--object-store-memory", str(self.object_store_bytes),
                "--disable-usage-stats", "--temp-dir", str(self._temp / f"n{i}")]  # fmt: skip
        if i == 0:
            argv += ["--head", "--port", str(GCS_PORT), "--include-dashboard=false"]
        else:
            argv += ["--address", self.address]
        log = open(self._temp / f"ray-start-n{i}.log", "wb")  # noqa: SIM115 - closed once it exits
        try:
            return subprocess.Popen(["ip", "netns", "exec", self.namespaces[i], *argv], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=self._ray_env(), cwd=self._temp)  # fmt: skip
        finally:
            log.close()

    def _wait_started(self, i: int, proc: subprocess.Popen) -> None:
        assert self._temp is not None
        try:
            code = proc.wait(timeout=RAY_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        if code != 0:
            log = (self._temp / f"ray-start-n{i}.log").read_text(errors="replace")[-3000:]
            what = f"did not finish within {RAY_START_TIMEOUT_S:g} s" if code is None else f"failed (exit {code})"
            raise ShapingError(f"`ray start` of node {i} ({self.ip(i)}) {what}:\n{log}")

    def _start_ray(self) -> None:
        self._starting = [self._ray_start(0)]
        self._wait_started(0, self._starting[0])
        self._starting += [self._ray_start(i) for i in range(1, self.size)]  # the workers join at once
        for i, proc in enumerate(self._starting[1:], start=1):
            self._wait_started(i, proc)
        self._starting = []
        self.nodes = [
            ClusterNode(i, ns, self.ip(i), NODE_RESOURCE.format(i), self._raylet_node_id(ns)) for i, ns in enumerate(self.namespaces)
        ]

    def _raylet_node_id(self, ns: str) -> str:
        """The Ray node id of the raylet running in `ns` (its `--node_id` flag)."""
        for pid in _namespace_pids(ns):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and Path(args[0].decode(errors="replace")).name == "raylet":
                for arg in args:
                    if arg.startswith(b"--node_id="):
                        return arg.split(b"=", 1)[1].decode()
        raise ShapingError(f"no raylet runs in namespace {ns} after `ray start`")

    def close(self) -> None:
        """Disconnect this process's driver if it is on this cluster, end every node's processes,
        remove the namespaces, links and Ray temp folder; safe to call twice."""
        t0 = time.monotonic()
        self._disconnect_driver()
        errors: list[str] = []
        self._stop_processes()
        for proc in self._starting:  # killed with their namespace: reap them
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self._starting = []
        for ns in list(self._created):
            try:
                remove_namespace(ns)
                self._created.remove(ns)
            except ShapingError as exc:
                errors.append(str(exc))
        with contextlib.suppress(ShapingError):  # gone with the hub unless the hub was never made
            if self.host_veth in _run(["ip", "-o", "link", "show"]):
                _run(["ip", "link", "del", self.host_veth])
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
        self.nodes = []
        self._shaped.clear()
        self.stop_s = time.monotonic() - t0
        if errors:
            raise ShapingError("; ".join(errors))

    def _disconnect_driver(self) -> None:
        if "ray" not in sys.modules or not self.subnet:
            return
        import ray

        try:
            connected = ray.is_initialized() and ray.get_runtime_context().gcs_address == self.address
        except Exception:  # noqa: BLE001 - a half-connected driver: shut it down anyway
            connected = ray.is_initialized()
        if connected:
            ray.shutdown()

    def _stop_processes(self) -> None:
        """SIGTERM everything in the node namespaces (raylets end their workers), then SIGKILL what is left."""
        pids = [pid for ns in self.namespaces if ns in self._created for pid in _namespace_pids(ns) if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.05)
        # remove_namespace then kills what ignored SIGTERM, and what was started meanwhile.

    # ------------------------------------------------------------------ use

    @contextlib.contextmanager
    def driver(self, i: int = 0) -> Iterator[ClusterNode]:
        """Run the block from node i's namespace (the calling thread only), so that a Ray driver
        connected inside it (ray.init, twinfer.infer(ray_address=...)) is reachable by the nodes.

        A driver in the root namespace reaches the head over the bridge, but Ray then gives it the
        head's address as its own, and the workers' calls back to it (to fetch a large argument,
        to report an actor's result) go to the head's namespace, where nothing listens: they hang.
        Threads the block starts (Ray's own) stay in node i's namespace.
        """
        if not self.nodes:
            raise ShapingError("the cluster is not running (not entered, or closed)")
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / self.namespaces[i], os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield self.nodes[i]
            finally:
                _setns(own)
        finally:
            os.close(own)

    def kill_node(self, i: int) -> None:
        """Lose node i as a machine dies: SIGKILL every process in its namespace (its raylet, its
        workers, the head's GCS for node 0). Its namespace and links stay until the cluster closes."""
        ns = self.namespaces[i]
        pids = [pid for pid in _namespace_pids(ns) if pid != os.getpid()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_GRACE_S + 5
        while not all(_gone(p) for p in pids):
            if time.monotonic() > deadline:
                raise ShapingError(f"processes of node {i} survived SIGKILL: {[p for p in pids if not _gone(p)]}")
            time.sleep(0.05)

    def run_in(self, i: int, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start `argv` in node i's namespace; it ends when the cluster closes."""
        if not self.nodes:
            raise ShapingError("the cluster is not running (not entered, or closed)")
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[i], *argv], **popen_kwargs)

    def link(self, i: int, j: int) -> tuple[tuple[str, str], tuple[str, str]]:
        """The link between nodes i and j: (namespace, device) of i's end and of j's end."""
        if i == j or not (0 <= i < self.size and 0 <= j < self.size):
            raise ValueError(f"a link joins two distinct nodes of 0..{self.size - 1}, got {i} and {j}")
        return (self.namespaces[i], f"p{j}"), (self.namespaces[j], f"p{i}")

    def shape(self, i: int, j: int, profile: NetworkProfile | str | None) -> None:
        """Limit the link between nodes i and j to the profile's bandwidth, each direction on its
        own (a tbf on both ends); None removes the limit. A delay cannot be set here (no netem)."""
        if isinstance(profile, str):
            profile = parse_profile(profile)
        if profile is not None and profile.rtt_s:
            raise ShapingError(
                "this kernel has no netem: a link's delay cannot be set in the kernel "
                "(delay comes from user space: the transport's network profile, or tcp_delay_relay)"
            )
        for ns, dev in self.link(i, j):
            if profile is None or profile.bandwidth_bps is None:
                with contextlib.suppress(ShapingError):  # no qdisc of ours there
                    self._in(ns, "tc", "qdisc", "del", "dev", dev, "root")
            else:
                self._in(ns, "tc", "qdisc", "replace", "dev", dev, "root", *tbf_args(profile.bandwidth_bps))
        key = (min(i, j), max(i, j))
        if profile is None or profile.bandwidth_bps is None:
            self._shaped.pop(key, None)
        else:
            self._shaped[key] = profile

    def shape_all(self, profile: NetworkProfile | str | None) -> None:
        """The same limit on the link between every two nodes."""
        for i in range(self.size):
            for j in range(i + 1, self.size):
                self.shape(i, j, profile)

    @property
    def shaped(self) -> dict[tuple[int, int], NetworkProfile]:
        """The links shaped now, by (lower node, higher node)."""
        return dict(self._shaped)

    def link_bytes(self, i: int, j: int) -> tuple[int, int]:
        """Bytes sent so far over the link between nodes i and j: (i to j, j to i)."""
        (ns_i, dev_i), (ns_j, dev_j) = self.link(i, j)
        return self._tx_bytes(ns_i, dev_i), self._tx_bytes(ns_j, dev_j)

    def _tx_bytes(self, ns: str, dev: str) -> int:
        stats = json.loads(self._in(ns, "ip", "-s", "-j", "link", "show", "dev", dev))
        return int(stats[0]["stats64"]["tx"]["bytes"])


def leftovers(cluster: NetnsCluster) -> list[str]:
    """What of `cluster` still exists (namespaces, the root's veth, its temp folder, processes); [] when nothing."""
    left = [ns for ns in list_namespaces() if ns in (cluster.hub_ns, *cluster.namespaces)]
    if cluster.host_veth in _run(["ip", "-o", "link", "show"]):
        left.append(f"veth {cluster.host_veth}")
    temp = Path(tempfile.gettempdir()) / f"{TEMP_PREFIX}{os.getpid()}-{cluster.tag}"
    if temp.exists():
        left.append(str(temp))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if temp.name.encode() in cmdline and not _gone(int(proc.name)):
                command = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
                left.append(f"process {proc.name}: {command}")
    return left
