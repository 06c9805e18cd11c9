from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from mariana_common.settings import ServiceSettings
from services.moderation.moderator import Moderator
from services.moderation.policy import DEFAULT_FILE, reloading_policy
from services.moderation.toxicity import MODEL_FILE, ToxicityModel


class EngineSettings(BaseSettings):
    """What the moderation engine reads, wherever it runs (the moderation
    service, or the router that runs it in process): the same variables."""

    model_config = SettingsConfigDict(env_prefix="MARIANA_MODERATION_", extra="ignore", frozen=True)

    blocklist: list[str] = Field(
        default_factory=list,
        description="Terms refused wherever they appear (JSON list in the environment).",
    )
    policy_file: Path = Field(
        DEFAULT_FILE, description="Per-tenant policy (YAML, see policy.yaml); re-read when it changes."
    )
    toxicity_model: Path = Field(MODEL_FILE, description="Weights of the toxicity head (training/train.py).")

    def moderator(self) -> Moderator:
        return Moderator(ToxicityModel.load(self.toxicity_model), reloading_policy(self.policy_file), self.blocklist)


class ModerationSettings(ServiceSettings, EngineSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_MODERATION_", extra="ignore", frozen=True)
