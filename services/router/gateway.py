"""What the router does with a request: moderation on the input, generation,
and one usage record when the request completes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from mariana_common.errors import InvalidArgument
from services.router.domain import (
    Caller,
    GenerationRequest,
    Inference,
    ModelEntry,
    Moderation,
    ModerationVerdict,
    Piece,
    UsageRecord,
    UsageSink,
)


def flagged_categories(verdicts: Sequence[ModerationVerdict]) -> list[str]:
    return sorted({c for v in verdicts for c, hit in v.categories.items() if hit})


class Gateway:
    def __init__(self, inference: Inference, moderation: Moderation, usage: UsageSink) -> None:
        self._inference = inference
        self._moderation = moderation
        self._usage = usage

    async def generate(self, caller: Caller, request: GenerationRequest) -> AsyncIterator[Piece]:
        verdicts = await self._moderation.check(request.texts(), caller.request_id)
        if any(v.flagged for v in verdicts):
            raise InvalidArgument("the input was flagged by moderation: " + ", ".join(flagged_categories(verdicts)))
        async for piece in self._inference.generate(request, caller.request_id):
            if piece.finish_reason is not None:
                self._usage.publish(
                    UsageRecord(
                        request_id=caller.request_id,
                        tenant_id=caller.tenant_id,
                        key_id=caller.key_id,
                        model=request.model,
                        prompt_tokens=piece.prompt_tokens,
                        completion_tokens=piece.completion_tokens,
                        finish_reason=piece.finish_reason,
                        completed_at=time.time(),
                    )
                )
            yield piece

    async def embed(self, caller: Caller, model: str, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return await self._inference.embed(model, texts, caller.request_id)

    async def models(self) -> list[ModelEntry]:
        return await self._inference.models()

    async def moderate(self, caller: Caller, texts: Sequence[str]) -> list[ModerationVerdict]:
        return await self._moderation.check(texts, caller.request_id)
