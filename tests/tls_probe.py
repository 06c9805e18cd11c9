"""What certificate a TLS server presents now (tests of rotation)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509


def served_serial(port: int, cert: Path, key: Path, ca: Path) -> int:
    """The serial of the certificate the server on 127.0.0.1:`port` presents
    to a client holding `cert` (Envoy's mesh listener or a service: h2)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), 5), server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_in_file(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
