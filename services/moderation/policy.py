"""Per-tenant moderation policy: for each category and direction (input to
the model, output from it) a threshold and an action. Loaded from a YAML
file; a tenant's entries override the default's, category by category."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mariana_common.reloading import ReloadingFile
from services.moderation.spans import CATEGORIES, TOXIC_CATEGORIES

DEFAULT_FILE = Path(__file__).with_name("policy.yaml")


class Action(enum.IntEnum):
    """Ordered by severity: a text's action is the most severe triggered one."""

    ALLOW = 0
    FLAG = 1
    REDACT = 2
    BLOCK = 3


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["allow", "flag", "redact", "block"]
    threshold: float = Field(0.5, gt=0, le=1, description="A category triggers at or above this score.")

    @property
    def severity(self) -> Action:
        return Action[self.action.upper()]


Rules = dict[str, Rule]


def _check_rules(rules: Rules, where: str) -> None:
    for category, rule in rules.items():
        if category not in CATEGORIES:
            raise ValueError(f"{where}: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
        if rule.action == "redact" and category in TOXIC_CATEGORIES:
            raise ValueError(f"{where}: {category} has no spans to redact; use block or flag")


class DirectionRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Rules = Field(default_factory=dict)
    output: Rules = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> DirectionRules:
        _check_rules(self.input, "input")
        _check_rules(self.output, "output")
        return self


class PolicyBook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: DirectionRules
    tenants: dict[str, DirectionRules] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete_default(self) -> PolicyBook:
        for direction in ("input", "output"):
            missing = set(CATEGORIES) - set(getattr(self.default, direction))
            if missing:
                raise ValueError(f"default.{direction} lacks {sorted(missing)}")
        return self

    def rules(self, tenant_id: str, direction: Literal["input", "output"]) -> Rules:
        rules = dict(getattr(self.default, direction))
        tenant = self.tenants.get(tenant_id)
        if tenant is not None:
            rules.update(getattr(tenant, direction))
        return rules


def parse_policy(text: str) -> PolicyBook:
    return PolicyBook.model_validate(yaml.safe_load(text))


def load_policy(path: Path = DEFAULT_FILE) -> PolicyBook:
    return parse_policy(path.read_text())


def reloading_policy(path: Path, interval_s: float = 1.0) -> ReloadingFile[PolicyBook]:
    """The policy in a file, re-read when the file changes, so operators change
    it without a restart; a broken edit keeps the last good policy."""
    return ReloadingFile(path, parse_policy, "moderation policy", interval_s)
