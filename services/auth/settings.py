from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings
from services.auth.jwt_tokens import IssuerConfig


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_AUTH_", extra="ignore", frozen=True)

    database: str = Field(".data/auth/keys.db", description="SQLite file of tenants and keys, or a postgresql:// URL.")
    pepper_file: Path = Field(
        Path(".data/auth/pepper"),
        description="Secret mixed into every key hash; created with 32 random bytes when missing.",
    )
    master_key: SecretStr | None = Field(
        None,
        validation_alias="MARIANA_MASTER_KEY",
        description="When set, an admin key that needs no database entry (for scripts and tests).",
    )
    cache_ttl_s: float = Field(
        1.0, ge=0, le=1, description="How long a verified credential is trusted without a lookup (revocation lag)."
    )
    jwt_issuers: list[IssuerConfig] = Field(
        default_factory=list, description="Trusted JWT issuers (JSON list of {issuer, audience, tenant_id, jwks_file})."
    )
    billing_target: str | None = Field(
        None, description="host:port of Envoy's mesh listener for billing; budgets are not enforced without it."
    )
    ext_authz_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Where Envoy's HTTP ext_authz check is served (same host, TLS and peers as the gRPC port); "
        "unset: only the gRPC Check.",
    )
    rate_limit_failure: Literal["open", "closed"] = Field(
        "open", description="When Redis is down: admit requests (open) or refuse them with 503 (closed)."
    )
