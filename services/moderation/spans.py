"""What a detector reports: a category, the kind within it, and where."""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI's moderation categories, then Mariana's own.
TOXIC_CATEGORIES = ("harassment", "hate", "self-harm", "sexual", "violence", "illicit")
RULE_CATEGORIES = ("pii", "secrets", "prompt_injection", "blocklist")
CATEGORIES = TOXIC_CATEGORIES + RULE_CATEGORIES


@dataclass(frozen=True)
class Span:
    category: str
    kind: str
    start: int
    end: int

    def overlaps(self, other: Span) -> bool:
        return self.start < other.end and other.start < self.end
