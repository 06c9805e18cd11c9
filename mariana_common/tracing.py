"""OpenTelemetry tracing for a service: spans for every gRPC call served and
made (the grpc instrumentation), W3C `traceparent` propagation, OTLP export to
`otlp_endpoint`. With no endpoint nothing is installed: no interceptors, no
exporter, the API's no-op tracer — off costs nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_enabled = False


def tracing_enabled() -> bool:
    return _enabled


def setup_tracing(service: str, otlp_endpoint: str) -> None:
    if not otlp_endpoint:
        return
    # Imported only when on: the SDK and the instrumentation are not loaded otherwise.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    global _enabled
    _enabled = True
    GrpcAioInstrumentorServer().instrument()  # type: ignore[no-untyped-call]
    GrpcAioInstrumentorClient().instrument()  # type: ignore[no-untyped-call]


def current_traceparent() -> str:
    """The current span as a W3C traceparent ("" when not tracing)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def span_context_of(traceparent: str) -> trace.SpanContext | None:
    """The span a traceparent names (for links across the usage stream)."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def annotate(attributes: Mapping[str, str | int | bool]) -> None:
    """Attributes on the current span (a no-op when not tracing)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(dict(attributes))


def add_trace_ids(_: object, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current span's trace and span ids on the line."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def links_to(traceparents: list[str]) -> list[trace.Link]:
    """Links to the spans the traceparents name (none when not tracing)."""
    if not _enabled:
        return []
    contexts = [span_context_of(t) for t in traceparents]
    return [trace.Link(c) for c in contexts if c is not None]


def internal_span(name: str, attributes: Mapping[str, str | int | bool]) -> AbstractContextManager[object]:
    """A span for work done in process (the router's moderation), a child of
    the current one; nothing at all when not tracing."""
    if not _enabled:
        return contextlib.nullcontext()
    tracer = trace.get_tracer("mariana")
    return tracer.start_as_current_span(name, kind=trace.SpanKind.INTERNAL, attributes=dict(attributes))


def client_span(name: str) -> AbstractContextManager[object]:
    """A client span for a gRPC call not made by grpc.aio (the HTTP/1.1
    bridge's), named as the grpc instrumentation names its own; nothing at
    all when not tracing."""
    if not _enabled:
        return contextlib.nullcontext()
    tracer = trace.get_tracer("mariana")
    service, _, method = name.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    return tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)


def server_span(
    name: str, headers: Mapping[str, str], attributes: Mapping[str, str | int | bool]
) -> AbstractContextManager[object]:
    """A server span for a call that is not gRPC (auth's HTTP check),
    continuing the caller's `traceparent`; nothing at all when not tracing."""
    if not _enabled:
        return contextlib.nullcontext()
    tracer = trace.get_tracer("mariana")
    parent = _PROPAGATOR.extract(dict(headers))
    return tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=dict(attributes))
