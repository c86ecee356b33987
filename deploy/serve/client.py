"""`Client`: private inference against a standing server (`twinfer serve`), one session per call."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from twinfer.parties.runtime.serving import SessionOpener
from twinfer.parties.runtime.session import CLIENT, ClientInputs, ClientParty, PartyConfig, PartyReport
from twinfer.parties.runtime.session_spec import SessionSpec
from twinfer.parties.wire.tls import TlsIdentity


def worker_address(server: str, port: int) -> str:
    """The worker's address: the host the client reached the front door at, the worker's port."""
    return f"{server.rsplit(':', 1)[0]}:{port}"


class Client:
    """The client side of a standing server: `infer` runs one session and returns the logits.

        with Client("S:7700", dealer="D:7702", tls="certs/") as c:
            logits = c.infer(images)

    Each call opens a fresh session (a new 128-bit id from the server) and shares the weights
    anew; the server never learns the input nor the logits. `last_report` holds the last
    session's metrics (latency, rounds, bytes).
    """

    def __init__(
        self,
        server: str,
        *,
        dealer: str,
        tls: str | Path | TlsIdentity | None = None,
        spec: SessionSpec | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """`tls`: a folder from `twinfer certs` (the client's certificate and the CA), or an identity;
        `spec`: the session's settings (its protocol and fixed point must be the server's);
        `timeout_s`: the deadline of every network wait (else `spec.options`' or 60 s)."""
        if not dealer:
            raise ValueError("the client needs the dealer's address (dealer='host:port')")
        spec = spec or SessionSpec()
        if timeout_s is not None:
            spec = spec.replace(options=dataclasses.replace(spec.options, recv_timeout_s=timeout_s))
        self.server, self.dealer, self.spec = server, dealer, spec
        self.tls = TlsIdentity.from_dir(tls, CLIENT) if isinstance(tls, (str, Path)) else tls
        self._opener: SessionOpener | None = None
        self.last_report: PartyReport | None = None
        self.last_session: str | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self, inputs: ClientInputs, batch_size: int | None = None) -> PartyReport:
        """Run one session on `inputs` (N x sample shape; or one such array per model input, by name)
        in batches of `batch_size` (default: all); its report."""
        named = ClientParty.check_inputs(inputs, batch_size or 1)  # before a session is opened for it
        batch = batch_size or len(next(iter(named.values())))
        if self._opener is None:
            self._opener = SessionOpener(self.server, options=self.spec.options, tls=self.tls)
        ticket = self._opener.open()
        config = PartyConfig(
            role=CLIENT, session_id=ticket.session_id, server_address=worker_address(self.server, ticket.port),
            dealer_address=self.dealer, spec=self.spec, tls=self.tls,
        )  # fmt: skip
        self.last_session = ticket.session_id
        self.last_report = ClientParty(inputs, batch, config).run()
        return self.last_report

    def infer(self, inputs: ClientInputs, batch_size: int | None = None) -> np.ndarray:
        """The logits of `inputs`, privately: one session."""
        return self.session(inputs, batch_size).logits

    def close(self) -> None:
        if self._opener is not None:
            self._opener.close()
            self._opener = None
