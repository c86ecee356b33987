"""The configuration file of one standalone party (`twinfer party --config party.yaml`).

YAML or TOML (by extension: .yaml/.yml or .toml), one flat table. Keys are the long names of
the `twinfer party` flags with underscores (see FIELDS); an unknown key, a wrong type or an
unreadable file is an error that names the file and the key. Relative paths (model, input,
output, address_file, tls) are relative to the folder of the config file. A flag given on the
command line wins over the file.

    role: server
    session: 3f2b9c0d5e8a41f6b7c2d9e0a1b4c5d6   # 128 random bits (shorter only with insecure: true)
    listen: 10.0.0.1:7700
    dealer: 10.0.0.3:7701
    model: model.onnx
    tls: certs/                # or {ca: certs/ca.pem, cert: certs/server.pem, key: certs/server.key}
    timeout: 60
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    help: str
    path: bool = False  # resolved against the config file's folder


FIELDS: dict[str, Field] = {
    "role": Field(str, "server, client or dealer"),
    "session": Field(str, "session id; every party of a session uses the same"),
    "listen": Field(str, "server and dealer: host:port to listen on"),
    "address_file": Field(str, "server and dealer: write the bound address here", path=True),
    "server": Field(str, "client: the server's host:port"),
    "dealer": Field(str, "server and client: the dealer's host:port"),
    "model": Field(str, "server: model file or artifact", path=True),
    "input": Field(str, "client: .npy array of samples", path=True),
    "batch": Field(int, "client: samples per batch"),
    "output": Field(str, "client: write the logits to this .npy file", path=True),
    "tls": Field((str, dict), "folder from `twinfer certs`, or a table with ca, cert and key files", path=True),
    "timeout": Field((int, float), "deadline of every network wait, seconds"),
    "connect_timeout": Field((int, float), "deadline to reach a peer, seconds"),
    "accept_timeout": Field((int, float), "server: how long to wait for the client to dial in, seconds"),
    "network": Field(str, "shape the client<->server link (a profile name or 'rtt=..,bw=..')"),
    "dealer_network": Field(str, "shape the dealer's links"),
    "insecure_trusted_first_party": Field(bool, "INSECURE: no dealer; the server makes the randomness"),
    "protocol": Field(str, "the secure backend (crypten or fss); every party of a session the same"),
    "fraction_bits": Field((int, str), "fixed-point fractional bits, 'auto' or a number; every party of a session the same"),
    "truncation": Field(str, "server: auto, local or exact (how products are scaled back)"),
    "input_range": Field((str, list), "server: the values the model is declared for, 'LO,HI' or [LO, HI]"),
    "insecure": Field(bool, "INSECURE: allow a non-loopback listener without TLS and a short session id"),
}
TLS_KEYS = ("ca", "cert", "key")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or TOML file's top-level table; clear errors for a missing, unparsable or non-table file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = _parse(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level, got {type(data).__name__}")
    return data


def check_value(path: Path, key: str, value: Any, kind: type | tuple[type, ...], help: str) -> None:
    """Raise a ValueError naming the file and key unless `value` is of `kind` (a bool is not a number)."""
    numeric = kind in ((int, float), int, float)
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        raise ValueError(f"{path}: key '{key}' must be {_type_name(kind)} ({help}), got {value!r}")


def reject_unknown(path: Path, data: dict, known) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def _parse(path: Path) -> Any:
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
    raise ValueError(f"{path}: a party config must end in .yaml, .yml or .toml")


def _type_name(kind: type | tuple[type, ...]) -> str:
    if kind == (int, float):
        return "a number"
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table", list: "a list"}
    return " or ".join(names[k] for k in kinds)


def load_party_config(path: str | Path) -> dict[str, Any]:
    """The file's settings, checked and with paths resolved; keys as in FIELDS."""
    path = Path(path)
    data = read_config_file(path)
    reject_unknown(path, data, FIELDS)
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = FIELDS[key]
        check_value(path, key, value, field.kind, field.help)
        if key == "tls" and isinstance(value, dict):
            value = _tls_table(path, value)
        elif field.path:
            value = str((path.parent / value).resolve()) if value else value
        out[key] = value
    return out


def _tls_table(path: Path, table: dict) -> dict[str, str]:
    wrong = sorted(set(table) - set(TLS_KEYS))
    missing = [k for k in TLS_KEYS if k not in table]
    if wrong or missing:
        raise ValueError(f"{path}: key 'tls' as a table needs exactly {', '.join(TLS_KEYS)} (unknown: {wrong or 'none'}, missing: {missing or 'none'})")
    for key, value in table.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: key 'tls.{key}' must be a file path, got {value!r}")
    return {key: str((path.parent / value).resolve()) for key, value in table.items()}
