"""The one place where domain errors become gRPC status codes, and where each
call's trace id is bound to the log context."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

from mariana_common import errors
from mariana_common.metrics import observe_call

log = structlog.get_logger()

# Exhaustive on purpose: a new error class must be given its status here.
STATUS_BY_ERROR: dict[type[errors.MarianaError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

TRACE_HEADERS = ("x-request-id", "traceparent")

# The servicer context as servicers annotate it (grpc-stubs makes it generic).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def status_for(error: errors.MarianaError) -> grpc.StatusCode:
    """The code of the error's class, or of the nearest mapped base class."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


STATUS_DETAILS = "grpc-status-details-bin"
ERROR_DOMAIN = "mariana.dev"


def status_details(code: grpc.StatusCode, message: str, reason: str) -> bytes:
    """google.rpc.Status with an ErrorInfo carrying `reason`: gRPC's rich error
    model. Envoy's transcoder puts it in the JSON error body, where the edge
    turns it into OpenAI's `error.code`."""
    detail = any_pb2.Any()
    detail.Pack(ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    return bytes(Status(code=code.value[0], message=message, details=[detail]).SerializeToString())


def reason_of(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason an upstream attached, if any."""
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == STATUS_DETAILS and isinstance(value, bytes):
            for detail in Status.FromString(value).details:
                info = ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return None


def trace_id_from(metadata: Any) -> str:
    values = dict(metadata or ())
    for name in TRACE_HEADERS:
        value = values.get(name)
        if isinstance(value, str) and value:
            return value
    return uuid.uuid4().hex


async def _abort_for(exc: BaseException, context: Context) -> None:
    if context.cancelled():
        # The caller went away first (a deadline, a closed connection); what
        # failed after that failed because of it: not an error of ours.
        log.info("caller went away", error=repr(exc))
        raise asyncio.CancelledError from exc
    if isinstance(exc, errors.MarianaError):
        code = status_for(exc)
        trailers: list[tuple[str, str | bytes]] = []
        if isinstance(exc, errors.ResourceExhausted | errors.Unavailable) and exc.retry_after_s is not None:
            trailers.append(("retry-after", str(max(1, round(exc.retry_after_s)))))
        if exc.reason:
            trailers.append((STATUS_DETAILS, status_details(code, str(exc), exc.reason)))
        log.info("call refused", code=code.name, reason=str(exc))
        await context.abort(code, str(exc), trailing_metadata=tuple(trailers))
    log.exception("call failed")
    trace_id = structlog.contextvars.get_contextvars().get("trace_id", "")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (trace id {trace_id})")


Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, errors.MarianaError):
        return status_for(exc).name
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.INTERNAL.name


def _aborted_code(context: Context) -> str:
    """The code a handler aborted with itself."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _caller_refused(context: Context, peers: frozenset[bytes]) -> bool:
    """True when the peer's certificate names none of `peers` (empty: any
    certificate of the mesh CA will do)."""
    return bool(peers) and peers.isdisjoint(context.peer_identities() or ())


async def _refuse_caller(context: Context, method: str) -> None:
    log.warning("caller refused: identity not allowed here", rpc=method, peer=context.peer())
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this workload identity may not call this service")


def _wrap_unary(behaviour: Unary, method: str, peers: frozenset[bytes]) -> Unary:
    async def wrapped(request: Any, context: Context) -> Any:
        structlog.contextvars.bind_contextvars(trace_id=trace_id_from(context.invocation_metadata()), rpc=method)
        if _caller_refused(context, peers):
            await _refuse_caller(context, method)
        started, code = time.perf_counter(), "OK"
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - turned into a status below
            code = _code_of(exc) if not context.cancelled() else "CANCELLED"
            await _abort_for(exc, context)
        finally:
            observe_call(method, code, time.perf_counter() - started)

    return wrapped


def _wrap_streaming(behaviour: Streaming, method: str, peers: frozenset[bytes]) -> Streaming:
    async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
        structlog.contextvars.bind_contextvars(trace_id=trace_id_from(context.invocation_metadata()), rpc=method)
        if _caller_refused(context, peers):
            await _refuse_caller(context, method)
        started, code = time.perf_counter(), "OK"
        try:
            async for item in behaviour(request, context):
                yield item
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - turned into a status below
            code = _code_of(exc) if not context.cancelled() else "CANCELLED"
            await _abort_for(exc, context)
        finally:
            observe_call(method, code, time.perf_counter() - started)

    return wrapped


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps domain errors to status codes; anything else becomes INTERNAL with
    the trace id, logged with its traceback. Nothing reaches a client as UNKNOWN.
    Each method's handler is wrapped once and remembered, not on every call.

    `peers`: the SPIFFE ids that may call this server at all (Envoy, and the
    operator's probes); any other workload of the mesh gets PERMISSION_DENIED,
    so nothing reaches a service around Envoy's RBAC. Empty: any mesh identity."""

    def __init__(self, peers: frozenset[str] = frozenset()) -> None:
        self._wrapped: dict[str, Any] = {}
        self._peers = frozenset(peer.encode() for peer in peers)

    def wrap(self, handler: Any, method: str) -> Any:
        """`handler` with errors mapped, callers checked and calls measured."""
        if handler.unary_unary and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self._peers),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_streaming(handler.unary_stream, method, self._peers),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrapped[method] = self.wrap(handler, method)
        return wrapped


_ERROR_BY_STATUS = {code: error for error, code in STATUS_BY_ERROR.items()}


def error_from_rpc(error: grpc.aio.AioRpcError) -> errors.MarianaError:
    """The domain error for a status an upstream returned, so a caller's own
    interceptor passes it on with the same code (and retry hint). Unmapped
    codes (INTERNAL, UNKNOWN, ...) mean the upstream is broken: UNAVAILABLE to
    our caller."""
    code, message = error.code(), error.details() or ""
    error_type = _ERROR_BY_STATUS.get(code)
    if error_type is None:
        return errors.Unavailable(f"upstream failed: {code.name}: {message}")
    if error_type is errors.ResourceExhausted or error_type is errors.Unavailable:
        trailers: Any = error.trailing_metadata() or ()
        hint = dict(trailers).get("retry-after")
        retry_after = float(hint) if isinstance(hint, str) and hint.isdigit() else None
        if error_type is errors.ResourceExhausted:
            return errors.ResourceExhausted(message, retry_after, reason_of(error))
        return errors.Unavailable(message, retry_after)
    passed_on = error_type(message)
    passed_on.reason = reason_of(error)
    return passed_on
