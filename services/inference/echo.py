"""The echo backend, for measuring the platform without a model: it answers at
once with a fixed number of completion tokens, streamed in fixed chunks, and
counts prompt tokens as words. Selected by `MARIANA_INFERENCE_BACKEND=echo`;
never the default, and `ModelInfo.backend` says "echo" so nobody mistakes it
for a model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from mariana_common.errors import InvalidArgument, NotFound
from services.inference.engine import GenerationInput, ModelCard, validate
from services.inference.scheduler import Event, Stats

ECHO_TOKEN = "echo "
# Tokens a chat template adds per message (role markers), roughly as SmolLM2's does.
TEMPLATE_TOKENS_PER_MESSAGE = 4


class EchoEngine:
    def __init__(
        self,
        model_id: str,
        completion_tokens: int,
        chunk_tokens: int,
        context_length: int = 8192,
        chunk_interval_s: float = 0.0,
    ) -> None:
        if completion_tokens < 1 or chunk_tokens < 1:
            raise ValueError("the echo backend needs at least one token and one token per chunk")
        self.model_id = model_id
        self._completion_tokens = completion_tokens
        self._chunk_tokens = chunk_tokens
        self._context_length = context_length
        self._created = int(time.time())
        # 0 answers at once; more paces the chunks like a model's decode steps.
        self._chunk_interval_s = chunk_interval_s

    def card(self) -> ModelCard:
        return ModelCard(self.model_id, "echo", "none", self._context_length, self._created)

    def stats(self) -> Stats:
        return Stats(running=0, prefilling=0, waiting=0, kv_tokens_reserved=0, free_slots=1)

    def token_text(self, token: int) -> str:
        return ECHO_TOKEN

    def prompt_tokens(self, request: GenerationInput) -> int:
        if request.messages is not None:
            if not request.messages:
                raise InvalidArgument("messages must not be empty")
            return sum(len(text.split()) + TEMPLATE_TOKENS_PER_MESSAGE for _, text in request.messages)
        if not request.prompt:
            raise InvalidArgument("prompt must not be empty")
        return len(request.prompt.split())

    async def generate(self, request: GenerationInput) -> AsyncGenerator[Event, None]:
        if request.model != self.model_id:
            raise NotFound(f"model {request.model!r} is not served here; try {self.model_id!r}")
        validate(request.sampling)
        prompt = self.prompt_tokens(request)
        if prompt >= self._context_length:
            raise InvalidArgument(f"prompt is {prompt} tokens; this model's context is {self._context_length} tokens")
        limit = request.sampling.max_tokens
        total = min(self._completion_tokens, limit) if limit else self._completion_tokens
        finish = "length" if limit is not None and limit < self._completion_tokens else "stop"
        sent = 0
        while sent < total:
            if self._chunk_interval_s:
                await asyncio.sleep(self._chunk_interval_s)
            step = min(self._chunk_tokens, total - sent)
            sent += step
            yield Event(ECHO_TOKEN * step, prompt, sent, finish if sent == total else None)

    async def drain(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass
