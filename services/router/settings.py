from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings
from services.billing.prices import DEFAULT_FILE as DEFAULT_PRICES
from services.router.catalog import DEFAULT_FILE as DEFAULT_CATALOG


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_ROUTER_", extra="ignore", frozen=True)

    upstreams: dict[str, str] = Field(
        ...,
        description="Inference services by topology name -> host:port of Envoy's mesh listener for each (JSON); "
        "the catalog's mesh pools name them.",
    )
    default_upstream: str = Field("inference", description="The upstream that serves embeddings and lists models.")
    moderation: Literal["in_process", "service"] = Field(
        "in_process",
        description="Where chat is moderated: in this process with the moderation engine (its settings are "
        "MARIANA_MODERATION_*, the same as the service's), or by calls to the moderation service.",
    )
    moderation_target: str = Field(
        "",
        description="host:port of Envoy's mesh listener for moderation: /v1/moderations goes there (and chat "
        "with moderation=service); empty: the engine in process answers it too.",
    )
    catalog_file: Path = Field(DEFAULT_CATALOG, description="The model catalog (YAML), re-read when it changes.")
    tokenizer_dir: Path | None = Field(
        None, description="The default model's folder: its tokenizer counts prompt tokens for reservations."
    )
    prices_file: Path = Field(DEFAULT_PRICES, description="Billing's price catalog, for worst-case costs.")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a request that names none (reserved).")
    reservation_lease_s: float = Field(
        600.0, gt=0, description="A reservation of a request with no deadline lives this long."
    )
    reservation_failure: Literal["open", "closed"] = Field(
        "open", description="When Redis is down: admit without a reservation (open) or refuse with 503 (closed)."
    )
    spool_file: Path = Field(Path(".data/router/usage-spool.jsonl"), description="Usage kept here while Redis is away.")
    usage_linger_s: float = Field(
        0.025,
        ge=0,
        le=1,
        description="A usage batch waits this long after its first record for more: at 300 req/s, 25 ms makes "
        "batches of ~7 (one round trip, one wake-up of Redis for all); settles and the ledger come that much later.",
    )
    inference_timeout_s: float = Field(120.0, gt=0, description="Deadline of one generation call.")
    moderation_timeout_s: float = Field(2.0, gt=0, description="Deadline of one moderation call.")
    output_window_chars: int = Field(
        32,
        ge=0,
        description="Streamed output is moderated in windows of about this many characters; 0 turns it off.",
    )

    @model_validator(mode="after")
    def _moderation_target(self) -> RouterSettings:
        if self.moderation == "service" and not self.moderation_target:
            raise ValueError("moderation=service needs moderation_target")
        return self
