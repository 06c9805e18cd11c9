"""Prompt injection: instructions that try to override the system prompt or
extract it. Phrase rules in English, German, French and Spanish."""

from __future__ import annotations

import re

from services.moderation.spans import Span

RULES = re.compile(
    r"(?i)\b(?:"
    r"(?:ignore|disregard|forget|override|bypass)\s+(?:all\s+|any\s+|the\s+|your\s+)*"
    r"(?:previous|prior|above|earlier|preceding|system|original)\s+(?:instructions?|prompts?|rules|directions|messages?)"
    r"|(?:reveal|print|show|repeat|output|leak)\s+(?:me\s+)?(?:"
    r"your\s+(?:(?:full|hidden|initial|original|secret)\s+)*(?:system\s+prompt|instructions|prompt)"
    r"|the\s+(?:(?:full|hidden|initial|original|secret)\s+)*system\s+prompt"
    r"|the\s+(?:hidden|initial|original|secret)\s+(?:instructions|prompt))"
    r"|you\s+are\s+now\s+(?:DAN|in\s+developer\s+mode|jailbroken|unrestricted|free\s+of\s+(?:all\s+)?restrictions)"
    r"|(?:developer|god|jailbreak)\s+mode\s+(?:enabled|activated|on)"
    r"|pretend\s+(?:that\s+)?you\s+have\s+no\s+(?:rules|restrictions|guidelines|filters)"
    r"|ignorier(?:e|en\s+Sie)\s+(?:(?:alle|die|sämtliche)\s+)*(?:vorherigen|bisherigen|obigen)\s+(?:Anweisungen|Regeln)"
    r"|ignore[zr]?\s+(?:toutes\s+)?les\s+instructions\s+(?:précédentes|ci-dessus)"
    r"|ignora\s+(?:todas\s+)?las\s+instrucciones\s+(?:anteriores|previas)"
    r")"
)


def find_injection(text: str) -> list[Span]:
    return [Span("prompt_injection", "override", m.start(), m.end()) for m in RULES.finditer(text)]
