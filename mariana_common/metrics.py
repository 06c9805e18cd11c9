"""Prometheus metrics every service has — calls served per RPC method and
status code, and their latency — and the endpoint that exposes them with the
service's own. Labels are bounded: method names and status codes only, never
request ids, tenants' keys or text."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_CALLS = Counter("mariana_rpc_calls_total", "gRPC calls served, by method and status code.", ["method", "code"])
RPC_LATENCY = Histogram(
    "mariana_rpc_duration_seconds",
    "Time to serve a gRPC call (whole stream for streaming methods), by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """/metrics on host:`port` (the service's own address) from a background
    thread (0: off)."""
    if port:
        start_http_server(port, addr=host)


def observe_call(method: str, code: str, seconds: float) -> None:
    RPC_CALLS.labels(method, code).inc()
    RPC_LATENCY.labels(method).observe(seconds)
