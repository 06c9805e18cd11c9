"""structlog JSON logs. Every line carries the service name and, inside a
call, the request's trace id (bound by the call interceptor)."""

from __future__ import annotations

import logging
import sys

import structlog

from mariana_common.settings import ServiceSettings
from mariana_common.tracing import add_trace_ids, setup_tracing


def start_telemetry(service: str, settings: ServiceSettings) -> None:
    """Logs and traces of a service; first thing in its main, before any
    server or channel exists (the tracing instrumentation patches them)."""
    configure_logging(service, settings.log_level)
    setup_tracing(service, settings.otlp_endpoint)


def configure_logging(service: str, level: str = "info") -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
