"""TLS files in process: what the server checks before it listens, what the clients read,
and the hints the command-line clients give for gRPC's connection failures."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from chargpt.credentials import CredentialError
from client.api import ClientTLS
from client.cli import Connection, connection_hint
from server.tls import load_server_tls
from tests.certificates import CertificateAuthority

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def test_a_good_certificate_key_and_client_ca(ca: CertificateAuthority) -> None:
    server = ca.issue("good server")
    tls = load_server_tls(str(server.cert), str(server.key))
    assert tls.client_ca is None and tls.describe().startswith("TLS, certificate valid until")
    mutual = load_server_tls(str(server.cert), str(server.key), str(ca.cert))
    assert mutual.client_ca == ca.cert.read_bytes()
    assert mutual.describe().startswith("mutual TLS, certificate valid until")


def test_a_certificate_outside_its_validity_period(ca: CertificateAuthority) -> None:
    server = ca.issue("short-lived server", not_valid_after=NOW + dt.timedelta(days=1))
    later = NOW + dt.timedelta(days=2)
    with pytest.raises(CredentialError, match=f"TLS certificate {server.cert} expired on"):
        load_server_tls(str(server.cert), str(server.key), now=later)
    earlier = NOW - dt.timedelta(days=3)  # issued two days ago
    with pytest.raises(CredentialError, match=f"TLS certificate {server.cert} is not valid before"):
        load_server_tls(str(server.cert), str(server.key), now=earlier)
    # The CA itself expires in 30 days; a certificate it issued for 60 outlives it.
    long_lived = ca.issue("long-lived server", not_valid_after=NOW + dt.timedelta(days=60))
    with pytest.raises(CredentialError, match=f"TLS client CA {ca.cert} expired on"):
        load_server_tls(
            str(long_lived.cert), str(long_lived.key), str(ca.cert), now=NOW + dt.timedelta(days=45)
        )


def test_keys_that_cannot_serve(ca: CertificateAuthority, tmp_path: Path) -> None:
    server, other = ca.issue("server a"), ca.issue("server b")
    with pytest.raises(
        CredentialError,
        match=f"TLS key {other.key} does not belong to the certificate in {server.cert}",
    ):
        load_server_tls(str(server.cert), str(other.key))
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )  # fmt: skip
    with pytest.raises(CredentialError, match=f"TLS key {encrypted} is encrypted"):
        load_server_tls(str(server.cert), str(encrypted))
    with pytest.raises(CredentialError, match=f"TLS key {server.cert} holds no PEM private key"):
        load_server_tls(str(server.cert), str(server.cert))
    with pytest.raises(
        CredentialError, match=f"TLS certificate {server.key} holds no PEM certificate"
    ):
        load_server_tls(str(server.key), str(server.key))


def test_the_clients_read_their_tls_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    client = ca.issue("a client", client=True)
    tls = ClientTLS.from_files(str(ca.cert), str(client.cert), str(client.key), "server")
    assert (tls.ca, tls.cert, tls.key) == (
        ca.cert.read_bytes(), client.cert.read_bytes(), client.key.read_bytes(),
    )  # fmt: skip
    assert ClientTLS.from_files().ca is None  # the system's CAs
    with pytest.raises(CredentialError, match="a client certificate needs its key"):
        ClientTLS.from_files(str(ca.cert), str(client.cert))
    with pytest.raises(CredentialError, match=f"cannot read TLS CA {tmp_path / 'ca.crt'}"):
        ClientTLS.from_files(str(tmp_path / "ca.crt"))


# gRPC's own descriptions of failed connections, as grpcio 1.85 words them.
FAILURES = {
    "wrong CA": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK",
    "wrong name": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.",
    "TLS to plain": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK",
    "closed": "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed",
    "refused": "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
}  # fmt: skip


def test_connection_failures_come_with_what_to_fix() -> None:
    plain = Connection("127.0.0.1:1")
    tls = Connection("127.0.0.1:1", ClientTLS())
    mutual = Connection("127.0.0.1:1", ClientTLS(cert=b"cert", key=b"key"))
    assert "give --tls-ca with the CA that signed it" in str(
        connection_hint(FAILURES["wrong CA"], tls)
    )
    assert "--tls-server-name NAME" in str(connection_hint(FAILURES["wrong name"], tls))
    assert "does not speak TLS" in str(connection_hint(FAILURES["TLS to plain"], tls))
    assert "if it serves TLS, give --tls-ca" in str(connection_hint(FAILURES["closed"], plain))
    assert "give --tls-cert and --tls-key" in str(connection_hint(FAILURES["closed"], tls))
    assert "may not accept this client certificate" in str(
        connection_hint(FAILURES["closed"], mutual)
    )
    assert connection_hint(FAILURES["refused"], plain) is None  # nothing listens: nothing to add
