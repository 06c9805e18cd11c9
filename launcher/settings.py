from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent


class LauncherSettings(BaseSettings):
    """How `make run` (and the end-to-end tests) start the platform."""

    model_config = SettingsConfigDict(env_prefix="MARIANA_", extra="ignore", frozen=True)

    data_dir: Path = Field(REPO / ".data", description="Databases, certificates, logs and the model live here.")
    edge_port: int | None = Field(None, ge=0, le=65535, description="Edge port; default from mesh/topology.yaml.")
    any_ports: bool = Field(False, description="Pick free ports for everything but the edge (tests).")
    master_key: SecretStr | None = Field(None, description="Admin API key; lets scripts start with no other step.")
    model_dir: Path | None = Field(None, description="Checkpoint directory; default data_dir/models/<default model>.")
    inference_backend: Literal["deepspeed", "torch", "torch-int8", "echo"] = Field(
        "deepspeed", description="Inference backend; echo (no model, for measuring the platform) is never the default."
    )
    log_level: str = Field("info", description="Log level of every service.")
    edge_auth: bool = Field(
        True, description="false drops ext_authz at the edge: for measuring auth's cost only, never for serving."
    )
    topology_file: Path = Field(
        REPO / "mesh" / "topology.yaml", description="The mesh's topology (services, replicas)."
    )
    replicas: dict[str, int] = Field(
        default_factory=dict,
        description='Replica counts over the topology\'s, e.g. {"router": 2, "inference": 2, "auth": 2, "edge": 2}.',
    )
    service_settings: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description='Settings per service over the topology\'s, e.g. {"router": {"MODERATION": "service"}}.',
    )
    cert_rotation_interval_s: float = Field(
        6 * 3600.0, gt=0, description="`make run` re-issues every workload certificate this often (they live a day)."
    )
    router_catalog: Path | None = Field(None, description="The router's model catalog; default: the packaged one.")
    otlp_endpoint: str = Field("", description="host:port of an OTLP/gRPC collector for traces; empty: off.")
    start_timeout_s: float = Field(180.0, gt=0, description="How long start-up may take before it is abandoned.")

    def resolved_model_dir(self) -> Path:
        return self.model_dir or self.data_dir / "models" / "smollm2-135m-instruct"
