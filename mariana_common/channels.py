"""Client channels. Services reach each other only through Envoy's mesh
listeners, over mTLS with their own certificate."""

from __future__ import annotations

import grpc

from mariana_common.settings import ServiceSettings
from mariana_common.tls import channel_credentials

_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


def mesh_channel(target: str, settings: ServiceSettings) -> grpc.aio.Channel:
    """One long-lived channel per upstream; never one per request."""
    credentials = channel_credentials(settings.tls_cert, settings.tls_key, settings.tls_ca)
    return grpc.aio.secure_channel(target, credentials, options=_OPTIONS)
