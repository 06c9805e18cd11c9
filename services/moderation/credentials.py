"""Secrets: provider key formats, private keys, JWTs, and values assigned to
secret-sounding names that look random enough (Shannon entropy)."""

from __future__ import annotations

import math
import re
from collections import Counter

from services.moderation.spans import Span

# (kind, pattern, literals): a pattern can match only where one of its
# literals is in the text, so most prose runs none of them.
PATTERNS: tuple[tuple[str, re.Pattern[str], tuple[str, ...]], ...] = (
    (
        "private_key",
        re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?(?:-----END (?:[A-Z]+ )*PRIVATE KEY-----|$)"),
        ("-----BEGIN ",),
    ),
    (
        "aws_access_key",
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
        ("AKIA", "ASIA", "AGPA", "AIDA", "AROA"),
    ),
    (
        "github_token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{40,255})\b"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    ("gitlab_token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b"), ("glpat-",)),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"), ("xox",)),
    ("stripe_key", re.compile(r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}\b"), ("k_live_", "k_test_")),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), ("AIza",)),
    ("openai_key", re.compile(r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}\b"), ("sk-",)),
    ("mariana_key", re.compile(r"\bmk_[0-9a-f]{12}_[A-Za-z0-9-]{20,}\b"), ("mk_",)),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"), ("eyJ",)),
    ("connection_string", re.compile(r"\b[a-z][a-z0-9+]*://[^\s:/@]+:[^\s@/]{3,}@[^\s/]+"), ("://",)),
)
ANY_LITERAL = re.compile("|".join(re.escape(literal) for _, _, literals in PATTERNS for literal in literals))
# name = value, name: value, "name": "value"
ASSIGNMENT = re.compile(
    r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token|client[_-]?secret)"
    r"[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{8,})"
)
MIN_ENTROPY_BITS_PER_CHAR = 3.0


def entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_random(value: str) -> bool:
    classes = sum(any(f(c) for c in value) for f in (str.islower, str.isupper, str.isdigit))
    return entropy(value) >= MIN_ENTROPY_BITS_PER_CHAR and classes >= 2


def find_secrets(text: str) -> list[Span]:
    found: list[Span] = []
    candidates = PATTERNS if ANY_LITERAL.search(text) else ()
    for kind, pattern, literals in candidates:
        if not any(literal in text for literal in literals):
            continue
        for match in pattern.finditer(text):
            span = Span("secrets", kind, match.start(), match.end())
            if not any(span.overlaps(other) for other in found):
                found.append(span)
    if "=" not in text and ":" not in text:  # an assignment needs one
        return sorted(found, key=lambda s: s.start)
    for match in ASSIGNMENT.finditer(text):
        value = match.group(1)
        span = Span("secrets", "assigned_secret", match.start(1), match.end(1))
        if looks_random(value) and not any(span.overlaps(other) for other in found):
            found.append(span)
    return sorted(found, key=lambda s: s.start)
