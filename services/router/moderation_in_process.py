"""Moderation run inside the router: the moderation service's own engine
(`services.moderation.moderator.Moderator`, the same policy file, classifier
and blocklist) behind the router's `Moderation` interface. Every generated
request is checked twice (its input, then its output); in process that is
two function calls instead of two gRPC round trips through Envoy: about
1 ms of CPU per request on this machine (bench/gateway_overhead.py
--moderation service, against the default). The
moderation service still serves /v1/moderations and the router can be
pointed back at it (`MARIANA_ROUTER_MODERATION=service`)."""

from __future__ import annotations

from collections.abc import Sequence

from mariana_common.tracing import annotate, internal_span, tracing_enabled
from services.moderation.metrics import count_verdicts
from services.moderation.moderator import Moderator, Verdict
from services.router.domain import Direction, ModerationVerdict, moderation_reasons

# The span of one check, in the router's trace where the service's would be.
SPAN = "mariana.moderation.v1.ModerationService/Check (in process)"


def verdict_of(verdict: Verdict) -> ModerationVerdict:
    reasons = moderation_reasons(verdict.triggered, ((s.category, s.kind) for s in verdict.findings))
    return ModerationVerdict(
        flagged=verdict.flagged,
        categories=verdict.categories,
        scores=verdict.scores,
        action=verdict.action.name.lower(),
        reasons=reasons,
        redacted_text=verdict.redacted_text,
    )


class InProcessModeration:
    def __init__(self, moderator: Moderator) -> None:
        self._moderator = moderator

    async def check(
        self,
        texts: Sequence[str],
        request_id: str,
        tenant_id: str = "",
        direction: Direction = "input",
        context: str = "",
        contexts: Sequence[str] = (),
        decision_only: bool = True,
    ) -> list[ModerationVerdict]:
        preceding = list(contexts) if contexts else [context] * len(texts)
        with internal_span(SPAN, {"mariana.direction": direction, "mariana.texts": len(texts)}):
            verdicts = await self._moderator.check_batch(texts, tenant_id, direction, preceding)
            if tracing_enabled():
                annotate({"mariana.actions": ",".join(sorted({v.action.name.lower() for v in verdicts}))})
        count_verdicts(direction, verdicts)
        return [verdict_of(v) for v in verdicts]
