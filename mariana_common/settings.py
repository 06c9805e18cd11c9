"""Typed settings shared by every service. Each service subclasses
`ServiceSettings` with its own environment prefix and adds its own fields;
every variable is declared once, here or there, with a default and a comment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Calls a service's gRPC server holds before the service takes them. Past gRPC's
# own default, 1,000 waiting, it cancels some new calls (every one past 3,000),
# and the client reads CANCELLED, as if it had hung up: at 1,000 req/s offered
# to the edge, 6-30 calls in 8,000 ended so. In the mesh the limit is Envoy's
# breaker in front of each service (`max_requests`, 1,024 per Envoy by default),
# which answers UNAVAILABLE, a status clients retry; this stays above what the
# Envoys may send (mesh/topology.py checks the topology against it).
DEFAULT_MAX_PENDING_CALLS = 16_384


class ServiceSettings(BaseSettings):
    """Where a service listens and how it proves who it is."""

    model_config = SettingsConfigDict(env_prefix="MARIANA_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one.")
    tls: bool = Field(
        True, description="false: plaintext inside the pod, where a sidecar (Istio) does mTLS for the service."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate of this service (required with tls).")
    tls_key: Path | None = Field(None, description="PEM private key of this service (required with tls).")
    tls_ca: Path | None = Field(
        None, description="PEM CA that signs every certificate in the mesh (required with tls)."
    )
    tls_peers: list[str] = Field(
        default_factory=list,
        description="SPIFFE ids that may call this service (JSON list); empty: any certificate of the mesh CA.",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="Time in-flight calls get to finish on SIGTERM.")
    port_file: Path | None = Field(None, description="When set, the bound port is written here once serving.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics on `host` here; 0 turns it off.")
    otlp_endpoint: str = Field("", description="host:port of an OTLP/gRPC trace collector; empty: no tracing.")
    mesh_unary_http1: bool = Field(
        False,
        description="Unary calls to other services go as HTTP/1.1 requests that Envoy's mesh listener bridges to "
        "gRPC (half the caller's CPU); only where the targets are the local mesh's Envoys.",
    )
    http1_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve the gRPC methods over HTTP/1.1 here, for the local mesh's Envoy (a third of "
        "grpc.aio's CPU per call); unset: only the gRPC port.",
    )
    max_pending_calls: int = Field(
        DEFAULT_MAX_PENDING_CALLS,
        gt=0,
        description="Calls the gRPC server holds waiting for the service; past it gRPC cancels some (all past 2x).",
    )

    @model_validator(mode="after")
    def _tls_files(self) -> ServiceSettings:
        if self.tls and (self.tls_cert is None or self.tls_key is None or self.tls_ca is None):
            raise ValueError("tls needs tls_cert, tls_key and tls_ca (or tls=false behind a sidecar)")
        return self

    def tls_files(self) -> tuple[Path, Path, Path]:
        assert self.tls_cert is not None and self.tls_key is not None and self.tls_ca is not None
        return self.tls_cert, self.tls_key, self.tls_ca


class RedisSettings(BaseSettings):
    """Where the platform's shared ephemeral state lives (usage stream, rate limits)."""

    model_config = SettingsConfigDict(env_prefix="MARIANA_", extra="ignore", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The Redis every service shares.")
