"""Moderation's metrics, counted wherever the engine runs (the moderation
service, or the router that runs it in process)."""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import Counter

from services.moderation.moderator import Verdict

VERDICTS = Counter(
    "mariana_moderation_verdicts_total", "Texts checked, by direction and action.", ["direction", "action"]
)


def count_verdicts(direction: str, verdicts: Iterable[Verdict]) -> None:
    """One increment per action seen (a whole output is several windows)."""
    for action, count in collections.Counter(v.action for v in verdicts).items():
        VERDICTS.labels(direction, action.name.lower()).inc(count)
