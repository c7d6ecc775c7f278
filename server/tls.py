"""TLS of the gRPC port: the PEM files are read here, once, into grpc's own credentials.

Server: `server_credentials(config)` (None = a plaintext port). With `config.tls_client_ca` the server asks every
client for a certificate and refuses the handshake unless that CA signed it (mutual TLS). Client:
`ClientTLS(ca=..., cert=..., key=...).credentials()`; `ClientTLS()` trusts the system's root certificates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from adalora.config import ConfigError

if TYPE_CHECKING:
    from adalora.server.config import ServerConfig

CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8 'BEGIN PRIVATE KEY', PKCS#1 'BEGIN RSA PRIVATE KEY', SEC1 'BEGIN EC ...'


def read_pem(path: str, flag: str, marker: bytes = CERTIFICATE) -> bytes:
    """The bytes of a PEM file given with `flag`; ConfigError naming the flag when it cannot be read or holds no
    `marker` block (a certificate unless told otherwise)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e
    if marker not in data:
        kind = "certificate" if marker == CERTIFICATE else "private key"
        raise ConfigError(f"{flag} {path}: no PEM {kind} in it (expected a '{marker.decode()}' block)")
    return data


def check_readable(path: object, flag: str) -> None:
    """ConfigError naming `flag` unless `path` is a readable file (contents are read by read_pem)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{flag} must be the path of a PEM file, got {path!r}")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{flag} {path}: no such file" if not file.exists() else f"{flag} {path}: not a file")
    try:
        with file.open("rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """Credentials of the listening port from a validated ServerConfig; None when it has no tls_cert."""
    if config.tls_cert is None:
        return None
    pair = (read_pem(config.tls_key, "tls_key (--tls-key)", PRIVATE_KEY),
            read_pem(config.tls_cert, "tls_cert (--tls-cert)"))
    client_ca = None if config.tls_client_ca is None else read_pem(config.tls_client_ca,
                                                                    "tls_client_ca (--tls-client-ca)")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def describe(config: ServerConfig) -> str:
    """How the gRPC port of a ServerConfig talks, for the log."""
    if config.tls_cert is None:
        return "plaintext, no TLS"
    if config.tls_client_ca is None:
        return "TLS"
    return "mutual TLS: client certificates signed by --tls-client-ca required"


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches a TLS port: `ca` = PEM of the CA(s) to trust (None: the system's roots); `cert` and
    `key` = this client's certificate and private key, for a server that asks for one (mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its private key: give --tls-cert and --tls-key together")

    def credentials(self) -> grpc.ChannelCredentials:
        """grpc's channel credentials; reads the files now (ConfigError naming the flag when one is unusable)."""
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else read_pem(self.ca, "--tls-ca"),
            private_key=None if self.key is None else read_pem(self.key, "--tls-key", PRIVATE_KEY),
            certificate_chain=None if self.cert is None else read_pem(self.cert, "--tls-cert"))
