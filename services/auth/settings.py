from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_AUTH_", extra="ignore", frozen=True)

    db_path: Path = Field(Path(".data/auth/keys.db"), description="SQLite file of tenants and keys.")
    pepper_file: Path = Field(
        Path(".data/auth/pepper"),
        description="Secret mixed into every key hash; created with 32 random bytes when missing.",
    )
    master_key: SecretStr | None = Field(
        None,
        validation_alias="MARIANA_MASTER_KEY",
        description="When set, an admin key that needs no database entry (for scripts and tests).",
    )
    cache_ttl_s: float = Field(1.0, ge=0, description="How long a verified key is trusted without a lookup.")
