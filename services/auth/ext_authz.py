"""Envoy's ext_authz decision, whatever carries it (`ExtAuthz.decide`, the
denials in OpenAI's shape), and its gRPC form: `envoy.service.auth.v3.
Authorization/Check`, served with a grpcio generic handler over
`mariana.auth.v1`'s wire-compatible subset of Envoy's CheckRequest/
CheckResponse (`ext_authz_wire.proto`: parsed and built in C). The HTTP form,
the edge's default, is `http_check.py`.

Denials are answers, not errors (not through the error interceptor): Envoy
needs the HTTP denial it should send, with an OpenAI-shaped JSON body."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from http import HTTPStatus

import grpc
import structlog
from prometheus_client import Counter

from mariana.auth.v1.ext_authz_wire_pb2 import (
    ExtAuthzCheckRequest,
    ExtAuthzCheckResponse,
    ExtAuthzDeniedHttpResponse,
    ExtAuthzHeaderValue,
    ExtAuthzHeaderValueOption,
    ExtAuthzHttpStatus,
    ExtAuthzOkHttpResponse,
    ExtAuthzStatus,
)
from mariana_common.errors import PermissionDenied, Unauthenticated, Unavailable
from mariana_common.server import Context, Registrar
from services.auth.authorizer import Authorizer, QuotaExceeded, RateLimited, Verdict

log = structlog.get_logger()

CHECKS = Counter("mariana_auth_checks_total", "ext_authz decisions by result.", ["result"])
DENIAL_RESULTS: dict[type[Exception], str] = {
    Unauthenticated: "unauthenticated",
    PermissionDenied: "permission_denied",
    Unavailable: "unavailable",
    RateLimited: "rate_limited",
    QuotaExceeded: "quota_exceeded",
}

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
TENANT_HEADER = "x-mariana-tenant"
KEY_ID_HEADER = "x-mariana-key-id"
MODELS_HEADER = "x-mariana-models"
# Headers only auth may set; the edge strips them from client requests too.
IDENTITY_HEADERS = (TENANT_HEADER, KEY_ID_HEADER, MODELS_HEADER)

GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
OVERWRITE_IF_EXISTS_OR_ADD = 2  # envoy.config.core.v3.HeaderValueOption.HeaderAppendAction


def _header(name: str, value: str) -> ExtAuthzHeaderValueOption:
    return ExtAuthzHeaderValueOption(
        header=ExtAuthzHeaderValue(key=name, value=value), append_action=OVERWRITE_IF_EXISTS_OR_ADD
    )


@functools.lru_cache(maxsize=4096)
def _identity_part(tenant_id: str, key_id: str, models: str) -> bytes:
    headers = [_header(TENANT_HEADER, tenant_id), _header(KEY_ID_HEADER, key_id), _header(MODELS_HEADER, models)]
    answer = ExtAuthzCheckResponse(status=ExtAuthzStatus(code=GRPC_OK), ok_response=ExtAuthzOkHttpResponse())
    answer.ok_response.headers.extend(headers)
    return answer.SerializeToString()


def _rate_part(headers: dict[str, str]) -> bytes:
    ok = ExtAuthzOkHttpResponse(response_headers_to_add=[_header(k, v) for k, v in headers.items()])
    return ExtAuthzCheckResponse(ok_response=ok).SerializeToString()


def allow(verdict: Verdict) -> bytes:
    """Built from parts: protobuf merges concatenated messages (sub-messages
    merge, repeated fields append); the identity part repeats from request to
    request and is cached pre-serialized, the rate-limit headers change."""
    identity = verdict.identity
    answer = _identity_part(identity.tenant_id, identity.key_id, ",".join(sorted(identity.scopes.models)))
    if verdict.rate.headers:
        answer += _rate_part(verdict.rate.headers)
    return answer


@dataclass(frozen=True)
class Denial:
    """What the client gets instead of an answer, for either transport."""

    http: HTTPStatus
    grpc_code: int
    message: str
    body: str  # OpenAI's error JSON
    headers: dict[str, str]  # for the client, content-type included


def _denial(
    grpc_code: int, http: HTTPStatus, kind: str, code: str, message: str, extra: dict[str, str] | None = None
) -> Denial:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    return Denial(http, grpc_code, message, body, {"content-type": "application/json", **(extra or {})})


def denial_of(error: Exception, grpc_client: bool = False) -> Denial:
    if isinstance(error, RateLimited):
        decision = error.decision
        headers = {"retry-after": str(max(1, int(decision.retry_after_s))), **decision.headers}
        if grpc_client:  # Envoy would map HTTP 429 to UNAVAILABLE; gRPC's own code is RESOURCE_EXHAUSTED
            headers["grpc-status"] = str(GRPC_RESOURCE_EXHAUSTED)
        kind = decision.exceeded or "requests"
        return _denial(
            GRPC_RESOURCE_EXHAUSTED,
            HTTPStatus.TOO_MANY_REQUESTS,
            kind,
            "rate_limit_exceeded",
            f"Rate limit reached for {kind} per minute. Retry after {headers['retry-after']}s.",
            headers,
        )
    if isinstance(error, QuotaExceeded):
        extra = {"grpc-status": str(GRPC_RESOURCE_EXHAUSTED)} if grpc_client else {}
        return _denial(
            GRPC_RESOURCE_EXHAUSTED,
            HTTPStatus.TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            str(error),
            extra,
        )
    if isinstance(error, PermissionDenied):
        return _denial(
            GRPC_PERMISSION_DENIED, HTTPStatus.FORBIDDEN, "permission_error", "permission_denied", str(error)
        )
    if isinstance(error, Unavailable):
        return _denial(
            GRPC_UNAVAILABLE,
            HTTPStatus.SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            str(error),
            {"retry-after": "1"},
        )
    return _denial(
        GRPC_UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED, "invalid_request_error", "invalid_api_key", str(error)
    )


def deny(error: Exception, grpc_client: bool = False) -> bytes:
    """The denial as Envoy's gRPC CheckResponse."""
    denial = denial_of(error, grpc_client)
    headers = [_header(k, v) for k, v in denial.headers.items()]
    denied = ExtAuthzDeniedHttpResponse(status=ExtAuthzHttpStatus(code=denial.http), headers=headers, body=denial.body)
    status = ExtAuthzStatus(code=denial.grpc_code, message=denial.message)
    return ExtAuthzCheckResponse(status=status, denied_response=denied).SerializeToString()


DENIALS = tuple(DENIAL_RESULTS)


class ExtAuthz:
    """The check itself, whatever carries it: a Verdict, or the error to deny with."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def decide(self, authorization: str, path: str, request_id: str | None) -> Verdict | Exception:
        try:
            verdict = await self._authorizer.authorize(authorization, path)
        except DENIALS as error:
            log.info("denied", path=path, reason=str(error), request_id=request_id)
            CHECKS.labels(DENIAL_RESULTS[type(error)]).inc()
            return error
        CHECKS.labels("allowed").inc()
        return verdict

    async def check(self, request: ExtAuthzCheckRequest, context: Context) -> bytes:
        """Envoy's gRPC `Authorization/Check`."""
        if not request.attributes.request.HasField("http"):
            return deny(Unauthenticated("no HTTP attributes in the check request"))
        http = request.attributes.request.http
        headers = http.headers
        decision = await self.decide(headers.get("authorization", ""), http.path, headers.get("x-request-id"))
        if isinstance(decision, Verdict):
            return allow(decision)
        return deny(decision, is_grpc(headers.get("content-type", "")))


def is_grpc(content_type: str) -> bool:
    return content_type.startswith("application/grpc")


def register(authz: ExtAuthz) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            authz.check, request_deserializer=ExtAuthzCheckRequest.FromString, response_serializer=lambda b: b
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": handler}),))

    return add
