"""Terms an operator refuses wherever they appear: whole words, any case."""

from __future__ import annotations

import re
from collections.abc import Iterable

from services.moderation.spans import Span


class Blocklist:
    def __init__(self, terms: Iterable[str]) -> None:
        words = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
        self._pattern = (
            re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE) if words else None
        )

    def find(self, text: str) -> list[Span]:
        if self._pattern is None:
            return []
        return [Span("blocklist", "term", m.start(), m.end()) for m in self._pattern.finditer(text)]
