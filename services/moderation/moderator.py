"""The moderation verdict for a text: which categories were found, with a
score per category and the spans behind them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from services.moderation.detectors import Blocklist, Span, find_cards, find_emails, find_phones

CATEGORIES = ("pii.email", "pii.phone", "pii.credit_card", "blocklist")


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    findings: list[Span] = field(default_factory=list)


class Moderator:
    def __init__(self, blocklist: Iterable[str]) -> None:
        self._blocklist = Blocklist(blocklist)

    def check(self, text: str) -> Verdict:
        spans = [*find_emails(text), *find_cards(text)]
        spans += list(find_phones(text, spans))
        spans += list(self._blocklist.find(text))
        spans.sort(key=lambda s: s.start)
        found = {s.category for s in spans}
        categories = {c: c in found for c in CATEGORIES}
        # Rule detectors are certain when they match.
        scores = {c: 1.0 if hit else 0.0 for c, hit in categories.items()}
        return Verdict(bool(found), categories, scores, spans)

    def check_all(self, texts: Iterable[str]) -> list[Verdict]:
        return [self.check(t) for t in texts]
