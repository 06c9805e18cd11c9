"""Renders an Envoy bootstrap from a Plan, as typed envoy-data-plane objects.
One Envoy plays both parts:

- the edge listener (mesh/envoy_edge.py);
- one mesh listener per service that other services call (here): mTLS with a
  client certificate required, RBAC on the caller's SPIFFE identity. It takes
  gRPC over h2, and unary gRPC over HTTP/1.1, which its grpc_http1_bridge
  filter sends on as gRPC (mariana_common/http1_bridge.py is that client).

Every upstream cluster (mesh/envoy_parts.py) speaks h2 over mTLS with Envoy's
own identity (mesh/envoy_tls.py: SDS from files, so rotation needs no
restart), with the retry, breaker, outlier and health-check policy of the
topology. On Kubernetes (plan.service_dns) only the edge is rendered: Istio's
sidecars are the mesh."""

from __future__ import annotations

import json
from pathlib import Path

from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapStaticResources,
    LayeredRuntime,
    RuntimeLayer,
    RuntimeLayerAdminLayer,
)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import (
    Http1ProtocolOptions,
    Node,
    TransportSocket,
)
from envoy_data_plane.envoy.config.listener.v3 import FilterChain, Listener
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Policy,
    Principal,
    PrincipalAuthenticated,
    Rbac,
    RbacAction,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RouteConfiguration,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.grpc_http1_bridge.v3 import Config as GrpcHttp1Bridge
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    DownstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any

from mesh.envoy_edge import edge_listener, ext_authz_cluster
from mesh.envoy_parts import (
    GRPC_HTTP1_BRIDGE,
    access_log,
    address,
    cluster,
    collector_cluster,
    http_filter,
    network_filter,
    over_http1,
    service_routes,
    tracing,
)
from mesh.envoy_tls import tls_context, write_sds_files
from mesh.plan import Plan
from mesh.topology import EDGE, Service

# The bridge holds a whole answer, within the connection's buffer: 1 MiB unset,
# and 2,048 embeddings (~3 MB) or a long generation's logprobs are more. Past
# this, a clear error (the edge's transcoder holds 32 MiB of JSON).
MESH_BUFFER_BYTES = 32 * 1024 * 1024


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
        codec_type=HttpConnectionManagerCodecType.AUTO,  # by ALPN: h2, or HTTP/1.1 for the bridge
        # An HTTP/1.1 caller of a stream gets its status in chunked trailers.
        http_protocol_options=Http1ProtocolOptions(enable_trailers=True),
        tracing=tracing(plan, f"mesh-{name}"),
        route_config=RouteConfiguration(
            name=f"mesh_{name}",
            virtual_hosts=[
                VirtualHost(name=name, domains=["*"], routes=service_routes(plan, name, ["/"], streams_unbridged=True))
            ],
        ),
        http_filters=[
            http_filter("envoy.filters.http.rbac", rbac),
            # HTTP/1.1 requests with a gRPC message go upstream as gRPC; the
            # answer comes back whole, its trailers folded into its headers
            # (not on streams' routes: service_routes).
            http_filter(GRPC_HTTP1_BRIDGE, GrpcHttp1Bridge()),
            http_filter("envoy.filters.http.router", Router()),
        ],
        access_log=access_log(f"mesh_{name}", failures_only=True),
    )
    # The handshake only checks the CA; who may call is RBAC's decision, so a
    # known workload that may not call gets PERMISSION_DENIED, not a TLS error.
    tls = DownstreamTlsContext(
        common_tls_context=tls_context(plan, [], alpn=("h2", "http/1.1")), require_client_certificate=True
    )
    return Listener(
        name=f"mesh_{name}",
        address=address(plan.mesh_ports[name][index]),
        per_connection_buffer_limit_bytes=MESH_BUFFER_BYTES,
        filter_chains=[
            FilterChain(
                filters=[network_filter(manager)],
                transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(tls)),
            )
        ],
    )


def service_cluster(plan: Plan, name: str, service: Service) -> Cluster:
    """The service's replicas: over HTTP/1.1 where they serve it (`http1_port`), else h2 gRPC."""
    if name not in plan.http1_ports:
        return cluster(plan, name, service)
    base = cluster(plan, name, service, ports=plan.upstream_ports(name), alpn=("http/1.1",))
    return over_http1(base)


def render_bootstrap(plan: Plan, index: int = 0, edge_auth: bool = True) -> Bootstrap:
    """Envoy number `index` of the plan's Envoys (each has the edge listener
    and every mesh listener, on ports of its own). `edge_auth=False` drops
    ext_authz (and asserts an anonymous identity): for measuring what auth
    costs, never for serving."""
    services = plan.topology.services
    listeners = [edge_listener(plan, index, edge_auth)]
    if not plan.service_dns:  # on Kubernetes, Istio's sidecars are the mesh
        listeners += [mesh_listener(plan, name, s, index) for name, s in services.items() if name in plan.mesh_ports]
    clusters = [service_cluster(plan, name, s) for name, s in services.items()]
    if edge_auth and plan.topology.edge.ext_authz_api == "http":
        clusters.append(ext_authz_cluster(plan))
    if plan.otlp_endpoint:
        clusters.append(collector_cluster(plan))
    return Bootstrap(
        # SDS needs a node identity.
        node=Node(id=f"envoy-{index}", cluster="mariana-edge"),
        admin=Admin(address=address(plan.admin_ports[index])),
        # The runtime keys the config names (the inner hops' access-log
        # thresholds, say) can be changed on the admin port, without a restart:
        #   curl -X POST 'localhost:<admin>/runtime_modify?mesh_access_log.min_duration_ms=0'
        layered_runtime=LayeredRuntime(layers=[RuntimeLayer(name="admin", admin_layer=RuntimeLayerAdminLayer())]),
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
    return to_json(render_bootstrap(plan, index, edge_auth))


def to_json(message: object) -> str:
    return json.dumps(_fix_json_names(message.to_dict()), indent=1)  # type: ignore[attr-defined]


def write_bootstrap(plan: Plan, path: Path, index: int = 0, edge_auth: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sds_files(plan)
    path.write_text(bootstrap_json(plan, index, edge_auth))
    return path
