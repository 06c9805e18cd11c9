from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings
from services.billing.prices import DEFAULT_FILE as DEFAULT_PRICES


class BillingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_BILLING_", extra="ignore", frozen=True)

    database: str = Field(
        ".data/billing/ledger.db", description="SQLite ledger file, or a postgresql:// URL (migrated at start)."
    )
    alerts_stream: str = Field("mariana:alerts", description="Redis Stream that soft-budget alerts go to.")
    prices_file: Path = Field(DEFAULT_PRICES, description="Price catalog (YAML, micro-units per million tokens).")
    consumer_group: str = Field("billing", description="Consumer group on the usage stream.")
    consumer_linger_s: float = Field(
        0.05, ge=0, le=1, description="Wait after a batch that was not full, so batches grow (ledger lag bound)."
    )
    reclaim_idle_ms: int = Field(
        30_000, ge=0, description="Entries another consumer left unacknowledged this long are taken over."
    )
    consumer_name: str = Field(
        default_factory=socket.gethostname,
        description="This consumer's name in the group; stable names let a restart reclaim its pending entries.",
    )
