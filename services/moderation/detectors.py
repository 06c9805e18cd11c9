"""Rule-based detectors. Each returns the spans it found in a text."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    category: str
    start: int
    end: int


EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# International (+CC ...) or North-American style numbers; separators allowed.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){2,3}"
    r"|\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4})(?!\w)"
)
CARD_CANDIDATE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def find_emails(text: str) -> Iterable[Span]:
    for match in EMAIL.finditer(text):
        yield Span("pii.email", match.start(), match.end())


def find_cards(text: str) -> Iterable[Span]:
    for match in CARD_CANDIDATE.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            yield Span("pii.credit_card", match.start(), match.end())


def find_phones(text: str, taken: list[Span]) -> Iterable[Span]:
    for match in PHONE.finditer(text):
        overlaps = any(s.start < match.end() and match.start() < s.end for s in taken)
        digits = sum(c.isdigit() for c in match.group())
        if not overlaps and 7 <= digits <= 15:
            yield Span("pii.phone", match.start(), match.end())


class Blocklist:
    """Whole-word, case-insensitive match of configured terms."""

    def __init__(self, terms: Iterable[str]) -> None:
        words = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
        self._pattern = (
            re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE) if words else None
        )

    def find(self, text: str) -> Iterable[Span]:
        if self._pattern is None:
            return
        for match in self._pattern.finditer(text):
            yield Span("blocklist", match.start(), match.end())
