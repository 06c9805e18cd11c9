"""Renders the local Envoy bootstrap from a Plan, as typed envoy-data-plane
objects. One Envoy plays both parts:

- the edge listener: REST/JSON and gRPC (h2c) on one port; strips identity
  headers clients might forge, asks auth (ext_authz), sends `"stream": true`
  chat requests to the streaming RPC, transcodes JSON <-> gRPC;
- one mesh listener per service that other services call: mTLS with a client
  certificate required, RBAC on the caller's SPIFFE identity.

Every upstream cluster speaks h2 over mTLS with Envoy's own identity, with
the retry, breaker, outlier and health-check policy of the topology."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    DurationFilter,
    GrpcStatusFilter,
    GrpcStatusFilterStatus,
    OrFilter,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    CircuitBreakersThresholdsRetryBudget,
    Cluster,
    ClusterDiscoveryType,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.cluster.v3 import OutlierDetection as EnvoyOutlierDetection
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as HeaderMutationRule
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    BackoffStrategy,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    Node,
    PathConfigSource,
    RuntimeFractionalPercent,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    WatchedDirectory,
)
from envoy_data_plane.envoy.config.core.v3 import RetryPolicy as GrpcRetryPolicy
from envoy_data_plane.envoy.config.core.v3 import RetryPolicyRetryHostPredicate as GrpcRetryHostPredicate
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Policy,
    Principal,
    PrincipalAuthenticated,
    Rbac,
    RbacAction,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    RateLimit,
    RateLimitAction,
    RateLimitActionRequestHeaders,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
    XRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate as PreviousHosts
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    CommonTlsContextCombinedCertificateValidationContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, HttpStatus, Percent, StatusCode, TokenBucket
from envoy_data_plane.google.protobuf import Any, Struct, Value

from mesh.api import idempotent_paths
from mesh.plan import ENVOY_IDENTITY, Plan
from mesh.topology import EDGE, Service
from mesh.topology import RetryPolicy as TopologyRetry
from services.auth.ext_authz import IDENTITY_HEADERS

LLM_SERVICE = "mariana.llm.v1.LlmService"
AUTH_ADMIN_SERVICE = "mariana.auth.v1.AuthAdminService"
BILLING_SERVICE = "mariana.billing.v1.BillingService"
ADMIN_GRPC_PREFIXES = {"auth": "/mariana.auth.v1.AuthAdminService/", "billing": "/mariana.billing.v1.BillingService/"}
CHAT_PATH = "/v1/chat/completions"
CHAT_STREAM_PATH = CHAT_PATH + ":stream"
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

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status") or "200"
  if tonumber(status) < 400 then
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

ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "route": "%ROUTE_NAME%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
}


def _address(port: int, host: str = "127.0.0.1") -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _file(path: Path) -> DataSource:
    return DataSource(filename=str(path.resolve()))


# Envoy's certificate and the mesh CA come from SDS secrets in files: when the
# certificates are rotated in place, Envoy picks them up without a restart.
IDENTITY_SECRET = "envoy_identity"
CA_SECRET = "mesh_ca"


def _sds(plan: Plan, secret: str) -> SdsSecretConfig:
    directory = plan.certs[ENVOY_IDENTITY].cert.parent.resolve()
    source = PathConfigSource(path=str(sds_file(plan, secret)), watched_directory=WatchedDirectory(path=str(directory)))
    return SdsSecretConfig(name=secret, sds_config=ConfigSource(path_config_source=source))


def sds_file(plan: Plan, secret: str) -> Path:
    return plan.certs[ENVOY_IDENTITY].cert.parent.resolve() / f"sds-{secret}.json"


def sds_secrets(plan: Plan) -> dict[str, Secret]:
    certs = plan.certs[ENVOY_IDENTITY]
    directory = WatchedDirectory(path=str(certs.cert.parent.resolve()))
    return {
        IDENTITY_SECRET: Secret(
            name=IDENTITY_SECRET,
            tls_certificate=TlsCertificate(
                certificate_chain=_file(certs.cert), private_key=_file(certs.key), watched_directory=directory
            ),
        ),
        CA_SECRET: Secret(
            name=CA_SECRET,
            validation_context=CertificateValidationContext(trusted_ca=_file(certs.ca), watched_directory=directory),
        ),
    }


def _tls_context(plan: Plan, peer_ids: list[str]) -> CommonTlsContext:
    sans = [
        SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=peer))
        for peer in peer_ids
    ]
    return CommonTlsContext(
        # gRPC servers refuse TLS without ALPN h2.
        alpn_protocols=["h2"],
        tls_certificate_sds_secret_configs=[_sds(plan, IDENTITY_SECRET)],
        combined_validation_context=CommonTlsContextCombinedCertificateValidationContext(
            default_validation_context=CertificateValidationContext(match_typed_subject_alt_names=sans),
            validation_context_sds_secret_config=_sds(plan, CA_SECRET),
        ),
    )


# Inner hops log only what went wrong or was slow: the edge's line already
# records every request, and a line per hop per request costs Envoy CPU.
SLOW_HOP_MS = 1000


def _failures_only() -> AccessLogFilter:
    def at_least(value: int, runtime_key: str) -> ComparisonFilter:
        threshold = RuntimeUInt32(default_value=value, runtime_key=runtime_key)
        return ComparisonFilter(op=ComparisonFilterOp.GE, value=threshold)

    return AccessLogFilter(
        or_filter=OrFilter(
            filters=[
                AccessLogFilter(
                    status_code_filter=StatusCodeFilter(comparison=at_least(400, "mesh_access_log.min_status"))
                ),
                AccessLogFilter(
                    grpc_status_filter=GrpcStatusFilter(statuses=[GrpcStatusFilterStatus.OK], exclude=True)
                ),
                AccessLogFilter(
                    duration_filter=DurationFilter(comparison=at_least(SLOW_HOP_MS, "mesh_access_log.min_duration_ms"))
                ),
            ]
        )
    )


def _access_log(name: str, failures_only: bool = False) -> list[AccessLog]:
    fields = {k: Value(string_value=v) for k, v in {**ACCESS_LOG_FIELDS, "listener": name}.items()}
    stdout = StdoutAccessLog(log_format=SubstitutionFormatString(json_format=Struct(fields=fields)))
    log_filter = _failures_only() if failures_only else None
    return [AccessLog(name="envoy.access_loggers.stdout", filter=log_filter, typed_config=Any.pack(stdout))]


def _http_filter(name: str, config: object) -> HttpFilter:
    return HttpFilter(name=name, typed_config=Any.pack(config))  # type: ignore[arg-type]


PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


def _retry_policy(policy: TopologyRetry) -> RetryPolicy:
    return RetryPolicy(
        retry_on=",".join(policy.retry_on),
        num_retries=policy.num_retries,
        per_try_timeout=policy.per_try_timeout,
        retry_back_off=RetryPolicyRetryBackOff(base_interval=policy.backoff_base, max_interval=policy.backoff_max),
        # A retry goes to another replica when there is one.
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(name=PREVIOUS_HOSTS, typed_config=Any.pack(PreviousHosts()))
        ],
        host_selection_retry_max_attempts=3,
    )


def _route_to(service_name: str, service: Service, match: RouteMatch, policy: TopologyRetry, name: str) -> Route:
    return Route(
        name=name,
        match=match,
        route=RouteAction(cluster=service_name, timeout=service.timeout, retry_policy=_retry_policy(policy)),
    )


def service_routes(plan: Plan, name: str, prefixes: list[str]) -> list[Route]:
    """One route per idempotent method (with `idempotent_retry`), then the
    service's `prefixes` with the retry every method may have."""
    service = plan.topology.services[name]
    exact = [
        _route_to(name, service, RouteMatch(path=path), service.idempotent_retry, f"{name}{path}")
        for path in idempotent_paths(plan.descriptor_set, service.api)
        if any(path.startswith(prefix) for prefix in prefixes)
    ]
    fallback = [
        _route_to(name, service, RouteMatch(prefix=prefix), service.retry, f"{name}{prefix}*") for prefix in prefixes
    ]
    return exact + fallback


_LB_POLICIES = {
    "least_request": ClusterLbPolicy.LEAST_REQUEST,
    "round_robin": ClusterLbPolicy.ROUND_ROBIN,
    "random": ClusterLbPolicy.RANDOM,
}


def _thresholds(service: Service) -> CircuitBreakersThresholds:
    breaker = service.circuit_breaker
    budget = breaker.retry_budget
    return CircuitBreakersThresholds(
        max_connections=breaker.max_connections,
        max_pending_requests=breaker.max_pending_requests,
        max_requests=breaker.max_requests,
        max_retries=breaker.max_retries,
        retry_budget=None
        if budget is None
        else CircuitBreakersThresholdsRetryBudget(
            budget_percent=Percent(value=budget.budget_percent), min_retry_concurrency=budget.min_retry_concurrency
        ),
    )


def _upstream(plan: Plan, name: str) -> tuple[ClusterDiscoveryType, list[LbEndpoint], TransportSocket | None]:
    """Locally: each replica's port, over mTLS as Envoy. On Kubernetes: the
    service's DNS name in plaintext to the pod's sidecar, which does mTLS."""
    if plan.service_dns:
        address = _address(plan.service_ports[name][0], f"{name}.{plan.service_dns}")
        return ClusterDiscoveryType.STRICT_DNS, [LbEndpoint(endpoint=Endpoint(address=address))], None
    endpoints = [LbEndpoint(endpoint=Endpoint(address=_address(port))) for port in plan.service_ports[name]]
    upstream_tls = UpstreamTlsContext(
        common_tls_context=_tls_context(plan, [plan.topology.spiffe_id(name)]), sni="localhost"
    )
    tls = TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(upstream_tls))
    return ClusterDiscoveryType.STATIC, endpoints, tls


def cluster(plan: Plan, name: str, service: Service) -> Cluster:
    discovery, endpoints, transport_socket = _upstream(plan, name)
    protocol = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
    )
    outlier = service.outlier_detection
    health = service.health_check
    return Cluster(
        name=name,
        type=discovery,
        connect_timeout=timedelta(seconds=1),
        lb_policy=_LB_POLICIES[service.lb_policy],
        load_assignment=ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(protocol)},
        transport_socket=transport_socket,
        circuit_breakers=CircuitBreakers(thresholds=[_thresholds(service)]),
        outlier_detection=EnvoyOutlierDetection(
            consecutive_5xx=outlier.consecutive_5xx,
            consecutive_gateway_failure=outlier.consecutive_gateway_failure,
            interval=outlier.interval,
            base_ejection_time=outlier.base_ejection_time,
            max_ejection_percent=outlier.max_ejection_percent,
        ),
        health_checks=[
            HealthCheck(
                timeout=health.timeout,
                interval=health.interval,
                # Probe idle clusters as often as busy ones, so start-up is seen at once.
                no_traffic_interval=health.interval,
                unhealthy_threshold=health.unhealthy_threshold,
                healthy_threshold=health.healthy_threshold,
                grpc_health_check=HealthCheckGrpcHealthCheck(),
            )
        ],
    )


def _transcoder(plan: Plan, *, sse: bool) -> GrpcJsonTranscoder:
    return GrpcJsonTranscoder(
        proto_descriptor=plan.descriptor_mount or str(plan.descriptor_set.resolve()),
        services=[LLM_SERVICE, AUTH_ADMIN_SERVICE, BILLING_SERVICE],
        convert_grpc_status=True,
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


def _ext_authz(plan: Plan) -> ExtAuthz:
    edge = plan.topology.edge
    retry = edge.ext_authz_retry
    policy = GrpcRetryPolicy(
        retry_on=",".join(retry.retry_on),
        num_retries=retry.num_retries,
        retry_back_off=BackoffStrategy(base_interval=retry.backoff_base, max_interval=retry.backoff_max),
        # least-request would pick a dead replica (it has no requests) again
        retry_host_predicate=[GrpcRetryHostPredicate(name=PREVIOUS_HOSTS, typed_config=Any.pack(PreviousHosts()))],
        host_selection_retry_max_attempts=3,
    )
    return ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="auth"), timeout=edge.ext_authz_timeout, retry_policy=policy
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )


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
    return [_http_filter("envoy.filters.http.local_ratelimit", config)]


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
    authz = [_http_filter("envoy.filters.http.ext_authz", ext_authz)] if auth else []
    manager = HttpConnectionManager(
        stat_prefix="edge",
        codec_type=HttpConnectionManagerCodecType.AUTO,
        use_remote_address=True,
        tracing=_tracing(plan, "edge"),
        route_config=RouteConfiguration(
            name="edge", virtual_hosts=[VirtualHost(name="edge", domains=["*"], routes=routes)]
        ),
        http_filters=[
            _http_filter("envoy.filters.http.header_mutation", strip_identity),
            *authz,
            _http_filter("envoy.filters.http.lua", Lua(default_source_code=DataSource(inline_string=EDGE_LUA))),
            *_tenant_rate_limit(plan),
            _http_filter(TRANSCODER, _transcoder(plan, sse=False)),
            _http_filter("envoy.filters.http.router", Router()),
        ],
        access_log=_access_log("edge"),
    )
    return Listener(
        name="edge",
        address=_address(plan.edge_ports[index], plan.listen_host),
        filter_chains=[FilterChain(filters=[_network_filter(manager)])],
    )


def _network_filter(manager: HttpConnectionManager) -> Filter:
    return Filter(name="envoy.filters.network.http_connection_manager", typed_config=Any.pack(manager))


def mesh_listener(plan: Plan, name: str, service: Service, index: int = 0) -> Listener:
    """Where services call `name`: only its declared callers get through."""
    callers = [c for c in service.callers if c != EDGE]
    caller_ids = [plan.topology.spiffe_id(c) for c in callers]
    rbac = RbacFilter(
        rules=Rbac(
            action=RbacAction.ALLOW,
            policies={
                f"{name}-callers": Policy(
                    permissions=[Permission(any=True)],
                    principals=[
                        Principal(authenticated=PrincipalAuthenticated(principal_name=StringMatcher(exact=spiffe)))
                        for spiffe in caller_ids
                    ],
                )
            },
        )
    )
    manager = HttpConnectionManager(
        stat_prefix=f"mesh_{name}",
        codec_type=HttpConnectionManagerCodecType.HTTP2,
        tracing=_tracing(plan, f"mesh-{name}"),
        route_config=RouteConfiguration(
            name=f"mesh_{name}",
            virtual_hosts=[VirtualHost(name=name, domains=["*"], routes=service_routes(plan, name, ["/"]))],
        ),
        http_filters=[
            _http_filter("envoy.filters.http.rbac", rbac),
            _http_filter("envoy.filters.http.router", Router()),
        ],
        access_log=_access_log(f"mesh_{name}", failures_only=True),
    )
    # The handshake only checks the CA; who may call is RBAC's decision, so a
    # known workload that may not call gets PERMISSION_DENIED, not a TLS error.
    tls = DownstreamTlsContext(common_tls_context=_tls_context(plan, []), require_client_certificate=True)
    return Listener(
        name=f"mesh_{name}",
        address=_address(plan.mesh_ports[name][index]),
        filter_chains=[
            FilterChain(
                filters=[_network_filter(manager)],
                transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(tls)),
            )
        ],
    )


COLLECTOR = "opentelemetry_collector"


def _tracing(plan: Plan, name: str) -> HttpConnectionManagerTracing | None:
    """Envoy's own spans (the edge, ext_authz, each mesh hop), continuing the
    client's `traceparent` and passing it upstream, exported over OTLP."""
    if not plan.otlp_endpoint:
        return None
    config = OpenTelemetryConfig(
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=COLLECTOR)), service_name=f"envoy-{name}"
    )
    provider = TracingHttp(name="envoy.tracers.opentelemetry", typed_config=Any.pack(config))
    return HttpConnectionManagerTracing(provider=provider, spawn_upstream_span=True)


def collector_cluster(plan: Plan) -> Cluster:
    host, _, port = plan.otlp_endpoint.rpartition(":")
    protocol = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
    )
    endpoint = LbEndpoint(endpoint=Endpoint(address=_address(int(port), host)))
    return Cluster(
        name=COLLECTOR,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        load_assignment=ClusterLoadAssignment(
            cluster_name=COLLECTOR, endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]
        ),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(protocol)},
    )


def render_bootstrap(plan: Plan, index: int = 0, edge_auth: bool = True) -> Bootstrap:
    """Envoy number `index` of the plan's Envoys (each has the edge listener
    and every mesh listener, on ports of its own). `edge_auth=False` drops
    ext_authz (and asserts an anonymous identity): for measuring what auth
    costs, never for serving."""
    services = plan.topology.services
    listeners = [edge_listener(plan, index, edge_auth)]
    if not plan.service_dns:  # on Kubernetes, Istio's sidecars are the mesh
        listeners += [mesh_listener(plan, name, s, index) for name, s in services.items() if name in plan.mesh_ports]
    clusters = [cluster(plan, name, s) for name, s in services.items()]
    if plan.otlp_endpoint:
        clusters.append(collector_cluster(plan))
    return Bootstrap(
        # SDS needs a node identity.
        node=Node(id=f"envoy-{index}", cluster="mariana-edge"),
        admin=Admin(address=_address(plan.admin_ports[index])),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
    )


# betterproto2 derives JSON names from Python names and gets the ones with a
# digit before letters wrong (consecutive_5xx -> "consecutive5Xx"; protobuf
# says "consecutive5xx"). The renderer uses only these.
_JSON_NAME_FIXES = {"consecutive5Xx": "consecutive5xx", "enforcingConsecutive5Xx": "enforcingConsecutive5xx"}


def _fix_json_names(node: object) -> object:
    if isinstance(node, dict):
        return {_JSON_NAME_FIXES.get(k, k): _fix_json_names(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_json_names(v) for v in node]
    return node


def bootstrap_json(plan: Plan, index: int = 0, edge_auth: bool = True) -> str:
    return _json(render_bootstrap(plan, index, edge_auth))


def _json(message: object) -> str:
    return json.dumps(_fix_json_names(message.to_dict()), indent=1)  # type: ignore[attr-defined]


def write_sds_files(plan: Plan) -> None:
    """The SDS files the bootstraps point at (one per secret, next to the certificates)."""
    if plan.service_dns:
        return
    for name, secret in sds_secrets(plan).items():
        resource = json.loads(_json(Any.pack(secret)))
        sds_file(plan, name).write_text(json.dumps({"resources": [resource]}, indent=1))


def write_bootstrap(plan: Plan, path: Path, index: int = 0, edge_auth: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sds_files(plan)
    path.write_text(bootstrap_json(plan, index, edge_auth))
    return path
