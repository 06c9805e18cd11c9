"""The model catalog: public model names (and aliases) mapped to pools that
serve them, with each model's routing policy and fallbacks, the cache and the
resilience settings. Read from YAML and re-read when the file changes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mariana_common.errors import NotFound
from mariana_common.reloading import ReloadingFile

DEFAULT_FILE = Path(__file__).with_name("catalog.yaml")
Policy = Literal["priority", "least_outstanding", "lowest_latency", "lowest_cost", "weighted"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(Strict):
    """Replicas that serve one model: an inference service of the mesh (Envoy
    balances over its replicas, retries and ejects them), or an external
    OpenAI-compatible API."""

    kind: Literal["mesh", "openai"] = "mesh"
    upstream: str | None = Field(None, description="mesh: the inference service's name in the topology.")
    base_url: str | None = Field(None, description="openai: e.g. https://api.example.com/v1")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the key.")
    api_key_file: Path | None = Field(None, description="openai: file holding the key.")
    model: str = Field(..., description="The model's name at the upstream.")
    context: int = Field(8192, gt=0)
    cost_per_mtok: int = Field(0, ge=0, description="Micro-units per million tokens (lowest_cost policy).")
    weight: int = Field(1, ge=0, description="Share of traffic under the weighted policy.")
    max_concurrency: int = Field(64, gt=0, description="Bulkhead: requests in flight to this pool at most.")

    @model_validator(mode="after")
    def _complete(self) -> PoolConfig:
        if self.kind == "mesh" and not self.upstream:
            raise ValueError("a mesh pool needs `upstream`")
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai pool needs `base_url`")
        return self


class ModelRoute(Strict):
    aliases: list[str] = Field(default_factory=list)
    context: int = Field(8192, gt=0)
    price_tier: str = "standard"
    policy: Policy = "priority"
    pools: list[str] = Field(..., min_length=1)
    fallbacks: list[str] = Field(default_factory=list, description="Other public models, tried in order.")


class CacheConfig(Strict):
    enabled: bool = True
    ttl_s: float = Field(300.0, gt=0, description="An answer is served as a hit this long.")
    stale_s: float = Field(3600.0, ge=0, description="...and kept this much longer, for when nothing can serve.")
    max_entries: int = Field(10_000, gt=0)
    max_entry_bytes: int = Field(64 * 1024, gt=0)
    exclude_tenants: list[str] = Field(default_factory=list, description="Tenants that opted out of caching.")


class BreakerConfig(Strict):
    consecutive_failures: int = Field(5, gt=0)
    error_rate: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(10.0, gt=0)
    min_requests: int = Field(10, gt=0, description="Calls in the window before the error rate counts.")
    open_s: float = Field(5.0, gt=0, description="How long an open breaker refuses before one probe.")


class RetryConfig(Strict):
    retries: int = Field(2, ge=0, description="Retries per pool after the first try.")
    base_s: float = Field(0.05, gt=0)
    cap_s: float = Field(1.0, gt=0)


class Catalog(Strict):
    pools: dict[str, PoolConfig]
    models: dict[str, ModelRoute]
    cache: CacheConfig = Field(default_factory=CacheConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        names: dict[str, str] = {}
        for model, route in self.models.items():
            for pool in route.pools:
                if pool not in self.pools:
                    raise ValueError(f"model {model!r}: unknown pool {pool!r}")
            for fallback in route.fallbacks:
                if fallback not in self.models:
                    raise ValueError(f"model {model!r}: unknown fallback {fallback!r}")
            for name in [model, *route.aliases]:
                if name in names:
                    raise ValueError(f"name {name!r} is used by {names[name]!r} and {model!r}")
                names[name] = model
        return self

    def resolve(self, name: str) -> str:
        """The public model a name or alias stands for."""
        if name in self.models:
            return name
        for model, route in self.models.items():
            if name in route.aliases:
                return model
        raise NotFound(f"model {name!r} does not exist; models: {', '.join(self.models)}")

    def chain(self, model: str) -> list[str]:
        """The model, then its fallbacks (depth first, each model once)."""
        # A stack, not a recursive closure: a closure that calls itself is a
        # reference cycle, garbage only the collector frees (per request).
        order: list[str] = []
        pending = [model]
        while pending:
            name = pending.pop()
            if name not in order:
                order.append(name)
                pending.extend(reversed(self.models[name].fallbacks))
        return order


def parse_catalog(text: str) -> Catalog:
    return Catalog.model_validate(yaml.safe_load(text))


def load_catalog(path: Path = DEFAULT_FILE) -> Catalog:
    return parse_catalog(path.read_text())


def reloading_catalog(path: Path, interval_s: float = 1.0) -> ReloadingFile[Catalog]:
    return ReloadingFile(path, parse_catalog, "model catalog", interval_s)
