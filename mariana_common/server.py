"""Server bootstrap: `create_server` builds a grpc.aio server with mTLS,
health, reflection and the error interceptor (tests call it with port 0);
`serve` runs it until SIGTERM/SIGINT, then drains."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, cast

import grpc
import structlog
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mariana_common.gc_pacing import GcPacer
from mariana_common.grpc_http1_server import GrpcHttp1Server, Handlers
from mariana_common.interceptors import Context, ErrorStatusInterceptor
from mariana_common.metrics import serve_metrics
from mariana_common.settings import ServiceSettings
from mariana_common.tls import ServerSslContext, server_credentials, uri_names

__all__ = ["Context", "Registrar", "Server", "create_server", "run", "serve"]

log = structlog.get_logger()
# Allocations (minus frees) that start a young-generation collection between
# two paced ones (a burst); Python's default is 700.
GC_YOUNG_THRESHOLD = 10_000

Registrar = Callable[[grpc.aio.Server], None]


class Http1Listener:
    """The same methods over HTTP/1.1 (`grpc_http1_server`), where it listens."""

    def __init__(self, server: GrpcHttp1Server, settings: ServiceSettings) -> None:
        self.server = server
        self._host = settings.host
        self.port = settings.http1_port or 0
        self._tls = ServerSslContext(*settings.tls_files()) if settings.tls else None

    async def start(self) -> None:
        self.port = await self.server.start(self._host, self.port, self._tls)


class Server:
    """A started-or-not grpc.aio server and the port it is bound to; and,
    when the settings ask, the same methods over HTTP/1.1 (`http1`)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health: HealthServicer,
        service_names: Iterable[str],
        http1: Http1Listener | None = None,
    ) -> None:
        self.grpc = server
        self.port = port
        self.health = health
        self.service_names = tuple(service_names)
        self.http1 = http1

    async def start(self) -> None:
        await self.grpc.start()
        if self.http1 is not None:
            await self.http1.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)
        if self.http1 is not None:
            self.http1.server.serving = serving

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        stopping = [self.grpc.stop(grace)]
        if self.http1 is not None:
            stopping.append(self.http1.server.stop(grace))
        await asyncio.gather(*stopping)


def allowed_peers(settings: ServiceSettings) -> frozenset[str]:
    """The SPIFFE ids that may call this service; empty: anyone (without TLS a
    sidecar authenticates callers: Istio's AuthorizationPolicy)."""
    peers = frozenset(settings.tls_peers) if settings.tls else frozenset()
    if peers:  # a service may ask itself (its container's health check)
        peers |= uri_names(settings.tls_files()[0])
    return peers


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """gRPC server arguments: past `max_pending_calls` waiting to be taken, gRPC
    cancels some calls (all past twice that); see DEFAULT_MAX_PENDING_CALLS."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
    ]


def create_server(
    settings: ServiceSettings,
    register: Registrar,
    service_names: Iterable[str],
) -> Server:
    """Builds the server with mTLS (or plaintext behind a sidecar); `register` adds the service's servicers to it."""
    interceptor = ErrorStatusInterceptor(allowed_peers(settings))
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(settings))
    register(server)
    http1 = None
    if settings.http1_port is not None:
        handlers = Handlers()
        register(cast(grpc.aio.Server, handlers))  # the same servicers' methods, collected
        http1 = Http1Listener(GrpcHttp1Server(handlers, interceptor), settings)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(service_names)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls:
        port = server.add_secure_port(address, server_credentials(*settings.tls_files()))
    else:
        port = server.add_insecure_port(address)
    return Server(server, port, health_servicer, names, http1)


async def serve(
    server: Server, settings: ServiceSettings, before_stop: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Serves until SIGTERM or SIGINT; then reports NOT_SERVING, runs
    `before_stop` (a service's own drain), stops accepting calls and gives
    in-flight ones `shutdown_grace_s` to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    serve_metrics(settings.metrics_port, settings.host)
    if settings.port_file is not None:
        settings.port_file.write_text(str(server.port))
    log.info(
        "serving",
        address=f"{settings.host}:{server.port}",
        http1=f"{settings.host}:{server.http1.port}" if server.http1 else None,
    )
    pacer = quiet_garbage_collector()
    await stop.wait()
    pacer.cancel()
    log.info("draining", grace_s=settings.shutdown_grace_s)
    await server.set_serving(False)
    if before_stop is not None:
        await before_stop()
    await server.stop(settings.shutdown_grace_s)
    log.info("stopped")


def quiet_garbage_collector() -> asyncio.Task[None]:
    """What start-up made (modules, models, settings) lives as long as the
    process: moved out of the collector's reach, so a full collection does not
    walk it again and again. Then collections are paced by the clock, in small
    pieces (`gc_pacing`), with the allocation threshold as the backstop."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    return asyncio.get_running_loop().create_task(GcPacer().run())


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs a service's async main on uvloop."""
    uvloop.run(main())
