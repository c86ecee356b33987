"""One inference session as each party runs it: connect, share, evaluate, reveal to the client.

Rank 0 is the server (owns the weights), rank 1 the client (owns the input, learns the
output). The dealer is a third process that only hands out correlated randomness.
Every party runs the same sequence of messages; a failure anywhere is sent to the peers
with its error id, so every party ends with the same error.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from twinfer.protocols.backends import DEFAULT_PROTOCOL, Backend, protocols
from twinfer.protocols.backends.base import AUTO, BackendError
from twinfer.protocols.passes.encoding import SessionEncoding, apply_plan
from twinfer.protocols.ir.graph import Graph, GraphError
from twinfer.protocols.passes.public_inputs import check_covered, check_public_inputs, split_inputs
from twinfer.protocols.passes.validation import graph_from_json
from twinfer.protocols.ops.embedding import check_ids, encode_input
from twinfer.protocols.roles import CLIENT, DEALER, RANKS, SERVER
from twinfer.protocols.secure_graph import run_secure

from twinfer.parties.dealer.core import DealerCore
from twinfer.parties.dealer.service import add_dealer_servicer
from twinfer.parties.dealer.client import DealerClient
from twinfer.parties.errors import InputError, ProtocolError, TwinferError
from twinfer.parties.metrics import Metrics
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.runtime.model_file import check_held_range, check_input_array, server_encoding
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.parties.wire.transport import GrpcTransport, PeerServicer, TransportOptions, add_peer_servicer, start_server

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0  # past the grace, how long closing a listener waits for gRPC to stop serving


@dataclass(frozen=True)
class PartyConfig:
    """One party of one session: who it is, where its peers are, and the session's settings."""

    role: str
    session_id: str
    spec: SessionSpec = field(default_factory=SessionSpec)
    listen: str = "127.0.0.1:0"
    server_address: str | None = None
    dealer_address: str | None = None
    tls: TlsIdentity | None = None  # mutual TLS on every link this party opens or accepts
    # server: the encoding its launcher settled on the very inputs (`twinfer infer`), instead of its own check
    encoding: SessionEncoding | None = None
    node: str | None = None  # where the launcher placed it (a Ray node id); else this host's name
    node_address: str | None = None  # that node's address (Ray's node IP), reported beside it

    def __post_init__(self) -> None:
        if self.role not in (SERVER, CLIENT, DEALER):
            raise ValueError(f"role must be server, client or dealer, got '{self.role}'")
        if not self.session_id:
            raise ValueError("session_id must not be empty")
        if self.tls is not None and self.tls.role != self.role:
            raise ValueError(f"the {self.role} was given the {self.tls.role}'s TLS certificate")


def is_loopback(listen: str) -> bool:
    """Whether a 'host:port' listen address is reachable only from this machine."""
    host = listen.rsplit(":", 1)[0].strip("[]") if ":" in listen else listen
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_listen(listen: str, tls: TlsIdentity | None, insecure: bool, role: str) -> None:
    """Plaintext only on loopback, unless the user chose it: a ValueError saying how to proceed."""
    if tls is None and not insecure and not is_loopback(listen):
        raise ValueError(
            f"the {role} would listen on {listen} without TLS: anyone who can reach it could join a session or read "
            "its traffic. Use --tls DIR (from `twinfer certs`), listen on 127.0.0.1, or pass --insecure to accept that"
        )


class PartyListener:
    """A party process's gRPC server, shared by every session it serves (server or dealer).

    With TLS it presents the party's certificate and accepts only dialers whose certificate,
    signed by the same CA, names the role each service expects. Without TLS it listens only
    on loopback, unless `insecure` says otherwise.
    """

    def __init__(
        self,
        role: str,
        listen: str,
        options: TransportOptions,
        tls: TlsIdentity | None = None,
        insecure: bool = False,
        *,
        dealer: DealerCore | None = None,
        extra: tuple[tuple[object, Any], ...] = (),
    ) -> None:
        """`dealer`: the dealer's sessions (default: those it is told to expect), served on this port;
        `extra`: more (servicer, add_to_server) pairs on the same port, such as gRPC health."""
        if role not in (SERVER, DEALER):
            raise ValueError(f"only the server and the dealer listen, not the {role}")
        check_listen(listen, tls, insecure, role)
        self.role = role
        if role == SERVER:
            self.peers = PeerServicer(peer_roles=(CLIENT,) if tls is not None else None, role=SERVER)
            servicers = [(self.peers, add_peer_servicer)]
        else:
            self.dealer = dealer or DealerCore(
                idle_timeout_s=options.recv_timeout_s, bind_roles=tls is not None, accept_timeout_s=options.accept_timeout_s
            )
            servicers = [(self.dealer, add_dealer_servicer)]
        self._server, self.port = start_server(servicers + list(extra), listen, options, tls)
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"

    def close(self, grace: float = 1.0) -> None:
        """Stop listening: calls in flight get `grace` seconds, then are cancelled.

        Returns once gRPC has stopped serving, so that a late call (a peer's Close racing this
        exit) is refused by gRPC's core instead of reaching a half-torn-down process.
        """
        self._server.stop(grace=grace).wait(grace + STOP_WAIT_S)


@dataclass
class PartyReport:
    """What a party hands back: identity, metrics and (for the client only) the logits."""

    role: str
    pid: int
    node: str
    node_address: str | None = None  # the address of the node it ran on, where a launcher placed it
    setup_s: float = 0.0
    torch_threads: int = 0
    batch_latency_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    batch_rounds: list[int] = field(default_factory=list)
    batch_bytes_online: list[int] = field(default_factory=list)
    batch_bytes_sent: list[int] = field(default_factory=list)
    batch_protocol_stats: list[dict[str, float]] = field(default_factory=list)  # the backend's own counters
    batch_layer_wall_s: list[dict[str, float]] = field(default_factory=list)  # each batch's seconds per layer
    bytes_offline: int = 0
    relu_count: int = 0
    comparisons: int = 0
    protocol: str = DEFAULT_PROTOCOL
    layers: dict[str, dict] = field(default_factory=dict)
    logits: np.ndarray | None = None
    encoding: dict | None = None  # the session's fixed point as the server settled it (SessionEncoding.summary)
    public_inputs: list[str] = field(default_factory=list)  # model inputs sent in the clear (an attention mask)


def _wrap(err: BaseException, role: str) -> TwinferError:
    if isinstance(err, TwinferError):
        if not err.origin:
            err.origin = role
        return err
    if isinstance(err, BackendError):
        return ProtocolError(f"{role}'s {err}", origin=role)
    wrapped = TwinferError(f"{type(err).__name__}: {err}", origin=role)
    wrapped.kind = "internal"
    return wrapped


class _TwoPartySession:
    """What the server and the client share: transport, dealer link, CrypTen lifecycle."""

    role: str
    rank: int

    def __init__(self, config: PartyConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.transport = GrpcTransport(
            session_id=config.session_id,
            role=config.role,
            peer_role=CLIENT if config.role == SERVER else SERVER,
            options=config.spec.options,
            metrics=self.metrics,
        )
        self.dealer: DealerClient | None = None
        self.report = PartyReport(
            role=config.role, pid=os.getpid(), node=config.node or socket.gethostname(), node_address=config.node_address,
            protocol=config.spec.protocol,
        )  # fmt: skip
        self.backend: Backend | None = None
        self.fraction_bits: int | str = config.spec.fraction_bits  # a client with 'auto' takes the server's
        config.spec.backend.prepare()  # imports happen here, not inside the measured setup

    def _connect_dealer(self) -> None:
        """First thing in a session: from then on any failure reaches the dealer too."""
        if self.config.spec.insecure_trusted_first_party:
            return
        if not self.config.dealer_address:
            raise ValueError("a dealer address is required (or the insecure trusted-first-party flag)")
        self.dealer = DealerClient(
            self.config.dealer_address,
            session_id=self.config.session_id,
            role=self.role,
            options=self.config.spec.options,
            metrics=self.metrics,
            prefetch=self.config.spec.prefetch,
            prefetch_ahead=self.config.spec.prefetch_ahead,
            tls=self.config.tls,
            protocol=self.config.spec.protocol,
        )

    def _agree_protocol(self, theirs: np.ndarray, peer: str) -> None:
        """Refuse a peer that runs another backend: the two would desynchronise, not fail."""
        name = theirs.tobytes().decode(errors="replace")
        if name != self.config.spec.protocol:
            raise ProtocolError(
                f"the {peer} runs protocol '{name}' but this {self.role} runs '{self.config.spec.protocol}': every party "
                f"of a session must use the same --protocol (known: {', '.join(protocols())})",
                origin=self.role,
            )

    def _agree_encoding(self, theirs: np.ndarray, peer: str) -> None:
        """Refuse a peer with other fractional bits: the two would read each other's shares at another scale.
        The server states the session's (0 from a client: it takes the server's, --fraction-bits auto)."""
        bits = int(theirs[0]) if theirs.shape == (1,) else None
        if bits == 0 and self.role == SERVER:
            return
        if self.fraction_bits == AUTO and bits is not None and self.role == CLIENT:
            self.fraction_bits = bits
            return
        if bits != self.fraction_bits:
            raise ProtocolError(
                f"the {peer} encodes with {bits} fractional bits but this {self.role} with {self.fraction_bits}: "
                "every party of a session must use the same --fraction-bits (or 'auto' on the client)",
                origin=self.role,
            )

    def _agree(self, peer: str) -> None:
        """The peer's session parameters (protocol, then fractional bits), refused unless equal to ours."""
        self._agree_protocol(self.transport.recv("protocol"), peer)
        self._agree_encoding(self.transport.recv("fraction_bits"), peer)

    def _send_protocol(self) -> None:
        self.transport.send("protocol", np.frombuffer(self.config.spec.protocol.encode(), dtype=np.uint8))
        bits = 0 if self.fraction_bits == AUTO else int(self.fraction_bits)
        self.transport.send("fraction_bits", np.array([bits], dtype=np.int64))

    def _start_backend(self) -> None:
        torch.set_num_threads(1)  # two parties on one machine: 10x slower with default threads
        self.backend = self.config.spec.backend.create(self.rank, self.transport, self.dealer, fraction_bits=self.fraction_bits)
        self.backend.start()
        self.report.torch_threads = torch.get_num_threads()

    def _share_weights(self, graph: Graph, weights: dict[str, np.ndarray] | None) -> dict[str, Any]:
        shared = {}
        with self.metrics.layer("share_weights"):
            for name in sorted(graph.weight_shapes):
                value = torch.from_numpy(weights[name]) if weights is not None else torch.zeros(graph.weight_shapes[name])
                shared[name] = self.backend.share(value, src=RANKS[SERVER], constant=name)
        return shared

    def _infer_batch(
        self, graph: Graph, shared_weights: dict[str, Any], x: torch.Tensor, next_size: int | None, public: dict[str, torch.Tensor] | None = None
    ) -> Any:
        """One batch; `next_size`: the next batch's size (None after the last), for the dealer's prefetch;
        `public`: the batch's public values (what the server's public program gave for its public inputs)."""
        backend = self.backend
        backend.reset_stats()
        if self.dealer is not None:
            self.dealer.begin_batch(int(x.shape[0]), next_size)
        before = self.metrics.total()
        walls_before = self.metrics.walls()
        start = time.perf_counter()
        with self.metrics.layer("share_input"):
            x_shared = backend.share(encode_input(graph, x), src=RANKS[CLIENT])  # ids -> one-hot on the client
        counts: Counter = Counter()
        y = run_secure(graph, shared_weights, x_shared, backend, scope=self.metrics.layer, counts=counts, public=public)
        with self.metrics.layer("reveal_output"):
            logits = backend.reveal(y, dst=RANKS[CLIENT])  # None on the server: only the client learns it
        after = self.metrics.total()
        self.report.batch_latency_s.append(time.perf_counter() - start)
        if self.dealer is not None:
            self.dealer.end_batch(int(x.shape[0]), next_size)
        self.report.batch_sizes.append(int(x.shape[0]))
        self.report.batch_rounds.append(after.rounds - before.rounds)
        self.report.batch_bytes_online.append(
            (after.bytes_sent + after.bytes_received) - (before.bytes_sent + before.bytes_received)
        )
        self.report.batch_bytes_sent.append(after.bytes_sent - before.bytes_sent)
        self.report.relu_count += counts["relu_count"]
        self.report.comparisons += counts["comparisons"]
        self.report.batch_protocol_stats.append(backend.stats())
        self.report.batch_layer_wall_s.append(
            {n: w - walls_before.get(n, 0.0) for n, w in self.metrics.walls().items() if n not in ("", "share_weights")}
        )
        return logits

    def _finish(self) -> PartyReport:
        self.report.layers = self.metrics.snapshot()
        self.report.bytes_offline = self.metrics.total().bytes_offline
        return self.report

    def _shutdown(self, error: TwinferError | None) -> None:
        if error is not None:
            self.transport.fail(error)
        else:
            self.transport.close()
        if self.dealer is not None:
            self.dealer.close(error)
        if self.backend is not None:
            self.backend.stop()
            self.backend = None

    def run(self) -> PartyReport:
        error: TwinferError | None = None
        try:
            self._run()
            return self._finish()
        except BaseException as err:  # every failure is reported to the peers, then re-raised
            error = _wrap(err, self.role)
            if self.dealer is not None:  # a wait on the peer that ran out while the dealer was silent is the dealer's
                error = self.dealer.blame(error)
            log.error("%s failed: %s", self.role, error)
            raise error from (err if err is not error else None)
        finally:
            self._shutdown(error)

    def _run(self) -> None:
        raise NotImplementedError


def server_graph(graph: Graph, weights: dict[str, np.ndarray], config: PartyConfig) -> tuple[Graph, SessionEncoding]:
    """The graph a server serves and the encoding it tells its clients: checked against the
    model's input range (the configured one, else the artifact's, else the widest its checks
    accept) before anything is shared, each layer's truncation in its attributes (a ModelError
    naming the layer when refused); or the encoding its launcher settled on the very inputs."""
    if config.spec.input_range is not None:
        graph = dataclasses.replace(graph, input_range=config.spec.input_range)
    if config.encoding is not None:
        encoding = config.encoding
        held = graph.input_range if graph.input_range is not None else encoding.input_range
    else:
        encoding = server_encoding(graph, weights, config.spec.fraction_bits, config.spec.protocol, config.spec.truncation)
        held = encoding.input_range
    return dataclasses.replace(apply_plan(graph, encoding.truncations(), encoding.widths), input_range=held), encoding


class ServerParty(_TwoPartySession):
    """Owns the weights; listens for the client; never receives the output."""

    role, rank = SERVER, RANKS[SERVER]

    def __init__(
        self, graph: Graph, weights: dict[str, np.ndarray], config: PartyConfig, listener: PartyListener | None = None,
        encoding: SessionEncoding | None = None,
    ) -> None:
        """`listener`: a listener shared with other sessions of this process, and `encoding` the one its
        host settled (server_graph, with `graph`); else one of its own, and its own check."""
        graph.check_weights(weights)
        if encoding is None:
            graph, encoding = server_graph(graph, weights, config)
        super().__init__(config)
        self.graph = graph
        self.weights = weights
        self.encoding = encoding
        self.fraction_bits = encoding.fraction_bits
        self.report.encoding = encoding.summary()
        self._own_listener = listener is None
        self.listener = listener or PartyListener(SERVER, config.listen, config.spec.options, config.tls, config.spec.insecure)
        self.listener.peers.expect(self.transport)
        self.port, self.address = self.listener.port, self.listener.address

    def _run(self) -> None:
        start = time.perf_counter()
        self._connect_dealer()
        self.transport.wait_accepted()
        self._send_protocol()
        self.transport.send("graph", np.frombuffer(self.graph.to_json().encode(), dtype=np.uint8))
        self.transport.send("encoding", np.frombuffer(self.encoding.to_json().encode(), dtype=np.uint8))
        self._agree(CLIENT)
        plan = self.transport.recv("plan")
        if plan.shape != (2,) or plan[0] < 1 or plan[1] < 1:
            raise ProtocolError(f"client sent an invalid batch plan {plan.tolist()}", origin=self.role)
        n_samples, batch = int(plan[0]), int(plan[1])
        public = self._public_values(n_samples)
        self._start_backend()
        shared = self._share_weights(self.graph, self.weights)
        self.report.setup_s = time.perf_counter() - start
        for begin in range(0, n_samples, batch):
            size = min(batch, n_samples - begin)
            placeholder = torch.zeros((size, *self.graph.input_shape))  # shape only: the client's data
            after = n_samples - begin - size
            operands = {k: v[begin : begin + size] for k, v in public.items()}
            if self._infer_batch(self.graph, shared, placeholder, min(batch, after) if after else None, operands) is not None:
                raise ProtocolError("the server received the output; this must never happen", origin=self.role)
        self.transport.recv("done")

    def _public_values(self, n: int) -> dict[str, torch.Tensor]:
        """The client's public inputs (in the clear), run through the model's public program; the
        values sent back, and returned, once checked against what the range check covered."""
        if not self.graph.public_inputs:
            return {}
        received = {name: self.transport.recv(f"public:{name}") for name in sorted(self.graph.public_inputs)}
        try:
            inputs = check_public_inputs(self.graph.public_inputs, received, n)
            values = self.graph.public_program.run(inputs)
            check_covered(self.graph.public, values)
        except ValueError as err:
            raise InputError(str(err), origin=self.role) from None
        for name in sorted(values):
            self.transport.send(f"public_value:{name}", values[name])
        return {k: torch.from_numpy(v) for k, v in values.items()}

    def _shutdown(self, error: TwinferError | None) -> None:
        super()._shutdown(error)
        self.listener.peers.forget(self.config.session_id)  # a client that never came must not find it later
        if self._own_listener:
            self.listener.close()


ClientInputs = np.ndarray | Mapping[str, np.ndarray]  # the secret input, or one array per model input by name


class ClientParty(_TwoPartySession):
    """Owns the input; gets the weight-free graph from the server; learns the logits."""

    role, rank = CLIENT, RANKS[CLIENT]

    def __init__(self, inputs: ClientInputs, batch_size: int, config: PartyConfig) -> None:
        """`inputs`: the secret input, or one array per model input by name (the secret one and the
        public ones, such as an attention mask, which are sent in the clear)."""
        if not config.server_address:
            raise ValueError("the client needs the server's address")
        named = self.check_inputs(inputs, batch_size)
        super().__init__(config)
        self.named = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in named.items()}
        self.inputs = next(iter(self.named.values()))  # until the graph names the secret one
        self.batch_size = batch_size
        self.graph: Graph | None = None

    @staticmethod
    def check_inputs(inputs: ClientInputs, batch_size: int) -> dict[str, np.ndarray]:
        """The checks that need no model: batches of real numbers (N x ...) with the same N, a batch
        size of at least 1; by input name ('' for a lone array)."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        named = dict(inputs) if isinstance(inputs, Mapping) else {"": inputs}
        if not named:
            raise InputError("no input given")
        for name, value in named.items():
            what = f"input '{name}'" if name else "input"
            named[name] = value = check_input_array(value, what)  # real numbers, not empty
            if value.ndim < 2 or value.shape[0] < 1:
                raise InputError(f"{what} must be a batch of samples (N x ...), got shape {value.shape}")
        if len({len(v) for v in named.values()}) > 1:
            raise InputError(f"the inputs hold different numbers of samples: { {k: len(v) for k, v in named.items()} }")
        return named

    def _split_inputs(self, graph: Graph) -> dict[str, np.ndarray]:
        """The secret input (set as self.inputs) and the public ones the graph takes, by name."""
        try:
            self.inputs, public = split_inputs(graph.input_name, graph.public_inputs, self.named)
        except ValueError as err:
            raise InputError(str(err), origin=self.role) from None
        return public

    def _receive_public_values(self, graph: Graph, public: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Send the public inputs in the clear; receive what the server's public program made of them."""
        if not public:
            return {}
        for name in sorted(public):
            self.transport.send(f"public:{name}", public[name])
        values = {name: self.transport.recv(f"public_value:{name}") for name in sorted(graph.public)}
        for name, spec in graph.public.items():
            if values[name].shape != (len(self.inputs), *spec.shape) or values[name].dtype != np.float32:
                raise ProtocolError(f"the server sent the public value '{name}' as {values[name].dtype} {values[name].shape}", origin=self.role)
        try:
            check_covered(graph.public, values)
        except ValueError as err:
            raise InputError(str(err), origin=self.role) from None
        return {k: torch.from_numpy(np.array(v)) for k, v in values.items()}

    def _receive_encoding(self) -> SessionEncoding:
        raw = self.transport.recv("encoding")
        try:
            encoding = SessionEncoding.from_json(raw.tobytes().decode())
        except (GraphError, UnicodeDecodeError) as err:
            raise ProtocolError(f"the server sent an unusable session encoding: {err}", origin=self.role) from None
        if encoding.fraction_bits != self.fraction_bits:
            raise ProtocolError(
                f"the server states {encoding.fraction_bits} fractional bits in its encoding but {self.fraction_bits} at the handshake",
                origin=self.role,
            )
        self.report.encoding = encoding.summary()
        return encoding

    def _receive_graph(self) -> Graph:
        raw = self.transport.recv("graph")
        try:
            return graph_from_json(raw.tobytes().decode())
        except (GraphError, UnicodeDecodeError) as err:
            raise ProtocolError(f"the server sent an unusable graph: {err}", origin=self.role) from None

    def _run(self) -> None:
        start = time.perf_counter()
        self._connect_dealer()
        self.transport.dial(self.config.server_address, tls=self.config.tls)
        self._agree(SERVER)
        self.graph = graph = self._receive_graph()
        encoding = self._receive_encoding()
        public = self._split_inputs(graph)
        self.report.public_inputs = sorted(public)
        if tuple(self.inputs.shape[1:]) != graph.input_shape:
            raise InputError(
                f"input samples have shape {tuple(self.inputs.shape[1:])}, but the model expects "
                f"{graph.input_shape} (input array shape {self.inputs.shape})",
                origin=self.role,
            )
        try:
            check_ids(graph, self.inputs)  # an embedding model's input: integer ids in range
        except ValueError as err:
            raise InputError(str(err), origin=self.role) from None
        check_held_range(encoding, self.inputs, origin=self.role)  # before any share is sent
        self.report.encoding = encoding.for_inputs(self.inputs).summary()  # the error stated for inputs like these
        self._send_protocol()
        self.transport.send("plan", np.array([len(self.inputs), self.batch_size], dtype=np.int64))
        public_values = self._receive_public_values(graph, public)
        self._start_backend()
        shared = self._share_weights(graph, None)
        self.report.setup_s = time.perf_counter() - start
        outputs = []
        for begin in range(0, len(self.inputs), self.batch_size):
            x = torch.tensor(self.inputs[begin : begin + self.batch_size])
            after = len(self.inputs) - begin - len(x)
            operands = {k: v[begin : begin + len(x)] for k, v in public_values.items()}
            outputs.append(self._infer_batch(graph, shared, x, min(self.batch_size, after) if after else None, operands).numpy())
        self.report.logits = np.concatenate(outputs)
        self.transport.send("done", np.zeros(0, dtype=np.uint8))


class DealerParty:
    """Serves correlated randomness for one session, then reports what it sent."""

    def __init__(self, config: PartyConfig, listener: PartyListener | None = None) -> None:
        """`listener`: a dealer listener shared with other sessions of this process; else one of its own."""
        self.config = config
        self._own_listener = listener is None
        self.listener = listener or PartyListener(DEALER, config.listen, config.spec.options, config.tls, config.spec.insecure)
        self.servicer = self.listener.dealer
        self.servicer.open_session(config.session_id)
        self.port, self.address = self.listener.port, self.listener.address

    def run(self, timeout_s: float = 3600.0) -> PartyReport:
        session = self.servicer.wait_finished(self.config.session_id, timeout_s)
        if self._own_listener:
            self.listener.close()
        report = PartyReport(
            role=DEALER, pid=os.getpid(), node=self.config.node or socket.gethostname(), node_address=self.config.node_address,
            bytes_offline=session.bytes_sent,
        )  # fmt: skip
        if session.error is not None:
            raise session.error  # typed by its kind: every party of the session exits with one code
        return report
