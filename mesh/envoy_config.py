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
    Cluster,
    ClusterDiscoveryType,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.cluster.v3 import OutlierDetection as EnvoyOutlierDetection
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as HeaderMutationRule
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
)
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
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
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
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Any, Struct, Value

from mesh.plan import ENVOY_IDENTITY, Plan
from mesh.topology import EDGE, Service
from services.auth.ext_authz import IDENTITY_HEADERS

LLM_SERVICE = "mariana.llm.v1.LlmService"
AUTH_ADMIN_SERVICE = "mariana.auth.v1.AuthAdminService"
BILLING_SERVICE = "mariana.billing.v1.BillingService"
ADMIN_GRPC_PREFIXES = {"auth": "/mariana.auth.v1.AuthAdminService/", "billing": "/mariana.billing.v1.BillingService/"}
CHAT_PATH = "/v1/chat/completions"
CHAT_STREAM_PATH = CHAT_PATH + ":stream"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"

# OpenAI serves streamed and unary chat on one path and tells them apart by the
# body's "stream" field; gRPC needs two methods. This sends a streaming request
# to the streaming method's path. A quote inside a JSON string is escaped
# (\"), so the pattern cannot match text inside a message.
# The edge's Lua: on requests, sends `"stream": true` chat bodies to the
# streaming RPC (OpenAI uses one path for both; gRPC needs two methods); on
# responses, turns the transcoder's error body ({"code", "message", "details"},
# google.rpc.Status as JSON) into OpenAI's error shape, with `code` from the
# ErrorInfo reason a service attached (e.g. insufficient_quota). Bodies that
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

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status") or "200"
  if tonumber(status) < 400 then
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
}


def _address(port: int, host: str = "127.0.0.1") -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _file(path: Path) -> DataSource:
    return DataSource(filename=str(path.resolve()))


def _tls_context(plan: Plan, peer_ids: list[str]) -> CommonTlsContext:
    certs = plan.certs[ENVOY_IDENTITY]
    sans = [
        SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=peer))
        for peer in peer_ids
    ]
    return CommonTlsContext(
        # gRPC servers refuse TLS without ALPN h2.
        alpn_protocols=["h2"],
        tls_certificates=[TlsCertificate(certificate_chain=_file(certs.cert), private_key=_file(certs.key))],
        validation_context=CertificateValidationContext(trusted_ca=_file(certs.ca), match_typed_subject_alt_names=sans),
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


def _retry_policy(service: Service) -> RetryPolicy:
    return RetryPolicy(
        retry_on=",".join(service.retry.retry_on),
        num_retries=service.retry.num_retries,
        per_try_timeout=service.retry.per_try_timeout,
    )


def _route_to(service_name: str, service: Service, match: RouteMatch) -> Route:
    return Route(
        match=match,
        route=RouteAction(cluster=service_name, timeout=service.timeout, retry_policy=_retry_policy(service)),
    )


def cluster(plan: Plan, name: str, service: Service) -> Cluster:
    endpoints = [LbEndpoint(endpoint=Endpoint(address=_address(port))) for port in plan.service_ports[name]]
    protocol = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
    )
    upstream_tls = UpstreamTlsContext(
        common_tls_context=_tls_context(plan, [plan.topology.spiffe_id(name)]), sni="localhost"
    )
    breaker = service.circuit_breaker
    outlier = service.outlier_detection
    health = service.health_check
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
        ),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(protocol)},
        transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(upstream_tls)),
        circuit_breakers=CircuitBreakers(
            thresholds=[
                CircuitBreakersThresholds(
                    max_connections=breaker.max_connections,
                    max_pending_requests=breaker.max_pending_requests,
                    max_requests=breaker.max_requests,
                    max_retries=breaker.max_retries,
                )
            ]
        ),
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
        proto_descriptor=str(plan.descriptor_set.resolve()),
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


def edge_listener(plan: Plan, auth: bool = True) -> Listener:
    services = plan.topology.services
    routes = [
        Route(
            match=RouteMatch(path=CHAT_STREAM_PATH),
            route=RouteAction(cluster="router", timeout=services["router"].timeout),
            typed_per_filter_config={TRANSCODER: Any.pack(_transcoder(plan, sse=True))},
        ),
        *[
            _route_to(name, services[name], RouteMatch(prefix=prefix))
            for name, prefix in ADMIN_GRPC_PREFIXES.items()
            if EDGE in services[name].callers
        ],
        _route_to("router", services["router"], RouteMatch(prefix=f"/{LLM_SERVICE}/")),
        _route_to("router", services["router"], RouteMatch(prefix="/v1/")),
        Route(
            match=RouteMatch(prefix="/"),
            direct_response=DirectResponseAction(
                status=404,
                body=DataSource(
                    inline_string=json.dumps(
                        {"error": {"message": "no such endpoint", "type": "invalid_request_error", "code": "not_found"}}
                    )
                ),
            ),
        ),
    ]
    ext_authz = ExtAuthz(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="auth"), timeout=plan.topology.edge.ext_authz_timeout
        ),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
    )
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
            _http_filter(TRANSCODER, _transcoder(plan, sse=False)),
            _http_filter("envoy.filters.http.router", Router()),
        ],
        access_log=_access_log("edge"),
    )
    return Listener(
        name="edge",
        address=_address(plan.edge_port),
        filter_chains=[FilterChain(filters=[_network_filter(manager)])],
    )


def _network_filter(manager: HttpConnectionManager) -> Filter:
    return Filter(name="envoy.filters.network.http_connection_manager", typed_config=Any.pack(manager))


def mesh_listener(plan: Plan, name: str, service: Service) -> Listener:
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
            virtual_hosts=[
                VirtualHost(name=name, domains=["*"], routes=[_route_to(name, service, RouteMatch(prefix="/"))])
            ],
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
        address=_address(plan.mesh_ports[name]),
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


def render_bootstrap(plan: Plan, edge_auth: bool = True) -> Bootstrap:
    """`edge_auth=False` drops ext_authz (and asserts an anonymous identity):
    for measuring what auth costs, never for serving."""
    services = plan.topology.services
    listeners = [edge_listener(plan, edge_auth)] + [
        mesh_listener(plan, name, s) for name, s in services.items() if name in plan.mesh_ports
    ]
    clusters = [cluster(plan, name, s) for name, s in services.items()]
    if plan.otlp_endpoint:
        clusters.append(collector_cluster(plan))
    return Bootstrap(
        admin=Admin(address=_address(plan.admin_port)),
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


def write_bootstrap(plan: Plan, path: Path, edge_auth: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_fix_json_names(render_bootstrap(plan, edge_auth).to_dict()), indent=1))
    return path
