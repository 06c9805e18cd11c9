"""Client channels. Services reach each other only through Envoy's mesh
listeners, over mTLS with their own certificate.

A mesh target may list several Envoys (`ipv4:127.0.0.1:7201,127.0.0.1:7301`):
calls are spread round robin over those that are up, so no one Envoy is a
single point of failure. When the service's certificate is rotated, the next
call opens a new channel with the new files; calls already running on the old
one finish there (it is closed after `OLD_CHANNEL_GRACE_S`).

Where the targets are the local mesh's Envoys (`mesh_unary_http1`), unary
calls go as HTTP/1.1 requests that the mesh listener bridges to gRPC
(`http1_bridge.py`): the same call upstream, at half the caller's CPU."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import structlog

from mariana_common.http1_bridge import BridgedStream, BridgedUnary, Http1Pool
from mariana_common.settings import ServiceSettings
from mariana_common.tls import CertificateFiles, client_ssl_context, credentials_of

log = structlog.get_logger()

_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.lb_policy_name", "round_robin"),
)
# Envoy's certificate names localhost; a multi-address target has no host name of its own.
_TLS_OPTIONS = (*_OPTIONS, ("grpc.ssl_target_name_override", "localhost"))
# Long enough for a whole generation to finish on the old channel.
OLD_CHANNEL_GRACE_S = 600.0


class _Method:
    """A stub's multicallable that always calls through the current channel."""

    def __init__(self, owner: MeshChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._kwargs = kwargs
        self._generation = -1
        self._bound: Any = None

    def _current(self) -> Any:
        channel, generation = self._owner.current()
        if generation != self._generation:
            self._bound = getattr(channel, self._kind)(*self._args, **self._kwargs)
            self._generation = generation
        return self._bound

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)


class MeshChannel:
    """Quacks like the parts of grpc.aio.Channel that generated stubs use."""

    def __init__(self, target: str, files: CertificateFiles, unary_over_http1: bool = False) -> None:
        self._target = target
        self._files = files
        self._generation = 0
        self._channel = self._open()
        self._retired: set[asyncio.Task[None]] = set()
        self._bridge: Http1Pool | None = None
        if unary_over_http1:
            self._ssl_context = client_ssl_context(files.pair)
            self._bridge = Http1Pool(target, lambda: self._ssl_context)

    def _open(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self._target, credentials_of(self._files.pair), options=_TLS_OPTIONS)

    def current(self) -> tuple[grpc.aio.Channel, int]:
        if self._files.refresh():
            old, self._channel = self._channel, self._open()
            self._generation += 1
            log.info("mesh channel reopened with the rotated certificate", target=self._target)
            if self._bridge is not None:
                self._ssl_context = client_ssl_context(self._files.pair)
                self._bridge.drop_idle()
            task = asyncio.get_running_loop().create_task(old.close(OLD_CHANNEL_GRACE_S))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return self._channel, self._generation

    def _bridged(self) -> Http1Pool:
        self.current()  # takes a rotated certificate
        assert self._bridge is not None
        return self._bridge

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        if self._bridge is not None:
            return BridgedUnary(self._bridged, args[0], kwargs["request_serializer"], kwargs["response_deserializer"])
        return _Method(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        if self._bridge is not None:
            return BridgedStream(self._bridged, args[0], kwargs["request_serializer"], kwargs["response_deserializer"])
        return _Method(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Method(self, "stream_stream", args, kwargs)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        for task in list(self._retired):
            task.cancel()
        await self._channel.close(grace)
        if self._bridge is not None:
            await self._bridge.close()


def mesh_channel(target: str, settings: ServiceSettings) -> Any:
    """One long-lived channel per upstream; never one per request. Typed Any:
    stubs take it as a grpc.aio.Channel. Without tls (behind a sidecar), a
    plaintext channel: the sidecar does mTLS."""
    if not settings.tls:
        return grpc.aio.insecure_channel(target, options=_OPTIONS)
    return MeshChannel(target, CertificateFiles(*settings.tls_files()), settings.mesh_unary_http1)
