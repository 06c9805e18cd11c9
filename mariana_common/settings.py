"""Typed settings shared by every service. Each service subclasses
`ServiceSettings` with its own environment prefix and adds its own fields;
every variable is declared once, here or there, with a default and a comment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Where a service listens and how it proves who it is."""

    model_config = SettingsConfigDict(env_prefix="MARIANA_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one.")
    tls_cert: Path = Field(..., description="PEM certificate of this service.")
    tls_key: Path = Field(..., description="PEM private key of this service.")
    tls_ca: Path = Field(..., description="PEM CA that signs every certificate in the mesh.")
    tls_peers: list[str] = Field(
        default_factory=list,
        description="SPIFFE ids that may call this service (JSON list); empty: any certificate of the mesh CA.",
    )
    log_level: str = Field("info", description="debug, info, warning or error.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="Time in-flight calls get to finish on SIGTERM.")
    port_file: Path | None = Field(None, description="When set, the bound port is written here once serving.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics on 127.0.0.1 here; 0 turns it off.")
    otlp_endpoint: str = Field("", description="host:port of an OTLP/gRPC trace collector; empty: no tracing.")


class RedisSettings(BaseSettings):
    """Where the platform's shared ephemeral state lives (usage stream, rate limits)."""

    model_config = SettingsConfigDict(env_prefix="MARIANA_", extra="ignore", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The Redis every service shares.")
