"""The price catalog: integer micro-units per million tokens, never floats,
versioned by the date a price takes effect."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_FILE = Path(__file__).with_name("prices.yaml")


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    effective_from: dt.date = dt.date(1970, 1, 1)
    input_per_million: int = Field(..., ge=0)
    cached_input_per_million: int | None = Field(None, ge=0, description="Default: the input price.")
    output_per_million: int = Field(..., ge=0)

    def cost_micros(self, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> int:
        """Rounded up: a request is never priced at less than it costs."""
        cached = min(cached_prompt_tokens, prompt_tokens)
        cached_price = (
            self.input_per_million if self.cached_input_per_million is None else self.cached_input_per_million
        )
        total = (
            (prompt_tokens - cached) * self.input_per_million
            + cached * cached_price
            + completion_tokens * self.output_per_million
        )
        return -(-total // 1_000_000)


def _starts(version: Price) -> float:
    return dt.datetime.combine(version.effective_from, dt.time(), dt.UTC).timestamp()


class PriceCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: list[Price] = Field(..., min_length=1)
    models: dict[str, list[Price]] = Field(default_factory=dict)

    @field_validator("default")
    @classmethod
    def _sorted_default(cls, versions: list[Price]) -> list[Price]:
        return sorted(versions, key=lambda p: p.effective_from)

    @field_validator("models")
    @classmethod
    def _sorted_models(cls, models: dict[str, list[Price]]) -> dict[str, list[Price]]:
        return {name: sorted(v, key=lambda p: p.effective_from) for name, v in models.items() if v}

    def price(self, model: str, at: float) -> Price:
        """The version in force at `at` (seconds since the epoch)."""
        for versions in (self.models.get(model, []), self.default):
            in_force = [v for v in versions if _starts(v) <= at]
            if in_force:
                return in_force[-1]
        return self.default[0]


def load_prices(path: Path = DEFAULT_FILE) -> PriceCatalog:
    return PriceCatalog.model_validate(yaml.safe_load(path.read_text()))
