"""Envoy's ext_authz `envoy.service.auth.v3.Authorization/Check`, served with a
grpcio generic handler over envoy-data-plane's CheckRequest/CheckResponse.

Denials are answered here (not through the error interceptor): Envoy needs an
OK gRPC status carrying the HTTP denial it should send, with an OpenAI-shaped
JSON body."""

from __future__ import annotations

import json

import grpc
import structlog
from envoy_data_plane.envoy.config.core.v3 import (
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
)
from envoy_data_plane.envoy.service.auth.v3 import (
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.rpc import Status

from mariana_common.errors import MarianaError, PermissionDenied, Unauthenticated
from mariana_common.server import Context, Registrar
from services.auth.authorizer import Authorizer, Identity

log = structlog.get_logger()

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
TENANT_HEADER = "x-mariana-tenant"
KEY_ID_HEADER = "x-mariana-key-id"
# Headers only auth may set; the edge strips them from client requests too.
IDENTITY_HEADERS = (TENANT_HEADER, KEY_ID_HEADER)

GRPC_OK = 0
GRPC_UNAUTHENTICATED = 16
GRPC_PERMISSION_DENIED = 7


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, value=value),
        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def allow(identity: Identity) -> bytes:
    headers = [_header(TENANT_HEADER, identity.tenant_id), _header(KEY_ID_HEADER, identity.key_id)]
    return bytes(CheckResponse(status=Status(code=GRPC_OK), ok_response=OkHttpResponse(headers=headers)))


def deny(error: MarianaError) -> bytes:
    if isinstance(error, PermissionDenied):
        http, grpc_code, kind, code = (
            StatusCode.Forbidden,
            GRPC_PERMISSION_DENIED,
            "permission_error",
            "permission_denied",
        )
    else:
        http, grpc_code, kind, code = (
            StatusCode.Unauthorized,
            GRPC_UNAUTHENTICATED,
            "invalid_request_error",
            "invalid_api_key",
        )
    body = json.dumps({"error": {"message": str(error), "type": kind, "param": None, "code": code}})
    denied = DeniedHttpResponse(
        status=HttpStatus(code=http),
        headers=[_header("content-type", "application/json")],
        body=body,
    )
    return bytes(CheckResponse(status=Status(code=grpc_code, message=str(error)), denied_response=denied))


class ExtAuthz:
    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def check(self, request: CheckRequest, context: Context) -> bytes:
        http = request.attributes.request.http if request.attributes and request.attributes.request else None
        if http is None:
            return deny(Unauthenticated("no HTTP attributes in the check request"))
        try:
            identity = self._authorizer.authorize(http.headers.get("authorization", ""), http.path)
        except (Unauthenticated, PermissionDenied) as error:
            log.info("denied", path=http.path, reason=str(error), request_id=http.headers.get("x-request-id"))
            return deny(error)
        return allow(identity)


def register(authz: ExtAuthz) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            authz.check, request_deserializer=CheckRequest.parse, response_serializer=lambda b: b
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": handler}),))

    return add
