"""A text's verdict: every category's score, what was found where, the action
the tenant's policy takes, and the text with redactable spans replaced."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from services.moderation.blocklist import Blocklist
from services.moderation.credentials import find_secrets
from services.moderation.injection import find_injection
from services.moderation.pii import find_pii
from services.moderation.policy import Action, PolicyBook, Rules
from services.moderation.spans import CATEGORIES, Span
from services.moderation.toxicity import ToxicityModel

Direction = Literal["input", "output"]
# How much preceding text the classifier reads with a text.
CONTEXT_CHARS = 160
# Batches longer than this are checked off the event loop, so one cannot stall the others.
INLINE_CHARS = 4096
# What a text holds (spans and scores) depends on the text and its context
# alone, and texts repeat: an app sends its system prompt with every request,
# a conversation its whole history with every turn. So the last analyses are
# kept (texts up to CACHED_CHARS long; at most ~CACHED_TEXTS * 2 KB of text).
CACHED_TEXTS = 4096
CACHED_CHARS = 2048


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    findings: list[Span] = field(default_factory=list)
    action: Action = Action.ALLOW
    # The categories that decided `action`.
    triggered: list[str] = field(default_factory=list)
    redacted_text: str = ""


def redact(text: str, spans: Iterable[Span]) -> str:
    out, cursor = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < cursor:
            continue
        label = "SECRET" if span.category == "secrets" else span.kind.upper()
        out += [text[cursor : span.start], f"[{label}]"]
        cursor = span.end
    out.append(text[cursor:])
    return "".join(out)


class Moderator:
    def __init__(
        self, toxicity: ToxicityModel, policy: Callable[[], PolicyBook], blocklist: Iterable[str] = ()
    ) -> None:
        self._toxicity = toxicity
        self._policy = policy
        self._blocklist = Blocklist(blocklist)
        self._cached_analysis = functools.lru_cache(maxsize=CACHED_TEXTS)(self._analyse)

    def find(self, text: str) -> list[Span]:
        spans = find_secrets(text)
        spans += [s for s in find_pii(text) if not any(s.overlaps(t) for t in spans)]
        spans += find_injection(text) + self._blocklist.find(text)
        return sorted(spans, key=lambda s: s.start)

    def scores(self, text: str, spans: Sequence[Span], context: str = "") -> dict[str, float]:
        scores = dict.fromkeys(CATEGORIES, 0.0)
        # A few words alone mislead a lexical classifier; what came before helps.
        scores.update(self._toxicity.scores(f"{context[-CONTEXT_CHARS:]} {text}" if context else text))
        for span in spans:
            scores[span.category] = 1.0
        return scores

    def _analyse(self, text: str, context: str) -> tuple[tuple[Span, ...], dict[str, float]]:
        spans = self.find(text)
        return tuple(spans), self.scores(text, spans, context)

    def analysis(self, text: str, context: str = "") -> tuple[tuple[Span, ...], dict[str, float]]:
        """What the text holds, whoever sent it: its spans and every
        category's score (the policy is not applied here). Do not mutate."""
        context = context[-CONTEXT_CHARS:]
        if len(text) + len(context) > CACHED_CHARS:
            return self._analyse(text, context)
        return self._cached_analysis(text, context)

    def check(self, text: str, tenant_id: str = "", direction: Direction = "input", context: str = "") -> Verdict:
        spans, scores = self.analysis(text, context)
        rules: Rules = self._policy().rules(tenant_id, direction)
        categories = {c: scores[c] >= rules[c].threshold for c in CATEGORIES}
        triggered = [c for c in CATEGORIES if categories[c] and rules[c].severity > Action.ALLOW]
        action = max((rules[c].severity for c in triggered), default=Action.ALLOW)
        redactable = [s for s in spans if rules[s.category].severity == Action.REDACT]
        return Verdict(
            flagged=any(categories.values()),
            categories=categories,
            scores=dict(scores),
            findings=list(spans),
            action=action,
            triggered=[c for c in triggered if rules[c].severity == action],
            redacted_text=redact(text, redactable) if action == Action.REDACT else text,
        )

    def check_all(
        self,
        texts: Sequence[str],
        tenant_id: str = "",
        direction: Direction = "input",
        contexts: Sequence[str] | None = None,
    ) -> list[Verdict]:
        """`contexts`: what came before each text (consecutive windows of one output)."""
        preceding = contexts if contexts is not None else [""] * len(texts)
        return [self.check(t, tenant_id, direction, c) for t, c in zip(texts, preceding, strict=True)]

    async def check_batch(
        self, texts: Sequence[str], tenant_id: str, direction: Direction, contexts: Sequence[str]
    ) -> list[Verdict]:
        """check_all for an event loop: a long batch runs in a worker thread."""
        if sum(len(t) for t in texts) <= INLINE_CHARS:
            return self.check_all(texts, tenant_id, direction, contexts)
        return await asyncio.to_thread(self.check_all, texts, tenant_id, direction, contexts)
