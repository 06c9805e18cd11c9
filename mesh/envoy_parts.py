"""The pieces every Envoy listener and cluster of the mesh is built from:
access logs, retry policies and per-method routes, clusters with the
topology's breakers, outlier detection and health checks, and tracing."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

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
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    CircuitBreakersThresholdsRetryBudget,
    Cluster,
    ClusterDiscoveryType,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.cluster.v3 import OutlierDetection as EnvoyOutlierDetection
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter
from envoy_data_plane.envoy.config.route.v3 import (
    FilterConfig,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteMatch,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate as PreviousHosts
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Any, Struct, Value

from mariana_common.http1_wire import HEALTH_PATH
from mesh.api import idempotent_paths, streaming_paths
from mesh.envoy_tls import tls_context
from mesh.plan import Plan
from mesh.topology import RetryPolicy as TopologyRetry
from mesh.topology import Service

ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "flags": "%RESPONSE_FLAGS%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "route": "%ROUTE_NAME%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    # Where a request's time went, in µs: from its first byte until it went
    # upstream (at the edge: auth's check, the transcoder, the Lua), and from
    # there until the upstream's answer had come back whole.
    "start_s": "%START_TIME(%s.%6f)%",
    "before_upstream_us": "%COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)%",
    "upstream_us": "%COMMON_DURATION(US_TX_BEG:US_RX_END:us)%",
    "duration_us": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
}


def address(port: int, host: str = "127.0.0.1") -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


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


def access_log(name: str, failures_only: bool = False) -> list[AccessLog]:
    fields = {k: Value(string_value=v) for k, v in {**ACCESS_LOG_FIELDS, "listener": name}.items()}
    stdout = StdoutAccessLog(log_format=SubstitutionFormatString(json_format=Struct(fields=fields)))
    log_filter = _failures_only() if failures_only else None
    return [AccessLog(name="envoy.access_loggers.stdout", filter=log_filter, typed_config=Any.pack(stdout))]


def http_filter(name: str, config: object) -> HttpFilter:
    return HttpFilter(name=name, typed_config=Any.pack(config))  # type: ignore[arg-type]


PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
# How often a retry may pick again when it drew a replica already tried. Least
# request prefers a dead replica (it has no requests in flight): of two draws
# among two replicas, 3 in 4 include it, so 3 picks found the live one only
# 58% of the time (the kill test failed now and then); 12 picks: 97%.
HOST_SELECTION_ATTEMPTS = 12


def retry_policy(policy: TopologyRetry) -> RetryPolicy:
    return RetryPolicy(
        retry_on=",".join(policy.retry_on),
        num_retries=policy.num_retries,
        per_try_timeout=policy.per_try_timeout,
        retry_back_off=RetryPolicyRetryBackOff(base_interval=policy.backoff_base, max_interval=policy.backoff_max),
        # A retry goes to another replica when there is one.
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(name=PREVIOUS_HOSTS, typed_config=Any.pack(PreviousHosts()))
        ],
        host_selection_retry_max_attempts=HOST_SELECTION_ATTEMPTS,
    )


def _route_to(service_name: str, service: Service, match: RouteMatch, policy: TopologyRetry, name: str) -> Route:
    return Route(
        name=name,
        match=match,
        route=RouteAction(cluster=service_name, timeout=service.timeout, retry_policy=retry_policy(policy)),
    )


GRPC_HTTP1_BRIDGE = "envoy.filters.http.grpc_http1_bridge"


def service_routes(plan: Plan, name: str, prefixes: list[str], streams_unbridged: bool = False) -> list[Route]:
    """One route per idempotent method (with `idempotent_retry`), then the
    service's `prefixes` with the retry every method may have.
    `streams_unbridged`: the server-streaming methods' routes turn off the
    HTTP/1.1 bridge (an HTTP/1.1 caller of a stream reads its messages as they
    come and the status in the trailers; the bridge would hold it whole)."""
    service = plan.topology.services[name]
    idempotent = set(idempotent_paths(plan.descriptor_set, service.api))
    streams = set(streaming_paths(plan.descriptor_set, service.api)) if streams_unbridged else set()
    exact = []
    for path in sorted(idempotent | streams):
        if not any(path.startswith(prefix) for prefix in prefixes):
            continue
        policy = service.idempotent_retry if path in idempotent else service.retry
        route = _route_to(name, service, RouteMatch(path=path), policy, f"{name}{path}")
        if path in streams:
            route.typed_per_filter_config = {GRPC_HTTP1_BRIDGE: Any.pack(FilterConfig(disabled=True))}
        exact.append(route)
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


def _upstream(
    plan: Plan, name: str, ports: list[int], alpn: tuple[str, ...]
) -> tuple[ClusterDiscoveryType, list[LbEndpoint], TransportSocket | None]:
    """Locally: each replica's port, over mTLS as Envoy. On Kubernetes: the
    service's DNS name in plaintext to the pod's sidecar, which does mTLS."""
    if plan.service_dns:
        dns = address(ports[0], f"{name}.{plan.service_dns}")
        return ClusterDiscoveryType.STRICT_DNS, [LbEndpoint(endpoint=Endpoint(address=dns))], None
    endpoints = [LbEndpoint(endpoint=Endpoint(address=address(port))) for port in ports]
    upstream_tls = UpstreamTlsContext(
        common_tls_context=tls_context(plan, [plan.topology.spiffe_id(name)], alpn), sni="localhost"
    )
    tls = TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(upstream_tls))
    return ClusterDiscoveryType.STATIC, endpoints, tls


def cluster(
    plan: Plan,
    name: str,
    service: Service,
    *,
    ports: list[int] | None = None,
    cluster_name: str | None = None,
    alpn: tuple[str, ...] = ("h2",),
) -> Cluster:
    """Service `name`'s replicas (on `ports`, by default its gRPC ports), as
    the cluster `cluster_name` (by default `name`), offering `alpn` in TLS."""
    ports = plan.service_ports[name] if ports is None else ports
    discovery, endpoints, transport_socket = _upstream(plan, name, ports, alpn)
    cluster_name = cluster_name or name
    protocol = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
    )
    outlier = service.outlier_detection
    health = service.health_check
    return Cluster(
        name=cluster_name,
        type=discovery,
        connect_timeout=timedelta(seconds=1),
        lb_policy=_LB_POLICIES[service.lb_policy],
        load_assignment=ClusterLoadAssignment(
            cluster_name=cluster_name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)]
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


def over_http1(base: Cluster, max_connections: int | None = None) -> Cluster:
    """`base` (a service's cluster) spoken to in HTTP/1.1 with trailers (which
    carry gRPC's status), its health from `GET /healthz`. One request per
    connection at a time, so `max_connections` (default: the breaker's, at
    most its `max_requests`) is how many are in flight: past it requests wait
    in Envoy's pending queue, which is cheap, rather than in a storm of new
    TLS connections to a service that is already behind."""
    http1 = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions(enable_trailers=True)
        )
    )
    health = [
        replace(check, grpc_health_check=None, http_health_check=HealthCheckHttpHealthCheck(path=HEALTH_PATH))
        for check in base.health_checks
    ]
    assert base.circuit_breakers is not None
    limits = []
    for t in base.circuit_breakers.thresholds:
        assert t.max_connections is not None and t.max_requests is not None  # `_thresholds` sets both
        cap = max_connections if max_connections is not None else min(t.max_connections, t.max_requests)
        limits.append(replace(t, max_connections=cap))
    return replace(
        base,
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(http1)},
        health_checks=health,
        circuit_breakers=replace(base.circuit_breakers, thresholds=limits),
    )


def network_filter(manager: HttpConnectionManager) -> Filter:
    return Filter(name="envoy.filters.network.http_connection_manager", typed_config=Any.pack(manager))


COLLECTOR = "opentelemetry_collector"


def tracing(plan: Plan, name: str) -> HttpConnectionManagerTracing | None:
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
    endpoint = LbEndpoint(endpoint=Endpoint(address=address(int(port), host)))
    return Cluster(
        name=COLLECTOR,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        load_assignment=ClusterLoadAssignment(
            cluster_name=COLLECTOR, endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]
        ),
        typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(protocol)},
    )
