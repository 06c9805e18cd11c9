"""The price catalog: integer micro-units per million tokens, never floats."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_FILE = Path(__file__).with_name("prices.yaml")


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: int = Field(..., ge=0)
    output_per_million: int = Field(..., ge=0)

    def cost_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Rounded up: a request is never priced at less than it costs."""
        total = prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        return -(-total // 1_000_000)


class PriceCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Price
    models: dict[str, Price] = Field(default_factory=dict)

    def price(self, model: str) -> Price:
        return self.models.get(model, self.default)


def load_prices(path: Path = DEFAULT_FILE) -> PriceCatalog:
    return PriceCatalog.model_validate(yaml.safe_load(path.read_text()))
