"""Make a CA and one certificate per party role for mutual TLS (`twinfer certs`)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from twinfer.parties.wire.tls import ROLES, role_name


def _cryptography():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ValueError("`twinfer certs` needs the 'cryptography' package: pip install cryptography") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def make_ca(out: Path, name: str = "twinfer CA", days: int = 365):
    """A self-signed CA; writes ca.pem and ca.key; returns (certificate, key)."""
    x509, hashes, serialization, ec, _, NameOID = _cryptography()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _key_pem(key), private=True)
    return cert, key


def _key_pem(key) -> bytes:
    _, _, serialization, _, _, _ = _cryptography()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_party_cert(out: Path, role: str, ca_cert, ca_key, days: int = 365, file_stem: str | None = None) -> Path:
    """<role>.pem and <role>.key, signed by the CA; the role is the CN and a DNS SAN."""
    x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _cryptography()
    key = ec.generate_private_key(ec.SECP256R1())
    name = role_name(role)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # Every party may both accept and dial (the server listens for the client and dials the dealer).
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    stem = file_stem or role
    _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / f"{stem}.key", _key_pem(key), private=True)
    return out / f"{stem}.pem"


def make_certs(out: str | Path, *, days: int = 365, roles: tuple[str, ...] = ROLES, ca_name: str = "twinfer CA") -> Path:
    """A fresh CA and one certificate and key per role in `out`; refuses to overwrite a CA."""
    out = Path(out)
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    if (out / "ca.pem").exists() or (out / "ca.key").exists():
        raise ValueError(f"{out} already holds a CA (ca.pem/ca.key); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(out, ca_name, days)
    for role in roles:
        make_party_cert(out, role, ca_cert, ca_key, days)
    return out
