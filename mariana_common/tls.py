"""mTLS credentials. Every service requires a client certificate signed by the
mesh CA, and presents its own certificate when it calls Envoy."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
