"""Moderation's metrics, counted wherever the engine runs (the moderation
service, or the router that runs it in process)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter

from services.moderation.moderator import Verdict

VERDICTS = Counter(
    "mariana_moderation_verdicts_total", "Texts checked, by direction and action.", ["direction", "action"]
)


def count_verdicts(direction: str, verdicts: Iterable[Verdict]) -> None:
    for verdict in verdicts:
        VERDICTS.labels(direction, verdict.action.name.lower()).inc()
