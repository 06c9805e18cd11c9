from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings


class ModerationSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_MODERATION_", extra="ignore", frozen=True)

    blocklist: list[str] = Field(
        default_factory=list,
        description="Terms refused wherever they appear (JSON list in the environment).",
    )
