"""Typed errors a party raises; each carries an error id shared by every party of a session."""

from __future__ import annotations

import uuid


def new_error_id() -> str:
    """A short id that names one failure in the logs of every party."""
    return uuid.uuid4().hex[:12]


class TwinferError(Exception):
    """Base of every error twinfer raises on purpose."""

    kind = "error"

    def __init__(self, message: str, *, error_id: str | None = None, origin: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.error_id = error_id or new_error_id()
        self.origin = origin

    def __reduce__(self):
        # Keep the error id and origin when Ray or multiprocessing carries the error across processes.
        return (_rebuild, (type(self), self.message, self.error_id, self.origin, self.kind))

    def __str__(self) -> str:
        where = f" at {self.origin}" if self.origin else ""
        return f"[{self.kind} {self.error_id}{where}] {self.message}"


def _rebuild(cls: type, message: str, error_id: str, origin: str, kind: str) -> "TwinferError":
    err = cls(message, error_id=error_id, origin=origin)
    err.kind = kind
    return err


class LocalError(TwinferError):
    """This machine cannot do what was asked: listen on an address (in use, not its own),
    write an output file. Nothing a peer did."""

    kind = "local"


class PeerError(TwinferError):
    """The peer failed, went away, or did not answer before the deadline."""

    kind = "peer"


class PeerTimeoutError(PeerError):
    kind = "timeout"


class BusyError(PeerError):
    """A standing server or dealer refused a new session: it runs as many as it may, or is draining."""

    kind = "busy"


class AuthError(PeerError):
    """A peer without an acceptable TLS certificate: none, another CA's, or another role's."""

    kind = "auth"


class ProtocolError(TwinferError):
    """A frame arrived that this party did not expect: other session, sequence or tag."""

    kind = "protocol"


class FrameTooLargeError(ProtocolError):
    kind = "frame-too-large"


class ModelError(TwinferError):
    """The model file or artifact is missing, malformed, or uses something unsupported."""

    kind = "model"


class InputError(TwinferError):
    """The client's input does not fit the model."""

    kind = "input"


def error_from_wire(kind: str, message: str, error_id: str, origin: str) -> TwinferError:
    """The exception a party raises when its peer reports a failure: same kind, same id, hence the
    same exit code (deploy/cli/cli.py) on every party of the session."""
    err_type = {
        "timeout": PeerTimeoutError,
        "auth": AuthError,
        "busy": BusyError,
        "protocol": ProtocolError,
        "frame-too-large": FrameTooLargeError,
        "model": ModelError,
        "input": InputError,
        "local": LocalError,
        "internal": TwinferError,  # a bug where it started: every party exits with code 1, as that one does
    }.get(kind, PeerError)
    err = err_type(f"{origin or 'peer'} failed ({kind}): {message}", error_id=error_id or None, origin=origin)
    err.kind = kind if err_type in (PeerError, TwinferError) and kind else err.kind
    return err
