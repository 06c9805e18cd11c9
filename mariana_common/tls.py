"""mTLS credentials that follow certificate rotation. Every service requires a
client certificate signed by the mesh CA, and presents its own certificate
when it calls Envoy. When the files change (the launcher or a cert manager
rotates them in place), new handshakes use the new ones; no restart.

A rotation replaces the key and the certificate one after the other, so a
reader can catch a new key beside an old certificate: such a pair is not taken
(the key must match the certificate) and is looked at again next time."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = structlog.get_logger()

LOOK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class KeyPair:
    key: bytes
    cert: bytes
    ca: bytes
    serial: int


def read_pair(cert: Path, key: Path, ca: Path) -> KeyPair:
    """The files as one consistent pair; ValueError if the key does not belong
    to the certificate (a rotation caught halfway)."""
    cert_pem, key_pem, ca_pem = cert.read_bytes(), key.read_bytes(), ca.read_bytes()
    certificate = x509.load_pem_x509_certificate(cert_pem)
    private_key = serialization.load_pem_private_key(key_pem, password=None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*raw) != private_key.public_key().public_bytes(*raw):
        raise ValueError(f"{key} does not match {cert}")
    return KeyPair(key_pem, cert_pem, ca_pem, certificate.serial_number)


class CertificateFiles:
    """A service's certificate, key and CA, re-read when any of them changes
    (looked at no more than once per `interval_s`)."""

    def __init__(self, cert: Path, key: Path, ca: Path, interval_s: float = LOOK_INTERVAL_S) -> None:
        self._paths = (cert, key, ca)
        self._interval_s = interval_s
        self.pair = read_pair(cert, key, ca)
        self._stamp = self._mtimes()
        self._next_look = time.monotonic() + interval_s

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(path.stat().st_mtime_ns for path in self._paths)

    def refresh(self) -> bool:
        """True when a new, consistent pair was read just now."""
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + self._interval_s
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return False
            pair = read_pair(*self._paths)
        except (OSError, ValueError) as error:
            log.warning("certificate not reloaded yet; keeping the current one", error=str(error))
            return False
        self._stamp, self.pair = stamp, pair
        log.info("certificate reloaded", cert=str(self._paths[0]), serial=f"{pair.serial:x}")
        return True


def uri_names(cert: Path) -> frozenset[str]:
    """The URI names (SPIFFE ids) a certificate carries."""
    return _uri_names_of(x509.load_pem_x509_certificate(cert.read_bytes()))


def uri_names_of_der(der: bytes) -> frozenset[str]:
    return _uri_names_of(x509.load_der_x509_certificate(der))


def _uri_names_of(certificate: x509.Certificate) -> frozenset[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(names.get_values_for_type(x509.UniformResourceIdentifier))


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Client certificates required; each new handshake uses the current files."""
    files = CertificateFiles(cert, key, ca)

    def configuration(pair: KeyPair) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pair.key, pair.cert)], root_certificates=pair.ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        return configuration(files.pair) if files.refresh() else None

    # gRPC asks `fetch` at each new handshake; None keeps the current files.
    return grpc.dynamic_ssl_server_credentials(
        configuration(files.pair),
        fetch,  # type: ignore[arg-type]
        require_client_authentication=True,
    )


def _load_chain(context: ssl.SSLContext, pair: KeyPair) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # OpenSSL reads a chain from files only
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(pair.cert)
        key.touch(0o600)
        key.write_bytes(pair.key)
        context.load_cert_chain(cert, key)


def client_ssl_context(pair: KeyPair, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """An ssl.SSLContext that presents `pair` and trusts only the mesh CA (an
    asyncio client's, where grpc.aio takes `credentials_of`)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pair.ca.decode())
    _load_chain(context, pair)
    context.set_alpn_protocols(list(alpn))
    return context


class ServerSslContext:
    """An ssl.SSLContext for an asyncio server, client certificates required,
    that takes rotated files for new handshakes (`refresh`, called
    periodically: a pair caught halfway through a rotation is not taken)."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self._files = CertificateFiles(cert, key, ca)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self._load(self._files.pair)

    def _load(self, pair: KeyPair) -> None:
        self.context.load_verify_locations(cadata=pair.ca.decode())
        _load_chain(self.context, pair)

    def refresh(self) -> bool:
        if not self._files.refresh():
            return False
        self._load(self._files.pair)
        return True

    async def follow_rotation(self) -> None:
        """Takes rotated files as they come, for as long as the server runs."""
        while True:
            await asyncio.sleep(LOOK_INTERVAL_S)
            self.refresh()


def channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    """Fixed credentials from the files as they are now (see channels.py for
    channels that follow rotation)."""
    return credentials_of(read_pair(cert, key, ca))


def credentials_of(pair: KeyPair) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pair.ca, private_key=pair.key, certificate_chain=pair.cert)
