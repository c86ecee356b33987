"""Mutual TLS between parties: each presents its role's certificate, signed by one CA.

A certificate names its role twice, as the common name and as the DNS name in its subject
alternative names: `twinfer-server`, `twinfer-client`, `twinfer-dealer` (see role_name).
The dialing end checks the role of the party it reaches through gRPC's host name check
(`grpc.ssl_target_name_override` set to the expected role's name); the accepting end reads
the dialer's certificate from the call's auth context and refuses any other role
(check_peer_role). Certificates are made by `twinfer certs` (deploy/config/certs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from twinfer.parties.errors import AuthError
from twinfer.protocols.roles import ROLES

__all__ = ["AuthError", "TlsIdentity", "channel_options", "check_peer_role", "role_name"]

NAME_PREFIX = "twinfer-"


def role_name(role: str) -> str:
    """The name a role's certificate carries (common name and DNS subject alternative name)."""
    return NAME_PREFIX + role


def role_of_name(name: str) -> str | None:
    role = name[len(NAME_PREFIX) :] if name.startswith(NAME_PREFIX) else None
    return role if role in ROLES else None


@dataclass(frozen=True, repr=False)
class TlsIdentity:
    """One party's TLS material as PEM bytes: the CA it trusts, its certificate and key.

    Held as bytes, not paths, so that a launcher can hand it to a party on another node.
    """

    role: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never print the key
        return f"TlsIdentity(role={self.role!r})"

    @classmethod
    def from_dir(cls, directory: str | Path, role: str) -> TlsIdentity:
        """ca.pem, <role>.pem and <role>.key from a folder `twinfer certs` wrote."""
        directory = Path(directory)
        return cls.from_files(role, directory / "ca.pem", directory / f"{role}.pem", directory / f"{role}.key")

    @classmethod
    def from_files(cls, role: str, ca: str | Path, cert: str | Path, key: str | Path) -> TlsIdentity:
        if role not in ROLES:
            raise ValueError(f"TLS role must be one of {', '.join(ROLES)}, got '{role}'")
        data = {}
        for what, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"TLS {what} file {path} does not exist (make one with `twinfer certs --out DIR`)")
            data[what] = path.read_bytes()
            if b"-----BEGIN" not in data[what]:
                raise ValueError(f"TLS {what} file {path} is not PEM")
        return cls(role, data["CA certificate"], data["certificate"], data["private key"])

    def server_credentials(self) -> grpc.ServerCredentials:
        """Present this party's certificate; require one signed by the CA from every dialer."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Present this party's certificate when dialing; trust only the CA's."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


def channel_options(peer_role: str) -> list[tuple[str, str]]:
    """Dial options under which the handshake succeeds only if the peer's certificate names `peer_role`."""
    return [("grpc.ssl_target_name_override", role_name(peer_role))]


def peer_cert_role(context: grpc.ServicerContext) -> str | None:
    """The role named in the dialer's verified certificate, or None (no TLS, or no role)."""
    auth = context.auth_context()
    names = [n.decode() for n in auth.get("x509_subject_alternative_name", [])]
    names += [n.decode() for n in auth.get("x509_common_name", [])]
    roles = {role_of_name(n) for n in names} - {None}
    return roles.pop() if len(roles) == 1 else None


def peer_cert_digest(context: grpc.ServicerContext) -> str | None:
    """The sha256 of the dialer's verified certificate (PEM), or None without TLS."""
    import hashlib

    pems = context.auth_context().get("x509_pem_cert", [])
    return hashlib.sha256(pems[0]).hexdigest() if pems else None


def check_peer_role(context: grpc.ServicerContext, allowed: tuple[str, ...], listener_role: str) -> str | None:
    """None if the dialer's certificate names one of `allowed` roles, else why it is refused."""
    role = peer_cert_role(context)
    if role in allowed:
        return None
    named = f"role '{role}'" if role else "no twinfer role"
    return (
        f"{listener_role} refused a peer at {context.peer()}: its certificate names {named}, "
        f"expected {' or '.join(allowed)}"
    )


def handshake_hint(details: str) -> str:
    """A readable reason for a failed TLS connection, from the status details gRPC gives the dialer."""
    text = details.lower()
    if "wrong_version_number" in text:
        return "the listening party does not speak TLS (start it with --tls as well)"
    if "hostname verification" in text:
        return "the listening party's certificate names another role"
    if "certificate signature failure" in text or "certificate_verify_failed" in text or "unknown_ca" in text:
        return "the listening party's certificate is not signed by this party's CA"
    if "socket closed" in text or "connection reset" in text or "certificate_required" in text:
        return (
            "the listening party closed the connection during the TLS handshake: it accepts only a "
            "certificate signed by its CA, and this party presented none or one from another CA"
        )
    if "handshake" in text or "ssl" in text:
        return "the TLS handshake failed"
    return "no connection"
