"""Shaping in the kernel for latency studies: two network namespaces joined by a veth pair.

Bandwidth comes from a `tbf` qdisc on each veth end (each direction limited). This kernel
has no netem, so delay comes from a user-space relay (`tcp_delay_relay`) in the client
namespace: a client dials the relay, which holds every chunk rtt/2 per direction and
crosses the veth to the server. The tbf rate counts whole frames (Ethernet, IP and TCP
headers), so TCP payload gets about 95% of it at MTU 1500.

    with KernelLink(parse_profile("rtt=40ms,bw=100mbit")) as link:
        server = link.run_in(link.server_ns, [..., "--listen", f"{link.server_ip}:7000"])
        address = link.start_relay(7000)
        client = link.run_in(link.client_ns, [..., "--server", address])

Needs root, iproute2 (`ip`, `tc`) and network namespaces. Only 10.231.0.0/30 is used, and
only inside the namespaces this module creates and removes.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from types import TracebackType

import numpy as np

from twinfer.parties.wire.network_profile import NetworkProfile, parse_profile
from twinfer.parties.runtime.session import CLIENT, DEALER, SERVER, PartyReport

from ..launch.local import PartyCommand, launch_local
from ..launch.wiring import PartyExitError, new_session_id, party_command, wait_for_address

SERVER_IP = "10.231.0.1"
CLIENT_IP = "10.231.0.2"
PREFIX_LEN = 30
NETNS_DIR = Path("/var/run/netns")
COMMAND_TIMEOUT_S = 10.0
RELAY_START_TIMEOUT_S = 15.0
# tbf drops anything larger than its bucket and refills it on a timer, so a bucket smaller
# than a few ms of traffic costs throughput (1 ms gave 84 of 100 Mbit/s here). A large bucket
# costs accuracy instead: after an idle wait a whole round of up to `burst` bytes passes at
# line rate. 5 ms keeps bulk throughput near the rate (3 ms gave 82 to 96 Mbit/s of 100).
MIN_BURST_BYTES = 16 * 1024
BURST_S = 0.005
# Longest a packet may wait in the tbf queue; beyond it tbf drops. The TCP connection that
# crosses the veth has a sub-millisecond RTT (the delay lives in the relay), so a short queue
# keeps throughput without hiding a large standing queue in latency measurements.
TBF_LATENCY_MS = 20
# Names of the namespaces this module creates: KernelLink ends and the availability probe;
# and those of netns_cluster: the nodes of a NetnsCluster and its hub.
OWN_NAMESPACE = re.compile(r"^tw-(?:probe-)?(?P<pid>\d+)-[0-9a-f]{8}(?:-[sc]|-n\d+|-hub)?$")


class ShapingError(RuntimeError):
    """A shaping command failed, or kernel shaping is not usable here."""


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a command; its stdout, or ShapingError naming the command and its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
    except FileNotFoundError as exc:
        raise ShapingError(f"command not found: {argv[0]} (running {' '.join(argv)})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ShapingError(f"'{' '.join(argv)}' did not finish within {timeout:g} s") from exc
    except subprocess.CalledProcessError as exc:
        raise ShapingError(f"'{' '.join(argv)}' failed with exit code {exc.returncode}: {exc.stderr.strip()}") from exc
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces that `ip netns` knows."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def remove_namespace(ns: str) -> None:
    """Kill what still runs in `ns` (it keeps the namespace alive), then delete it.

    Never this process: its main thread is in `ns` while it runs a Ray driver from there
    (NetnsCluster.driver); the namespace then goes once this process leaves it."""
    pids = [pid for pid in _run(["ip", "netns", "pids", ns]).split() if int(pid) != os.getpid()]
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _run(["ip", "netns", "del", ns])


def remove_stale_namespaces() -> list[str]:
    """Remove the namespaces (and what runs in them) left by a run whose process has died."""
    removed = []
    for ns in list_namespaces():
        match = OWN_NAMESPACE.match(ns)
        if match is None or Path(f"/proc/{match['pid']}").exists():
            continue
        try:
            remove_namespace(ns)
            removed.append(ns)
        except ShapingError as exc:
            warnings.warn(f"could not remove stale namespace {ns}: {exc}", stacklevel=2)
    return removed


def tbf_args(bandwidth_bps: float) -> list[str]:
    """`tc` arguments of a tbf qdisc limiting to `bandwidth_bps`."""
    rate = int(bandwidth_bps)
    burst = max(MIN_BURST_BYTES, int(rate / 8 * BURST_S))
    return ["tbf", "rate", f"{rate}bit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


def check_kernel_shaping_available() -> str | None:
    """None when KernelLink can work here, else why not."""
    if os.geteuid() != 0:
        return "kernel shaping needs root (network namespaces, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"kernel shaping needs '{tool}' (iproute2), not found on PATH"
    probe = f"tw-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _run(["ip", "netns", "add", probe])
    except ShapingError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"])
        _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", *tbf_args(100e6)])
    except ShapingError as exc:
        return f"tbf rate limiting is not available: {exc}"
    finally:
        try:
            _run(["ip", "netns", "del", probe])
        except ShapingError as exc:
            warnings.warn(f"could not remove probe namespace {probe}: {exc}", stacklevel=2)
    return None


class NamespaceTeardown:
    """What ends a `with` block of namespaces (KernelLink, NetnsCluster): close(), and a teardown
    failure raised unless the block's own error is on its way, which it must not hide."""

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except ShapingError as error:
            if exc is None:
                raise
            warnings.warn(f"{type(self).__name__} teardown failed: {error}", stacklevel=2)


class KernelLink(NamespaceTeardown):
    """Two namespaces (server, client) joined by a veth pair shaped to a network profile."""

    def __init__(self, profile: NetworkProfile | str, prefix: str = "tw") -> None:
        self.profile = parse_profile(profile) if isinstance(profile, str) else profile
        tag = uuid.uuid4().hex[:8]
        # The creator's pid in the name lets a later link remove what a killed run left behind.
        self.server_ns = f"{prefix}-{os.getpid()}-{tag}-s"
        self.client_ns = f"{prefix}-{os.getpid()}-{tag}-c"
        # Interface names are limited to 15 characters.
        self.server_veth = f"twv{tag}s"
        self.client_veth = f"twv{tag}c"
        self.server_ip = SERVER_IP
        self.client_ip = CLIENT_IP
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._tmp: Path | None = None

    def __enter__(self) -> KernelLink:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self


    def _setup(self) -> None:
        remove_stale_namespaces()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.server_ns[:-2]}-"))
        for ns in (self.server_ns, self.client_ns):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
        _run(["ip", "link", "add", self.server_veth, "netns", self.server_ns, "type", "veth",
              "peer", "name", self.client_veth, "netns", self.client_ns])  # fmt: skip
        for ns, veth, ip in ((self.server_ns, self.server_veth, self.server_ip), (self.client_ns, self.client_veth, self.client_ip)):
            self._configure_end(ns, veth, ip)

    def _configure_end(self, ns: str, veth: str, ip: str) -> None:
        """Address, links up and (if the profile has a bandwidth) a tbf on one veth end."""
        in_ns = ["ip", "netns", "exec", ns]
        _run([*in_ns, "ip", "link", "set", "lo", "up"])
        _run([*in_ns, "ip", "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", veth])
        _run([*in_ns, "ip", "link", "set", veth, "up"])
        if self.profile.bandwidth_bps is not None:
            _run([*in_ns, "tc", "qdisc", "add", "dev", veth, "root", *tbf_args(self.profile.bandwidth_bps)])

    def run_in(self, ns: str, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start `argv` inside namespace `ns`; it is terminated when the link closes."""
        if ns not in (self.server_ns, self.client_ns):
            raise ValueError(f"'{ns}' is not a namespace of this link ({self.server_ns}, {self.client_ns})")
        if ns not in self._created:
            raise ShapingError(f"namespace {ns} does not exist (link not entered, or closed)")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def start_relay(self, target_port: int) -> str:
        """Start a delay relay to server_ip:target_port in the client ns; the address to dial."""
        if self.profile.rtt_s == 0:
            return f"{self.server_ip}:{target_port}"  # nothing to delay: dial the server directly
        assert self._tmp is not None, "start_relay needs an entered KernelLink"
        name = f"relay-{target_port}-{uuid.uuid4().hex[:6]}"
        address_file, log_file = self._tmp / f"{name}.addr", self._tmp / f"{name}.log"
        argv = [sys.executable, "-m", "twinfer.deploy.netem.tcp_delay_relay", "--listen", f"{self.client_ip}:0",
                "--target", f"{self.server_ip}:{target_port}", "--one-way-delay", repr(self.profile.rtt_s / 2),
                "--address-file", str(address_file)]  # fmt: skip
        with open(log_file, "wb") as log:
            proc = self.run_in(self.client_ns, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return wait_for_address(proc, address_file, "delay relay", RELAY_START_TIMEOUT_S, log_file, error=ShapingError)

    def close(self) -> None:
        """Stop every process started here and remove the namespaces; safe to call twice."""
        errors: list[str] = []
        self._stop_processes()
        for ns in list(self._created):
            try:
                remove_namespace(ns)
                self._created.remove(ns)
            except ShapingError as exc:
                errors.append(str(exc))
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if errors:
            raise ShapingError("; ".join(errors))

    def _stop_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._procs.clear()


def run_kernel_shaped_session(
    onnx_path: Path, inputs: np.ndarray, batch: int, profile: NetworkProfile | str, protocol: str = "crypten"
) -> PartyReport:
    """One session of real `twinfer party` processes across a KernelLink, on `protocol`; the client's report.

    Dealer and server share the server namespace; the client reaches both through delay
    relays in its own namespace, over the tbf-limited veth pair.
    """
    session = new_session_id()
    with KernelLink(profile) as link, tempfile.TemporaryDirectory(prefix="twinfer-kernel-") as tmp:
        tmp_path = Path(tmp)
        np.save(tmp_path / "x.npy", inputs)
        # The veth pair joins only these two private namespaces: plaintext there is a choice made here.
        role_args = {
            DEALER: ["--listen", f"{link.server_ip}:0", "--insecure"],
            SERVER: ["--listen", f"{link.server_ip}:0", "--insecure", "--model", str(onnx_path)],
            CLIENT: ["--input", str(tmp_path / "x.npy"), "--batch", str(batch)],
        }

        def start(role: str, dealer_address: str | None = None, server_address: str | None = None) -> PartyCommand:
            peers = [*(["--server", server_address] if server_address else []), *(["--dealer", dealer_address] if dealer_address else [])]
            argv = party_command(role, session, *role_args[role], *peers, "--protocol", protocol, timeout=300, connect_timeout=60)
            ns = link.client_ns if role == CLIENT else link.server_ns
            return PartyCommand(role, argv, tmp_path, popen=functools.partial(link.run_in, ns))

        try:
            reports = launch_local(start, client_view=lambda address: link.start_relay(int(address.rsplit(":", 1)[1])), timeout_s=1800)
        except PartyExitError as err:
            raise ShapingError(f"kernel-shaped {err.role} failed (exit {err.returncode}): {err.stderr.strip()[-2000:]}") from None
    return reports[CLIENT]
