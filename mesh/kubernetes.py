"""The same mesh on Kubernetes + Istio, rendered from the same topology file.

Per service: a ServiceAccount (its workload identity: Istio's principal
`<trust domain>/ns/<namespace>/sa/<service>`), a Deployment (probes on
grpc.health.v1, resources, plaintext to its sidecar), a Service, an HPA (CPU,
and a queue metric where the topology names one), a PodDisruptionBudget, an
AuthorizationPolicy (the topology's callers, nobody else), a DestinationRule
(load balancing, connection pool = circuit breaker, outlier detection, Istio
mTLS) and a VirtualService (timeouts, and the retries of each method as the
protos declare it). For the namespace: PeerAuthentication STRICT. The edge is
the same Envoy as locally (ext_authz, transcoder, Lua, tenant rate limit),
its bootstrap rendered by mesh/envoy_config.py with DNS upstreams, in the
mesh with a sidecar of its own; a LoadBalancer Service in front.

    python -m mesh.kubernetes --out build/kubernetes [--images images.json]
        [--image-digest PROGRAM=FILE ...] [--repository mariana]

`images.json` maps program -> image reference; `--image-digest` reads the
digest Bazel wrote for a program's image (`bazel build //deploy:kubernetes`
does this for every service), giving `<repository>/<program>@sha256:...`."""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mesh.api import idempotent_paths
from mesh.envoy_config import bootstrap_json
from mesh.plan import Plan, make_plan
from mesh.topology import EDGE, RetryPolicy, Service, Topology, load_topology
from mesh.wiring import shared_engine_settings, upstream_settings

Manifest = dict[str, Any]

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "mariana"
EDGE_PORT = 8080
ENVOY_ADMIN_PORT = 9901
METRICS_PORT = 9090
DESCRIPTOR_MOUNT = "/etc/mariana/descriptors"
MODELS_MOUNT = "/models"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
# Istio's retry conditions for gRPC are the same words as Envoy's.
_LB = {"least_request": "LEAST_REQUEST", "round_robin": "ROUND_ROBIN", "random": "RANDOM"}


def _seconds(delta: Any) -> str:
    return f"{delta.total_seconds():g}s"


def _meta(name: str, namespace: str, **labels: str) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "mariana", **labels}}


class Renderer:
    def __init__(self, topology: Topology, descriptor_set: Path, images: dict[str, str], namespace: str) -> None:
        self.topology = topology
        self.descriptor_set = descriptor_set
        self.images = images
        self.namespace = namespace

    def dns(self, service: str) -> str:
        return f"{service}.{self.namespace}.svc.cluster.local"

    def principal(self, identity: str) -> str:
        return f"{self.topology.trust_domain}/ns/{self.namespace}/sa/{identity}"

    def image(self, program: str) -> str:
        return self.images.get(program, f"mariana/{program}:dev")

    # -- one service ------------------------------------------------------

    def env(self, name: str, service: Service) -> list[Manifest]:
        program = service.program_of(name)
        prefix = f"MARIANA_{program.upper()}_"
        target: Callable[[str], str] = lambda upstream: f"{self.dns(upstream)}:{self.topology.services[upstream].port}"  # noqa: E731
        values = {
            "HOST": "0.0.0.0",
            "PORT": str(service.port),
            "TLS": "false",  # the sidecar does mTLS
            "METRICS_PORT": str(METRICS_PORT),
            **upstream_settings(self.topology, name, target),
            **self._program_settings(program),
            **service.settings,
        }
        env: list[Manifest] = [{"name": prefix + key, "value": value} for key, value in values.items()]
        env += [{"name": key, "value": value} for key, value in shared_engine_settings(self.topology, program).items()]
        env.append({"name": "MARIANA_REDIS_URL", "value": f"redis://redis.{self.namespace}.svc.cluster.local:6379/0"})
        if program in ("auth", "billing"):
            secret = {"secretKeyRef": {"name": "mariana-databases", "key": program}}
            env.append({"name": prefix + "DATABASE", "valueFrom": secret})
        if program == "auth":
            env.append(
                {"name": "MARIANA_MASTER_KEY", "valueFrom": {"secretKeyRef": {"name": "mariana-admin", "key": "key"}}}
            )
        return env

    def _program_settings(self, program: str) -> dict[str, str]:
        model = f"{MODELS_MOUNT}/smollm2-135m-instruct"
        settings: dict[str, dict[str, str]] = {
            "inference": {"MODEL_DIR": model, "BACKEND": "deepspeed"},
            "router": {"TOKENIZER_DIR": model, "SPOOL_FILE": "/var/spool/mariana/usage.jsonl"},
            "auth": {"EXT_AUTHZ_PORT": str(self.topology.edge.ext_authz_port)},
        }
        return settings.get(program, {})

    def extra_ports(self, program: str) -> list[Manifest]:
        """auth serves Envoy's HTTP ext_authz check on a port of its own."""
        if program != "auth":
            return []
        return [{"name": "http-ext-authz", "containerPort": self.topology.edge.ext_authz_port, "protocol": "TCP"}]

    def deployment(self, name: str, service: Service) -> Manifest:
        program = service.program_of(name)
        probe = {"grpc": {"port": service.port}, "periodSeconds": 5, "timeoutSeconds": 2}
        container: Manifest = {
            "name": program,
            "image": self.image(program),
            "ports": [
                {"name": "grpc", "containerPort": service.port, "protocol": "TCP"},
                {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                *self.extra_ports(program),
            ],
            "env": self.env(name, service),
            "readinessProbe": probe,
            "livenessProbe": {**probe, "failureThreshold": 6},
            # Loading a model takes a while: liveness waits for start-up.
            "startupProbe": {**probe, "failureThreshold": 60},
            "resources": {
                "requests": {"cpu": service.resources.cpu, "memory": service.resources.memory},
                "limits": {"memory": service.resources.memory_limit},
            },
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
        volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
        if program in ("inference", "router"):
            container["volumeMounts"].append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})
            volumes.append(
                {"name": "models", "persistentVolumeClaim": {"claimName": "mariana-models", "readOnly": True}}
            )
        if program == "router":
            container["volumeMounts"].append({"name": "spool", "mountPath": "/var/spool/mariana"})
            volumes.append({"name": "spool", "emptyDir": {}})
        labels = {"app": name, "app.kubernetes.io/name": name}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, self.namespace, **labels),
            "spec": {
                "replicas": service.replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(METRICS_PORT),
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
                        # the shutdown grace the service drains in, and some
                        "terminationGracePeriodSeconds": 45,
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }

    def service(self, name: str, service: Service) -> Manifest:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(name, self.namespace, app=name),
            "spec": {
                "selector": {"app": name},
                # "grpc" tells Istio the protocol
                "ports": [
                    {"name": "grpc", "port": service.port, "targetPort": service.port, "appProtocol": "grpc"},
                    *(
                        {
                            "name": p["name"],
                            "port": p["containerPort"],
                            "targetPort": p["containerPort"],
                            "appProtocol": "http",
                        }
                        for p in self.extra_ports(service.program_of(name))
                    ),
                ],
            },
        }

    def autoscaler(self, name: str, service: Service) -> Manifest:
        scaling = service.autoscaling
        metrics: list[Manifest] = [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": scaling.cpu_utilization},
                },
            }
        ]
        if scaling.queue_metric:
            metrics.append(
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": scaling.queue_metric},
                        "target": {"type": "AverageValue", "averageValue": str(scaling.queue_target)},
                    },
                }
            )
        return {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": _meta(name, self.namespace, app=name),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": service.replicas,
                "maxReplicas": max(service.replicas, scaling.max_replicas),
                "metrics": metrics,
            },
        }

    def disruption_budget(self, name: str) -> Manifest:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(name, self.namespace, app=name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": name}}},
        }

    def authorization(self, name: str, service: Service) -> Manifest:
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": _meta(name, self.namespace, app=name),
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": [self.principal(c) for c in service.callers]}}]}],
            },
        }

    def destination_rule(self, name: str, service: Service) -> Manifest:
        breaker, outlier = service.circuit_breaker, service.outlier_detection
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": _meta(name, self.namespace, app=name),
            "spec": {
                "host": self.dns(name),
                "trafficPolicy": {
                    "loadBalancer": {"simple": _LB[service.lb_policy]},
                    "connectionPool": {
                        "tcp": {"maxConnections": breaker.max_connections, "connectTimeout": "1s"},
                        "http": {
                            "http1MaxPendingRequests": breaker.max_pending_requests,
                            "http2MaxRequests": breaker.max_requests,
                            "maxRetries": breaker.max_retries,
                        },
                    },
                    "outlierDetection": {
                        "consecutive5xxErrors": outlier.consecutive_5xx,
                        "consecutiveGatewayErrors": outlier.consecutive_gateway_failure,
                        "interval": _seconds(outlier.interval),
                        "baseEjectionTime": _seconds(outlier.base_ejection_time),
                        "maxEjectionPercent": outlier.max_ejection_percent,
                    },
                    "tls": {"mode": "ISTIO_MUTUAL"},
                },
            },
        }

    def _http_route(self, name: str, service: Service, retry: RetryPolicy, match: Manifest | None) -> Manifest:
        retries: Manifest = {"attempts": retry.num_retries, "retryOn": ",".join(retry.retry_on)}
        if retry.per_try_timeout is not None:
            retries["perTryTimeout"] = _seconds(retry.per_try_timeout)
        route: Manifest = {
            "route": [{"destination": {"host": self.dns(name), "port": {"number": service.port}}}],
            "timeout": _seconds(service.timeout),
            "retries": retries,
        }
        return {"match": [match], **route} if match else route

    def virtual_service(self, name: str, service: Service) -> Manifest:
        exact = [
            self._http_route(name, service, service.idempotent_retry, {"uri": {"exact": path}})
            for path in idempotent_paths(self.descriptor_set, service.api)
        ]
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": _meta(name, self.namespace, app=name),
            "spec": {
                "hosts": [self.dns(name)],
                "http": [*exact, self._http_route(name, service, service.retry, None)],
            },
        }

    # -- the edge and the namespace ----------------------------------------

    def edge_plan(self) -> Plan:
        plan = make_plan(self.topology, self.descriptor_set, any_ports=False)
        return replace(
            plan,
            edge_ports=[EDGE_PORT],
            ext_authz_ports=[self.topology.edge.ext_authz_port],
            admin_ports=[ENVOY_ADMIN_PORT],
            service_ports={name: [s.port] for name, s in self.topology.services.items()},
            http1_ports={},  # h2 to Istio's sidecars: the services serve gRPC only
            service_dns=f"{self.namespace}.svc.cluster.local",
            listen_host="0.0.0.0",
            descriptor_mount=f"{DESCRIPTOR_MOUNT}/mariana.pb",
        )

    def edge(self) -> list[Manifest]:
        bootstrap = bootstrap_json(self.edge_plan())
        descriptors = base64.b64encode(self.descriptor_set.read_bytes()).decode()
        replicas = self.topology.edge.replicas
        labels = {"app": EDGE, "app.kubernetes.io/name": EDGE}
        probe = {"tcpSocket": {"port": EDGE_PORT}, "periodSeconds": 5}
        container = {
            "name": "envoy",
            "image": self.images.get("envoy", ENVOY_IMAGE),
            "args": ["-c", "/etc/envoy/envoy.json", "--log-level", "warn"],
            "ports": [{"name": "http", "containerPort": EDGE_PORT, "protocol": "TCP"}],
            "readinessProbe": probe,
            "livenessProbe": {**probe, "failureThreshold": 6},
            "resources": {"requests": {"cpu": "500m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
            "volumeMounts": [
                {"name": "bootstrap", "mountPath": "/etc/envoy", "readOnly": True},
                {"name": "descriptors", "mountPath": DESCRIPTOR_MOUNT, "readOnly": True},
            ],
        }
        edge_service = Service(api="mariana.llm.v1", port=EDGE_PORT, replicas=replicas)
        return [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(EDGE, self.namespace, app=EDGE)},
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta("edge-envoy", self.namespace, app=EDGE),
                "data": {"envoy.json": bootstrap},
            },
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta("mariana-descriptors", self.namespace, app=EDGE),
                "binaryData": {"mariana.pb": descriptors},
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": _meta(EDGE, self.namespace, **labels),
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": EDGE}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "serviceAccountName": EDGE,
                            "securityContext": {"runAsNonRoot": True, "runAsUser": 10101},
                            "containers": [container],
                            "volumes": [
                                {"name": "bootstrap", "configMap": {"name": "edge-envoy"}},
                                {"name": "descriptors", "configMap": {"name": "mariana-descriptors"}},
                            ],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(EDGE, self.namespace, app=EDGE),
                "spec": {
                    "type": "LoadBalancer",
                    "selector": {"app": EDGE},
                    "ports": [{"name": "http", "port": EDGE_PORT, "targetPort": EDGE_PORT, "appProtocol": "http"}],
                },
            },
            self.autoscaler(EDGE, edge_service),
            self.disruption_budget(EDGE),
        ]

    def render(self) -> list[Manifest]:
        manifests: list[Manifest] = [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": self.namespace, "labels": {"istio-injection": "enabled"}},
            },
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": _meta("default", self.namespace),
                "spec": {"mtls": {"mode": "STRICT"}},
            },
        ]
        for name, service in self.topology.services.items():
            manifests += [
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, self.namespace, app=name)},
                self.deployment(name, service),
                self.service(name, service),
                self.autoscaler(name, service),
                self.disruption_budget(name),
                self.authorization(name, service),
                self.destination_rule(name, service),
                self.virtual_service(name, service),
            ]
        return manifests + self.edge()


def render(
    topology: Topology, descriptor_set: Path, images: dict[str, str] | None = None, namespace: str = NAMESPACE
) -> list[Manifest]:
    return Renderer(topology, descriptor_set, images or {}, namespace).render()


def write(manifests: list[Manifest], out: Path) -> Path:
    """One multi-document YAML file, in apply order."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mariana.yaml"
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "kubernetes")
    parser.add_argument("--topology", type=Path, default=None)
    parser.add_argument("--descriptor-set", type=Path, default=REPO / "build" / "mariana.pb")
    parser.add_argument("--images", type=Path, default=None, help="JSON: program -> image reference")
    parser.add_argument("--image-digest", action="append", default=[], metavar="PROGRAM=FILE")
    parser.add_argument("--repository", default="mariana", help="where the images are pushed, e.g. registry/mariana")
    parser.add_argument("--namespace", default=NAMESPACE)
    args = parser.parse_args()
    topology = load_topology(args.topology) if args.topology else load_topology()
    images = json.loads(args.images.read_text()) if args.images else {}
    for pair in args.image_digest:
        program, _, digest_file = pair.partition("=")
        images[program] = f"{args.repository}/{program}@{Path(digest_file).read_text().strip()}"
    path = write(render(topology, args.descriptor_set, images, args.namespace), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
