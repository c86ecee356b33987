"""`twinfer party --config`: strict YAML/TOML configs, and parties in separate network namespaces over mutual TLS."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.stated import assert_within_stated_error
from twinfer.deploy.config.party_config import load_party_config

pytestmark = pytest.mark.timeout(240)


def _twinfer(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of `twinfer ARGS` (in this process: a config error stops before any party starts)."""
    from twinfer.deploy.cli.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_yaml_and_toml_read_alike_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("role: server\nsession: s1\nmodel: m.onnx\ntimeout: 30\ntls: {ca: c/ca.pem, cert: c/s.pem, key: c/s.key}\n")
    (tmp_path / "a.toml").write_text('role = "server"\nsession = "s1"\nmodel = "m.onnx"\ntimeout = 30\n[tls]\nca = "c/ca.pem"\ncert = "c/s.pem"\nkey = "c/s.key"\n')
    yaml_config, toml_config = load_party_config(tmp_path / "a.yaml"), load_party_config(tmp_path / "a.toml")
    assert yaml_config == toml_config
    assert yaml_config["model"] == str(tmp_path / "m.onnx") and yaml_config["tls"]["key"] == str(tmp_path / "c" / "s.key")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.yaml", "role: client\nsession: x\nsever: 10.0.0.1:7700\n", r"p.yaml: unknown key 'sever' \(known: role, session"),
        ("p.toml", 'role = "client"\ntimeout = "slow"\n', r"p.toml: key 'timeout' must be a number"),
        ("p.yaml", "role: client\nbatch: true\n", r"key 'batch' must be an integer"),
        ("p.yaml", "role: [client\n", r"p.yaml: not valid YAML"),
        ("p.yaml", "- role\n", r"expected a table of settings"),
        ("p.yaml", "tls: {ca: a.pem}\n", r"key 'tls' as a table needs exactly ca, cert, key"),
        ("p.json", "{}", r"must end in .yaml, .yml or .toml"),
        ("p.yaml", "role: broker\nsession: x\n", r"key 'role' must be server, client or dealer"),
    ],
)
def test_bad_config_is_a_clear_usage_error(capsys, tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    code, err = _twinfer(capsys, "party", "--config", str(tmp_path / name))
    assert code == 2, err
    assert "Traceback" not in err and re.search(message, err), err


def test_missing_config_file_is_named(capsys, tmp_path):
    code, err = _twinfer(capsys, "party", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml does not exist" in err


@pytest.fixture(scope="module")
def namespaces_ok():
    from twinfer.deploy.netem.kernel_shaping import check_kernel_shaping_available

    reason = check_kernel_shaping_available()
    if reason is not None:
        pytest.skip(f"parties in separate network namespaces: {reason}")


def test_standalone_parties_in_separate_namespaces_over_tls(namespaces_ok, tmp_path, onnx_files, fashion_cnn, fashion_test):
    """Server and dealer in one namespace, two clients in another, each side with its own address;
    one server and one dealer process serve both clients' sessions at once. Only configs and certs."""
    from twinfer.deploy.config.certs import make_certs
    from twinfer.deploy.launch.wiring import wait_for_address
    from twinfer.deploy.netem.kernel_shaping import KernelLink, list_namespaces

    images = fashion_test[0][:5]
    np.save(tmp_path / "x1.npy", images[:3])
    np.save(tmp_path / "x2.npy", images[3:])
    make_certs(tmp_path / "certs")
    ids = [f"ns-{i}-{secrets.token_hex(16)}" for i in (1, 2)]  # hand-chosen ids need 128 random bits
    before = set(list_namespaces())
    with KernelLink("loopback") as link:
        server_at, dealer_at = f"{link.server_ip}:17700", f"{link.server_ip}:17701"
        (tmp_path / "dealer.yaml").write_text(
            f"role: dealer\nsession: {ids[0]},{ids[1]}\nlisten: {dealer_at}\naddress_file: dealer.addr\ntls: certs\ntimeout: 60\n"
        )
        (tmp_path / "server.yaml").write_text(
            f"role: server\nsession: {ids[0]},{ids[1]}\nlisten: {server_at}\naddress_file: server.addr\ndealer: {dealer_at}\n"
            f"model: {onnx_files['fashion_cnn']}\ntls: certs\ntimeout: 60\nconnect_timeout: 60\n"
        )
        for i in (1, 2):
            (tmp_path / f"client{i}.toml").write_text(
                f'role = "client"\nsession = "{ids[i - 1]}"\nserver = "{server_at}"\ndealer = "{dealer_at}"\ninput = "x{i}.npy"\n'
                f'batch = 2\noutput = "logits{i}.npy"\ntimeout = 60\nconnect_timeout = 30\n[tls]\nca = "certs/ca.pem"\n'
                f'cert = "certs/client.pem"\nkey = "certs/client.key"\n'
            )
        party = [sys.executable, "-m", "twinfer.deploy.cli", "party", "--json", "--config"]
        procs = {}
        for role in ("dealer", "server"):
            log = open(tmp_path / f"{role}.log", "w")
            procs[role] = link.run_in(link.server_ns, [*party, str(tmp_path / f"{role}.yaml")], stdout=log, stderr=subprocess.STDOUT)
            expected = dealer_at if role == "dealer" else server_at
            assert wait_for_address(procs[role], tmp_path / f"{role}.addr", role, 120.0, tmp_path / f"{role}.log") == expected
        clients = [
            link.run_in(link.client_ns, [*party, str(tmp_path / f"client{i}.toml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (1, 2)
        ]
        encodings = []
        for client in clients:
            out, err = client.communicate(timeout=180)
            assert client.returncode == 0, err[-3000:]
            encodings.append(json.loads(out.strip().splitlines()[-1])["encoding"])
        for role in ("server", "dealer"):
            assert procs[role].wait(timeout=60) == 0, (tmp_path / f"{role}.log").read_text()[-3000:]
        server_reports = [line for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    assert set(list_namespaces()) == before  # the test's namespaces are gone
    served = [json.loads(line) for line in server_reports]
    assert sorted(r["session"] for r in served) == ids and len({r["pid"] for r in served}) == 1
    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    for i, (encoding, expected) in enumerate(zip(encodings, (reference[:3], reference[3:]))):
        assert_within_stated_error(np.load(tmp_path / f"logits{i + 1}.npy"), expected, encoding)
