"""The typed form of topology.yaml. Defaults here are the policy a service gets
when the file says nothing about it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from mariana_common.settings import DEFAULT_MAX_PENDING_CALLS

DEFAULT_FILE = Path(__file__).with_name("topology.yaml")
EDGE = "edge"


def _parse_duration(value: object) -> object:
    """Envoy's style: "1.5s" or "250ms"."""
    if isinstance(value, str):
        if value.endswith("ms"):
            return timedelta(milliseconds=float(value[:-2]))
        if value.endswith("s"):
            return timedelta(seconds=float(value[:-1]))
        raise ValueError(f"duration {value!r} must end in 's' or 'ms'")
    return value


Duration = Annotated[timedelta, BeforeValidator(_parse_duration)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(Strict):
    retry_on: list[str] = Field(default_factory=lambda: ["connect-failure", "refused-stream"])
    num_retries: int = Field(1, ge=0, le=10)
    per_try_timeout: Duration | None = None
    # Jittered exponential back-off between tries.
    backoff_base: Duration = timedelta(milliseconds=25)
    backoff_max: Duration = timedelta(milliseconds=250)


class RetryBudget(Strict):
    """Retries allowed as a share of the requests in flight (Envoy's retry
    budget): a failing upstream is not hit with num_retries times its load."""

    budget_percent: float = Field(20.0, gt=0, le=100)
    min_retry_concurrency: int = Field(10, ge=0)


class CircuitBreaker(Strict):
    max_connections: int = Field(1024, gt=0)
    max_pending_requests: int = Field(1024, gt=0)
    max_requests: int = Field(1024, gt=0)
    # Envoy ignores max_retries when a retry budget is set.
    max_retries: int = Field(3, ge=0)
    retry_budget: RetryBudget | None = Field(default_factory=RetryBudget)


class OutlierDetection(Strict):
    consecutive_5xx: int = Field(5, gt=0)
    consecutive_gateway_failure: int = Field(3, gt=0)
    interval: Duration = timedelta(seconds=5)
    base_ejection_time: Duration = timedelta(seconds=15)
    max_ejection_percent: int = Field(50, ge=0, le=100)


class HealthCheck(Strict):
    interval: Duration = timedelta(seconds=5)
    timeout: Duration = timedelta(seconds=1)
    unhealthy_threshold: int = Field(2, gt=0)
    healthy_threshold: int = Field(1, gt=0)


class Resources(Strict):
    """A pod's requests and limits on Kubernetes."""

    cpu: str = "250m"
    memory: str = "256Mi"
    memory_limit: str = "512Mi"


class Autoscaling(Strict):
    """The HPA on Kubernetes: CPU, and optionally a per-pod queue metric the
    service exports (served to the HPA by a custom-metrics adapter)."""

    max_replicas: int = Field(4, ge=1)
    cpu_utilization: int = Field(70, gt=0, le=100)
    queue_metric: str | None = None
    queue_target: int = Field(4, gt=0)


class Service(Strict):
    # Which service program runs it (a package under services/); default: the
    # service's own name. Two deployments of one program (say a primary and a
    # fallback model pool of inference) are two services with one program.
    program: str | None = None
    # Settings of this deployment, as the program's environment variables
    # without their prefix (e.g. MODEL_ID for MARIANA_INFERENCE_MODEL_ID).
    settings: dict[str, str] = Field(default_factory=dict)
    # The proto package it serves (e.g. mariana.llm.v1): which of its methods
    # may be retried comes from the protos' `idempotency_level` options.
    api: str
    port: int = Field(..., ge=0, le=65535)
    mesh_port: int | None = Field(None, ge=0, le=65535)
    # Where the service also serves its methods over HTTP/1.1 (replica i on
    # + 10 * i): the local Envoy's cluster for it connects there, a third of
    # grpc.aio's server CPU per call (mariana_common/grpc_http1_server.py).
    # Unset: Envoy speaks h2 gRPC to `port`. Kubernetes always does (Istio).
    http1_port: int | None = Field(None, ge=0, le=65535)
    replicas: int = Field(1, ge=1)
    callers: list[str] = Field(default_factory=list)
    timeout: Duration = timedelta(seconds=30)
    lb_policy: Literal["least_request", "round_robin", "random"] = "least_request"
    # Every method: only failures that prove the request never reached a
    # replica. Idempotent methods (declared in the protos): `idempotent_retry`.
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    idempotent_retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(
            retry_on=["unavailable", "resource-exhausted", "reset", "connect-failure", "refused-stream"],
            num_retries=2,
        )
    )
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection)
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    resources: Resources = Field(default_factory=Resources)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    # Its work is off the request path (billing's ledger batches): on one
    # machine the launcher runs it at a lower CPU priority, so its batches
    # wait for requests rather than requests for them.
    background: bool = False

    def program_of(self, name: str) -> str:
        return self.program or name


class TenantRateLimit(Strict):
    """A per-tenant token bucket in each Envoy: a backstop under auth's own
    per-key and per-tenant limits (it holds even when auth fails open)."""

    requests_per_second: int = Field(..., gt=0)
    burst: int = Field(..., gt=0)


class Edge(Strict):
    port: int = Field(8080, ge=0, le=65535)
    admin_port: int = Field(9901, ge=0, le=65535)
    # Envoy processes; each has the edge listener and every mesh listener
    # (Envoy i listens on port + 100 * i).
    replicas: int = Field(1, ge=1)
    # How Envoy asks auth about each request: plain HTTP/1.1 to auth's own
    # small server on ext_authz_port (replica i on + 10 * i), ~0.3 ms of CPU
    # less per request than gRPC `Authorization/Check` on auth's gRPC port.
    ext_authz_api: Literal["grpc", "http"] = "http"
    ext_authz_port: int = Field(7106, ge=0, le=65535)
    ext_authz_timeout: Duration = timedelta(milliseconds=500)
    # Connections each Envoy keeps to auth's HTTP check (one check at a time on
    # each, HTTP/1.1): more concurrent checks wait in Envoy for a free one (a
    # check takes about a millisecond) instead of opening a connection each. A
    # burst of hundreds of new mTLS handshakes at once kept auth busy past the
    # per-try timeout, and the retries and an outlier ejection made it 503s.
    ext_authz_connections: int = Field(32, gt=0)
    # Check only reads keys and takes a request from the caller's buckets: a
    # repeat after a crashed auth replica costs at most one extra request.
    ext_authz_retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(
            retry_on=["reset", "connect-failure", "refused-stream"],
            num_retries=2,
            # the whole check has ext_authz_timeout: retries must come quickly.
            # Envoy's gRPC client also takes backoff_max as each try's timeout,
            # so it is half of ext_authz_timeout: one slow try leaves time for another.
            backoff_base=timedelta(milliseconds=5),
            backoff_max=timedelta(milliseconds=250),
        )
    )
    tenant_rate_limit: TenantRateLimit | None = None


class Redis(Strict):
    port: int = Field(0, ge=0, le=65535)


class Topology(Strict):
    trust_domain: str
    edge: Edge = Field(default_factory=Edge)
    redis: Redis = Field(default_factory=Redis)
    services: dict[str, Service]

    @model_validator(mode="after")
    def _callers_exist(self) -> Topology:
        for name, service in self.services.items():
            for caller in service.callers:
                if caller != EDGE and caller not in self.services:
                    raise ValueError(f"{name}: unknown caller {caller!r}")
            mesh_callers = [c for c in service.callers if c != EDGE]
            if mesh_callers and service.mesh_port is None:
                raise ValueError(f"{name}: called by {mesh_callers} but has no mesh_port")
        self._check_backlogs()
        return self

    def _check_backlogs(self) -> None:
        """Every Envoy may have a service's breaker-full of calls in flight to
        it; more than its gRPC server holds waiting, and gRPC cancels calls
        that Envoy would have refused with a status clients retry."""
        for name, service in self.services.items():
            in_flight = self.edge.replicas * service.circuit_breaker.max_requests
            held = int(service.settings.get("MAX_PENDING_CALLS", DEFAULT_MAX_PENDING_CALLS))
            if in_flight > held:
                raise ValueError(
                    f"{name}: {self.edge.replicas} Envoys x circuit_breaker.max_requests "
                    f"{service.circuit_breaker.max_requests} = {in_flight} calls in flight, more than its gRPC "
                    f"server holds (MAX_PENDING_CALLS {held})"
                )

    def spiffe_id(self, identity: str) -> str:
        return f"spiffe://{self.trust_domain}/{identity}"

    def with_replicas(self, replicas: dict[str, int]) -> Topology:
        """The same topology with other replica counts ("edge" = Envoys)."""
        unknown = set(replicas) - {EDGE, *self.services}
        if unknown:
            raise ValueError(f"replicas for unknown services: {sorted(unknown)}")
        if any(count < 1 for count in replicas.values()):
            raise ValueError(f"replica counts must be at least 1: {replicas}")
        services = {
            name: s.model_copy(update={"replicas": replicas[name]}) if name in replicas else s
            for name, s in self.services.items()
        }
        edge = self.edge.model_copy(update={"replicas": replicas.get(EDGE, self.edge.replicas)})
        topology = self.model_copy(update={"services": services, "edge": edge})
        topology._check_backlogs()
        return topology

    def with_settings(self, settings: dict[str, dict[str, str]]) -> Topology:
        """The same topology with more settings per service (names without
        the program's prefix), over the file's."""
        unknown = set(settings) - set(self.services)
        if unknown:
            raise ValueError(f"settings for unknown services: {sorted(unknown)}")
        services = {
            name: s.model_copy(update={"settings": {**s.settings, **settings[name]}}) if name in settings else s
            for name, s in self.services.items()
        }
        return self.model_copy(update={"services": services})


def load_topology(path: Path = DEFAULT_FILE) -> Topology:
    return Topology.model_validate(yaml.safe_load(path.read_text()))
