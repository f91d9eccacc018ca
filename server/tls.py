"""The server's TLS files, read and checked once at start-up.

gRPC itself only says "handshake failed" to the next client when a certificate has expired
or belongs to another key; reading the files with ``cryptography`` first turns each such
mistake into one line that names the file, before the server listens.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from chargpt.credentials import CredentialError, read_credential


@dataclass(frozen=True)
class ServerTLS:
    """PEM bytes gRPC needs; ``client_ca`` set means mutual TLS (client certificates
    required and verified against it)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    not_valid_after: dt.datetime  # of the server's own certificate

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def describe(self) -> str:
        mode = "mutual TLS" if self.client_ca is not None else "TLS"
        return f"{mode}, certificate valid until {self.not_valid_after:%Y-%m-%d %H:%M} UTC"


def load_server_tls(
    cert_path: str, key_path: str, client_ca_path: str | None = None, now: dt.datetime | None = None
) -> ServerTLS:
    """Read and check the certificate chain, its key and the optional client CA; a
    CredentialError names the file at fault."""
    now = now or dt.datetime.now(dt.UTC)
    chain_pem = read_credential(cert_path, "TLS certificate")
    chain = _certificates(chain_pem, cert_path, "TLS certificate", now)
    key_pem = read_credential(key_path, "TLS key")
    key = _private_key(key_pem, key_path)
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise CredentialError(
            f"TLS key {key_path} does not belong to the certificate in {cert_path}"
        )
    client_ca = None
    if client_ca_path is not None:
        client_ca = read_credential(client_ca_path, "TLS client CA")
        _certificates(client_ca, client_ca_path, "TLS client CA", now)
    return ServerTLS(chain_pem, key_pem, client_ca, chain[0].not_valid_after_utc)


def _certificates(pem: bytes, path: str, what: str, now: dt.datetime) -> list[x509.Certificate]:
    """Every certificate in a PEM file, each valid at ``now``."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CredentialError(f"{what} {path} holds no PEM certificate") from None
    for certificate in certificates:
        subject = certificate.subject.rfc4514_string() or "(no subject)"
        if now > certificate.not_valid_after_utc:
            raise CredentialError(
                f"{what} {path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                f"({subject})"
            )
        if now < certificate.not_valid_before_utc:
            raise CredentialError(
                f"{what} {path} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC ({subject})"
            )
    return certificates


def _private_key(pem: bytes, path: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's way of saying "this key needs a password"
        raise CredentialError(
            f"TLS key {path} is encrypted; gRPC needs it unencrypted (protect the file instead)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"TLS key {path} holds no PEM private key") from None


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
