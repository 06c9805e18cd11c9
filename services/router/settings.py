from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_ROUTER_", extra="ignore", frozen=True)

    inference_target: str = Field(..., description="host:port of Envoy's mesh listener for inference.")
    moderation_target: str = Field(..., description="host:port of Envoy's mesh listener for moderation.")
    inference_timeout_s: float = Field(120.0, gt=0, description="Deadline of one generation call.")
    moderation_timeout_s: float = Field(2.0, gt=0, description="Deadline of one moderation call.")
    output_window_chars: int = Field(
        32,
        ge=0,
        description="Streamed output is moderated in windows of about this many characters; 0 turns it off.",
    )
