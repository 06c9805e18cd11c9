"""The edge listener: REST/JSON and gRPC (h2c) on one port; strips identity
headers clients might forge, asks auth (ext_authz), sends `"stream": true`
chat requests to the streaming RPC, keeps a per-tenant rate limit, transcodes
JSON <-> gRPC and answers errors in OpenAI's shape."""

from __future__ import annotations

import json
from datetime import timedelta

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as HeaderMutationRule
from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    BackoffStrategy,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HttpUri,
    RuntimeFractionalPercent,
)
from envoy_data_plane.envoy.config.core.v3 import RetryPolicy as CoreRetryPolicy
from envoy_data_plane.envoy.config.core.v3 import RetryPolicyRetryHostPredicate as CoreRetryHostPredicate
from envoy_data_plane.envoy.config.listener.v3 import FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    RateLimit,
    RateLimitAction,
    RateLimitActionRequestHeaders,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
    XRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
    AuthorizationRequest,
    AuthorizationResponse,
    ExtAuthz,
    HttpService,
)
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate as PreviousHosts
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, HttpStatus, StatusCode, TokenBucket
from envoy_data_plane.google.protobuf import Any

from mesh.envoy_parts import (
    HOST_SELECTION_ATTEMPTS,
    PREVIOUS_HOSTS,
    access_log,
    address,
    cluster,
    http_filter,
    network_filter,
    over_http1,
    service_routes,
    tracing,
)
from mesh.plan import AUTH, Plan
from mesh.topology import EDGE
from services.auth.ext_authz import IDENTITY_HEADERS
from services.auth.http_check import CALLER_CONTENT_TYPE, CHECK_PATH_PREFIX, FORWARDED_HEADERS
from services.router.domain import ROUTE_HEADERS

LLM_SERVICE = "mariana.llm.v1.LlmService"
AUTH_ADMIN_SERVICE = "mariana.auth.v1.AuthAdminService"
BILLING_SERVICE = "mariana.billing.v1.BillingService"
ADMIN_GRPC_PREFIXES = {"auth": "/mariana.auth.v1.AuthAdminService/", "billing": "/mariana.billing.v1.BillingService/"}
CHAT_PATH = "/v1/chat/completions"
CHAT_STREAM_PATH = CHAT_PATH + ":stream"
# What the edge's Lua buffers of an answer at most: half the stream's buffer
# (Envoy's default, 1 MiB), which a filter may not pass.
MAX_LUA_BUFFERED = 512 * 1024
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"

# Envoy's per-tenant rate limit answers in plain text; the edge's Lua (which
# runs before it in the chain, so sees its reply) puts it in OpenAI's shape.
LOCAL_RATE_LIMITED = "local_rate_limited"
RATE_LIMITED = json.dumps(
    {
        "error": {
            "message": "too many requests for this tenant at this edge; retry shortly",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
)

# The edge's Lua: on requests, sends `"stream": true` chat bodies to the
# streaming RPC (OpenAI uses one path for both; gRPC needs two methods; a quote
# inside a JSON string is escaped, so the pattern cannot match text inside a
# message); on responses, turns the transcoder's error body ({"code",
# "message", "details"}, google.rpc.Status as JSON) into OpenAI's error shape,
# with `code` from the ErrorInfo reason a service attached (e.g.
# insufficient_quota), and the rate limit's text reply likewise. Bodies that
# are not a transcoded status (auth's denials are OpenAI-shaped already) pass.
EDGE_LUA = f"""
local TYPES = {{["400"] = "invalid_request_error", ["401"] = "invalid_request_error",
  ["403"] = "permission_error", ["404"] = "invalid_request_error", ["409"] = "invalid_request_error",
  ["429"] = "rate_limit_error"}}
local CODES = {{["400"] = "invalid_request", ["401"] = "invalid_api_key", ["403"] = "permission_denied",
  ["404"] = "not_found", ["409"] = "conflict", ["429"] = "rate_limit_exceeded", ["499"] = "cancelled",
  ["500"] = "internal_error", ["501"] = "not_implemented", ["503"] = "unavailable", ["504"] = "timeout"}}

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":path") ~= "{CHAT_PATH}" or headers:get(":method") ~= "POST" then
    return
  end
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  if string.find(text, '"stream"%s*:%s*true') then
    -- a header map fetched before body() is out of scope after it
    handle:headers():replace(":path", "{CHAT_STREAM_PATH}")
    handle:clearRouteCache()
  end
end

local RATE_LIMITED = [[{RATE_LIMITED}]]

local ROUTE_HEADERS = {{{", ".join(f'"{h}"' for h in ROUTE_HEADERS)}}}

-- A whole answer's route comes in the router's trailing metadata, which
-- HTTP/1.1 drops: copied into the headers (the transcoder holds a unary
-- answer whole anyway, so waiting for its trailers holds nothing up). Not for
-- an answer larger than this filter may buffer (a 500): it goes without them.
local function route_headers_from_trailers(handle, length)
  if length == nil or length > {MAX_LUA_BUFFERED} then
    return
  end
  -- the body first: while it is buffered the headers are held, and so may change
  if handle:body() == nil then
    return
  end
  local trailers = handle:trailers()
  if trailers == nil then
    return
  end
  local headers = handle:headers()
  for _, name in ipairs(ROUTE_HEADERS) do
    local value = trailers:get(name)
    if value ~= nil then
      headers:replace(name, value)
    end
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status") or "200"
  if tonumber(status) < 400 then
    if headers:get("{ROUTE_HEADERS[1]}") == nil and headers:get("content-type") == "application/json" then
      route_headers_from_trailers(handle, tonumber(headers:get("content-length") or ""))
    end
    return
  end
  if status == "429" and string.find(headers:get("content-type") or "", "text/plain", 1, true) then
    local body = handle:body()
    if body ~= nil and body:getBytes(0, body:length()) == "{LOCAL_RATE_LIMITED}" then
      body:setBytes(RATE_LIMITED)
      handle:headers():replace("content-type", "application/json")
      handle:headers():replace("content-length", tostring(#RATE_LIMITED))
    end
    return
  end
  if not string.find(headers:get("content-type") or "", "application/json", 1, true) then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local text = body:getBytes(0, body:length())
  local code, message = string.match(text, '^{{"code":(%d+),"message":"(.*)","details":')
  if code == nil then
    code, message = string.match(text, '^{{"code":(%d+),"message":"(.*)"}}$')
  end
  if code == nil then
    return
  end
  local reason = string.match(text, '"reason":"([%w_]+)"')
  local kind = TYPES[status] or (tonumber(status) >= 500 and "server_error" or "invalid_request_error")
  if reason == "insufficient_quota" then
    kind = "insufficient_quota"
  end
  local out = string.format('{{"error":{{"message":"%s","type":"%s","param":null,"code":"%s"}}}}',
    message, kind, reason or CODES[status] or "error")
  body:setBytes(out)
  handle:headers():replace("content-length", tostring(#out))
end
"""


# What the transcoder holds of one request or answer; past it, a clear error.
# Unset, it is the stream's buffer (1 MiB), and 2,048 embeddings as JSON floats
# (~17 MB) or a few hundred were a 500.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


def _transcoder(plan: Plan, *, sse: bool) -> GrpcJsonTranscoder:
    return GrpcJsonTranscoder(
        proto_descriptor=plan.descriptor_mount or str(plan.descriptor_set.resolve()),
        services=[LLM_SERVICE, AUTH_ADMIN_SERVICE, BILLING_SERVICE],
        convert_grpc_status=True,
        max_request_body_size=MAX_REQUEST_BYTES,
        max_response_body_size=MAX_RESPONSE_BYTES,
        print_options=GrpcJsonTranscoderPrintOptions(
            preserve_proto_field_names=True,
            always_print_primitive_fields=True,
            stream_sse_style_delimited=sse,
        ),
    )


# Identity the edge asserts when auth is turned off (measurements only).
UNAUTHENTICATED_IDENTITY = {"x-mariana-tenant": "anonymous", "x-mariana-key-id": "anonymous"}


NOT_FOUND = json.dumps({"error": {"message": "no such endpoint", "type": "invalid_request_error", "code": "not_found"}})
TENANT_HEADER = "x-mariana-tenant"


def _edge_routes(plan: Plan) -> list[Route]:
    """REST paths are matched twice: once as sent (ext_authz and the Lua see
    them; the streaming route carries the SSE transcoder setting), then, after
    the transcoder rewrote the path, on the gRPC method, where each method's
    retry policy applies."""
    services = plan.topology.services
    admin = [
        route
        for name, prefix in ADMIN_GRPC_PREFIXES.items()
        if EDGE in services[name].callers
        for route in service_routes(plan, name, [prefix])
    ]
    return [
        Route(
            name="router/v1/chat/completions:stream",
            match=RouteMatch(path=CHAT_STREAM_PATH),
            route=RouteAction(cluster="router", timeout=services["router"].timeout),
            typed_per_filter_config={TRANSCODER: Any.pack(_transcoder(plan, sse=True))},
        ),
        *admin,
        *service_routes(plan, "router", [f"/{LLM_SERVICE}/", "/v1/"]),
        Route(
            name="not_found",
            match=RouteMatch(prefix="/"),
            direct_response=DirectResponseAction(status=404, body=DataSource(inline_string=NOT_FOUND)),
        ),
    ]


EXT_AUTHZ_CLUSTER = "auth_ext_authz"
# What a denial may tell the client; on success, the rate-limit headers.
_DENIAL_HEADERS = ("content-type", "retry-after", "grpc-status")
_RATE_LIMIT_PREFIX = "x-ratelimit-"


def _exact(names: tuple[str, ...]) -> list[StringMatcher]:
    return [StringMatcher(exact=name) for name in names]


def _ext_authz(plan: Plan) -> ExtAuthz:
    edge = plan.topology.edge
    retry = edge.ext_authz_retry
    policy = CoreRetryPolicy(
        retry_on=",".join(retry.retry_on),
        num_retries=retry.num_retries,
        retry_back_off=BackoffStrategy(base_interval=retry.backoff_base, max_interval=retry.backoff_max),
        # least-request would pick a dead replica (it has no requests) again
        retry_host_predicate=[CoreRetryHostPredicate(name=PREVIOUS_HOSTS, typed_config=Any.pack(PreviousHosts()))],
        host_selection_retry_max_attempts=HOST_SELECTION_ATTEMPTS,
    )
    if edge.ext_authz_api == "grpc":
        grpc = GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTH), timeout=edge.ext_authz_timeout, retry_policy=policy
        )
        return _ext_authz_filter(grpc_service=grpc)
    rate_limit = StringMatcher(prefix=_RATE_LIMIT_PREFIX)
    http = HttpService(
        server_uri=HttpUri(uri=f"http://{AUTH}", cluster=EXT_AUTHZ_CLUSTER, timeout=edge.ext_authz_timeout),
        path_prefix=CHECK_PATH_PREFIX,
        # Not as `content-type`: a check request that says application/grpc
        # makes Envoy's own replies to it (timeout, no healthy upstream,
        # overflow) gRPC-shaped, HTTP 200 with grpc-status 14, and a 200 is an
        # allow: the request went on without identity (fail open).
        authorization_request=AuthorizationRequest(
            headers_to_add=[HeaderValue(key=CALLER_CONTENT_TYPE, value="%REQ(content-type)%")]
        ),
        authorization_response=AuthorizationResponse(
            allowed_upstream_headers=ListStringMatcher(patterns=_exact(IDENTITY_HEADERS)),
            allowed_client_headers=ListStringMatcher(patterns=[*_exact(_DENIAL_HEADERS), rate_limit]),
            allowed_client_headers_on_success=ListStringMatcher(patterns=[rate_limit]),
        ),
        retry_policy=policy,
    )
    return _ext_authz_filter(http_service=http, allowed_headers=ListStringMatcher(patterns=_exact(FORWARDED_HEADERS)))


def _ext_authz_filter(
    grpc_service: GrpcService | None = None,
    http_service: HttpService | None = None,
    allowed_headers: ListStringMatcher | None = None,
) -> ExtAuthz:
    return ExtAuthz(
        grpc_service=grpc_service,
        http_service=http_service,
        allowed_headers=allowed_headers,
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )


def ext_authz_cluster(plan: Plan) -> Cluster:
    """auth's HTTP check port: the auth cluster's policy (breaker, outlier
    detection, mTLS as Envoy), HTTP/1.1, health from `GET /healthz`."""
    service = plan.topology.services[AUTH]
    base = cluster(plan, AUTH, service, ports=plan.ext_authz_ports, cluster_name=EXT_AUTHZ_CLUSTER, alpn=("http/1.1",))
    return over_http1(base, plan.topology.edge.ext_authz_connections)


def _tenant_rate_limit(plan: Plan) -> list[HttpFilter]:
    """A token bucket per tenant (the header auth set), in this Envoy."""
    limit = plan.topology.edge.tenant_rate_limit
    if limit is None:
        return []
    bucket = TokenBucket(
        max_tokens=limit.burst, tokens_per_fill=limit.requests_per_second, fill_interval=timedelta(seconds=1)
    )
    always = RuntimeFractionalPercent(default_value=FractionalPercent(numerator=100))
    by_tenant = RateLimitActionRequestHeaders(header_name=TENANT_HEADER, descriptor_key="tenant")
    config = LocalRateLimit(
        stat_prefix="tenant_rate_limit",
        filter_enabled=always,
        filter_enforced=always,
        # An empty value matches every tenant, each with a bucket of its own.
        descriptors=[
            LocalRateLimitDescriptor(entries=[RateLimitDescriptorEntry(key="tenant", value="")], token_bucket=bucket)
        ],
        max_dynamic_descriptors=10_000,
        rate_limits=[RateLimit(actions=[RateLimitAction(request_headers=by_tenant)])],
        rate_limited_as_resource_exhausted=True,
        # the buckets fill every second
        response_headers_to_add=[HeaderValueOption(header=HeaderValue(key="retry-after", value="1"))],
        enable_x_ratelimit_headers=XRateLimitHeadersRfcVersion.DRAFT_VERSION_03,
    )
    return [http_filter("envoy.filters.http.local_ratelimit", config)]


def edge_listener(plan: Plan, index: int = 0, auth: bool = True) -> Listener:
    routes = _edge_routes(plan)
    ext_authz = _ext_authz(plan)
    mutations = [HeaderMutationRule(remove=h) for h in IDENTITY_HEADERS]
    if not auth:
        mutations += [
            HeaderMutationRule(append=HeaderValueOption(header=HeaderValue(key=k, value=v)))
            for k, v in UNAUTHENTICATED_IDENTITY.items()
        ]
    strip_identity = HeaderMutation(mutations=Mutations(request_mutations=mutations))
    authz = [http_filter("envoy.filters.http.ext_authz", ext_authz)] if auth else []
    manager = HttpConnectionManager(
        stat_prefix="edge",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        use_remote_address=True,
        tracing=tracing(plan, "edge"),
        route_config=RouteConfiguration(
            name="edge", virtual_hosts=[VirtualHost(name="edge", domains=["*"], routes=routes)]
        ),
        http_filters=[
            http_filter("envoy.filters.http.header_mutation", strip_identity),
            *authz,
            http_filter("envoy.filters.http.lua", Lua(default_source_code=DataSource(inline_string=EDGE_LUA))),
            *_tenant_rate_limit(plan),
            http_filter(TRANSCODER, _transcoder(plan, sse=False)),
            http_filter("envoy.filters.http.router", Router()),
        ],
        access_log=access_log("edge"),
    )
    return Listener(
        name="edge",
        address=address(plan.edge_ports[index], plan.listen_host),
        filter_chains=[FilterChain(filters=[network_filter(manager)])],
    )
