"""Mutual TLS: `twinfer certs`, a session over TLS on every link, and peers that are refused."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import torch

from twinfer.parties.errors import AuthError
from twinfer.parties.runtime.host import ClientHost, DealerHost, ServerHost
from twinfer.parties.metrics import Metrics
from twinfer.parties.runtime.session import PartyConfig, PartyListener
from twinfer.parties.wire.tls import TlsIdentity
from twinfer.parties.wire.transport import GrpcTransport, TransportOptions, open_channel
from twinfer.parties.runtime.session_spec import SessionSpec
from tests.helpers.stated import assert_within_stated_error

pytestmark = pytest.mark.timeout(120)

FAST = TransportOptions(recv_timeout_s=20.0, connect_timeout_s=3.0)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "certs", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    from twinfer.deploy.config.certs import make_certs

    return make_certs(tmp_path_factory.mktemp("other-ca"), ca_name="another CA")


def test_certs_command_writes_one_cert_per_role_and_never_overwrites_a_ca(certs):
    from cryptography import x509

    for role in ("server", "client", "dealer"):
        cert = x509.load_pem_x509_certificate((certs / f"{role}.pem").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=twinfer-{role}"
        assert (certs / f"{role}.key").stat().st_mode & 0o077 == 0
    proc = subprocess.run(
        [sys.executable, "-m", "twinfer.deploy.cli", "certs", "--out", str(certs)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "already holds a CA" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_tls_file_is_named(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match=r"certificate file .*server.pem does not exist"):
        TlsIdentity.from_dir(tmp_path, "server")


def _identity(directory, role: str) -> TlsIdentity:
    return TlsIdentity.from_dir(directory, role)


class _NoCertificate(TlsIdentity):
    """Trusts the CA but presents no certificate of its own."""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)


def _hosts(certs, model):
    graph, weights = model
    dealer = DealerHost(PartyConfig(spec=SessionSpec(options=FAST), role="dealer", session_id="-", tls=_identity(certs, "dealer")))
    server = ServerHost(
        graph, weights,
        PartyConfig(spec=SessionSpec(options=FAST), role="server", session_id="-", dealer_address=dealer.address, tls=_identity(certs, "server")),
    )  # fmt: skip
    client = ClientHost(
        PartyConfig(spec=SessionSpec(options=FAST), role="client", session_id="-", dealer_address=dealer.address, server_address=server.address, tls=_identity(certs, "client"))
    )  # fmt: skip
    return dealer, server, client


@pytest.fixture(scope="module")
def model(onnx_files):
    from twinfer.parties.runtime.model_file import load_model

    return load_model(onnx_files["fashion_cnn"])


def _intruder(server_address: str, session_id: str, tls: TlsIdentity) -> GrpcTransport:
    transport = GrpcTransport(session_id=session_id, role="client", peer_role="server", options=FAST, metrics=Metrics())
    transport.dial(server_address, tls=tls)
    return transport


def test_session_over_tls_after_an_intruder_with_the_wrong_role_was_refused(certs, model, fashion_cnn, fashion_test):
    images = fashion_test[0][:2]
    dealer, server, client = _hosts(certs, model)
    try:
        dealer.open("s1")
        server.open("s1")
        # A valid certificate of the CA, but the dealer's: it may not act as the client.
        intruder = _intruder(server.address, "s1", _identity(certs, "dealer"))
        with pytest.raises(AuthError, match=r"certificate names role 'dealer', expected client"):
            intruder.recv("graph")
        assert intruder.metrics.total().bytes_received == 0  # not the graph, let alone a share
        intruder.close()
        # The session it tried to take is untouched: the real client runs it.
        client.open("s1", images, 2)
        report = client.wait(60)["s1"]
        assert not isinstance(report, Exception), report
        assert server.wait(30)["s1"].logits is None and not isinstance(dealer.wait(30)["s1"], Exception)
    finally:
        for host in (client, server, dealer):
            host.close()
    with torch.no_grad():
        reference = fashion_cnn(torch.from_numpy(images)).numpy()
    assert_within_stated_error(report.logits, reference, report.encoding)


@pytest.mark.parametrize(
    "who, message",
    [
        ("no-cert", "closed the connection during the TLS handshake"),
        ("other-ca", "not signed by this party's CA"),
    ],
)
def test_peer_without_a_certificate_of_the_ca_is_refused(certs, other_ca, who, message):
    listener = PartyListener("server", "127.0.0.1:0", FAST, _identity(certs, "server"))
    waiting = GrpcTransport(session_id="s", role="server", peer_role="client", options=FAST, metrics=Metrics())
    listener.peers.expect(waiting)
    tls = _NoCertificate(**vars(_identity(certs, "client"))) if who == "no-cert" else _identity(other_ca, "client")
    try:
        with pytest.raises(AuthError, match=message) as caught:
            _intruder(listener.address, "s", tls)
        assert "Traceback" not in str(caught.value)
        with pytest.raises(Exception, match="did not connect"):
            waiting.wait_accepted()  # the server never got a stream, so it never sends a share
        assert waiting.metrics.total().bytes_sent == 0
    finally:
        listener.close(grace=0)


def test_listener_with_another_role_is_refused_by_the_dialer(certs):
    """The client dials what should be the server, but the certificate there is the dealer's."""
    listener = PartyListener("dealer", "127.0.0.1:0", FAST, _identity(certs, "dealer"))
    try:
        with pytest.raises(AuthError, match="certificate names another role"):
            open_channel(listener.address, role="client", peer_role="server", options=FAST, tls=_identity(certs, "client"))
    finally:
        listener.close(grace=0)


@pytest.mark.parametrize("protocol", ["crypten", "fss-compact"])
def test_dealer_refuses_a_role_that_is_not_the_callers(certs, protocol):
    from twinfer.parties.dealer.client import DealerClient
    from twinfer.protocols.backends.crypten.ttp import TtpClient

    listener = PartyListener("dealer", "127.0.0.1:0", FAST, _identity(certs, "dealer"))
    listener.dealer.open_session("s")
    try:
        # The client asks for the server's seed (with which it could strip the server's tuples).
        with pytest.raises(AuthError, match=r"names role 'client', expected server"):
            DealerClient(
                listener.address, session_id="s", role="server", options=FAST, metrics=Metrics(), tls=_identity(certs, "client"),
                protocol=protocol,
            )  # fmt: skip
        assert listener.dealer.stats("s")["bytes_sent"] == 0
        client = DealerClient(
            listener.address, session_id="s", role="client", options=FAST, metrics=Metrics(), tls=_identity(certs, "client"), protocol=protocol
        )
        # ... and the client may not ask for the products' and squares' parts only the server draws.
        if protocol == "crypten":
            with pytest.raises(AuthError, match=r"the client may not ask for 'square' \(only \['server'\]\)"):
                TtpClient(client).ttp_request("square", None, torch.Size([2]))
        else:
            with pytest.raises(AuthError, match=r"the client may not ask for 'fss.square' \(only \['server'\]\)"):
                client.request("fss.square", '{"shape": [2]}', client.next_index())
        client.close()
        seed = 8 + (16 if protocol != "crypten" else 0)  # the client's own seed only (and its AES key on fss)
        assert listener.dealer.stats("s")["bytes_sent"] == seed
    finally:
        listener.close(grace=0)


def test_config_role_and_certificate_role_must_agree(certs):
    with pytest.raises(ValueError, match="the server was given the client's TLS certificate"):
        PartyConfig(role="server", session_id="s", tls=_identity(certs, "client"))


def test_identity_never_prints_its_key(certs):
    identity = _identity(certs, "server")
    assert "PRIVATE" not in repr(identity) and "PRIVATE" not in str(identity)


@pytest.mark.parametrize("listener_tls, dialer_tls, message", [(True, False, "probably requires mutual TLS"), (False, True, "does not speak TLS")])
def test_tls_on_one_end_only_is_named(certs, listener_tls, dialer_tls, message):
    listener = PartyListener("server", "127.0.0.1:0", FAST, _identity(certs, "server") if listener_tls else None)
    try:
        with pytest.raises(AuthError, match=message):
            open_channel(listener.address, role="client", peer_role="server", options=FAST, tls=_identity(certs, "client") if dialer_tls else None)
    finally:
        listener.close(grace=0)
