"""The settings every party of a session agrees on, built once at the CLI or API edge and handed
whole to each party (PartyConfig.spec): the protocol, the fixed point, the model's declared input
range, the transport's deadlines and shaping, and the insecure choices a user made on purpose.

A party's own identity (its role, session id, addresses, TLS certificate) is not here: each
process gets only its own certificate and key, never another role's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from twinfer.parties.wire.transport import TransportOptions
from twinfer.protocols.backends import DEFAULT_PROTOCOL, Backend, backend_class
from twinfer.protocols.backends.base import AUTO, check_session_bits
from twinfer.protocols.ir.graph import GraphError, check_input_range
from twinfer.protocols.passes.encoding import TRUNCATION_POLICIES


@dataclass(frozen=True)
class SessionSpec:
    """A session's settings, checked when made: a ValueError names the one that is wrong."""

    protocol: str = DEFAULT_PROTOCOL  # the secure backend; both parties of a session must agree
    # fixed-point precision: 'auto' (the server's check chooses; a client takes the server's) or a
    # number both parties must agree on
    fraction_bits: int | str = AUTO
    truncation: str = "auto"  # server: which layers truncate exactly (protocols/passes/encoding.py)
    input_range: tuple[float, float] | None = None  # server: the inputs the model is declared for (else the artifact's)
    options: TransportOptions = field(default_factory=TransportOptions)
    insecure: bool = False  # allow listening on a non-loopback address without TLS
    insecure_trusted_first_party: bool = False  # no dealer: the server makes the randomness (CrypTen TFP)
    prefetch: bool = True  # have the dealer make a batch's correlations before they are needed
    prefetch_ahead: bool = False  # and the next batch's between batches (online latency alone)

    def __post_init__(self) -> None:
        backend = backend_class(self.protocol)  # an unknown protocol is refused before anything starts
        if self.insecure_trusted_first_party and not backend.trusted_first_party:
            raise ValueError(
                f"--insecure-trusted-first-party runs CrypTen's trusted first party: protocol '{self.protocol}' needs a dealer "
                "(pass --protocol crypten with it, or start a dealer and pass --dealer)"
            )
        check_session_bits(self.fraction_bits)
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, got {self.truncation!r}")
        if self.input_range is not None:
            try:
                object.__setattr__(self, "input_range", check_input_range(self.input_range))
            except GraphError as err:
                raise ValueError(str(err)) from None

    @property
    def backend(self) -> type[Backend]:
        return backend_class(self.protocol)

    def replace(self, **changes: Any) -> SessionSpec:
        """A copy with these settings changed, checked again."""
        return dataclasses.replace(self, **changes)
