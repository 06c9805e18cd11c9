"""The async face of a served chat model: validates and tokenizes a request,
admits it to the scheduler's continuous batch, and streams its events back.
A caller that stops reading (cancel, disconnect) frees its batch slot and KV
memory at the scheduler's next step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mariana_common.errors import InvalidArgument, NotFound
from services.inference.loader import LoadedModel
from services.inference.sampling import SamplingParams
from services.inference.scheduler import Event, Limits, Scheduler, Stats, deliverer
from services.inference.scheduler import Sequence as Seq


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerationInput:
    model: str
    messages: Sequence[tuple[str, str]] | None = None
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class ModelCard:
    id: str
    backend: str
    device: str
    context_length: int
    created: int


def validate(s: Sampling) -> None:
    if not 0 <= s.temperature <= 2:
        raise InvalidArgument("temperature must be between 0 and 2")
    if not 0 < s.top_p <= 1:
        raise InvalidArgument("top_p must be in (0, 1]")
    if s.top_k < 0:
        raise InvalidArgument("top_k must not be negative")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise InvalidArgument("max_tokens must be at least 1")
    for name, value in (("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)):
        if not -2 <= value <= 2:
            raise InvalidArgument(f"{name} must be between -2 and 2")
    if not 0 <= s.top_logprobs <= 20:
        raise InvalidArgument("top_logprobs must be between 0 and 20")
    if len(s.stop) > 4:
        raise InvalidArgument("at most 4 stop sequences")


class ChatEngine(Protocol):
    """What the servicer needs of a served chat model (the batching engine
    below, or the echo backend used for measuring the platform)."""

    model_id: str

    def card(self) -> ModelCard: ...

    def stats(self) -> Stats: ...

    def token_text(self, token: int) -> str: ...

    def generate(self, request: GenerationInput) -> AsyncGenerator[Event, None]: ...

    async def drain(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...


class Engine:
    def __init__(self, model_id: str, loaded: LoadedModel, default_max_tokens: int, limits: Limits) -> None:
        self.model_id = model_id
        self._loaded = loaded
        self._default_max_tokens = default_max_tokens
        self._created = int(time.time())
        layers = int(loaded.model.config.num_hidden_layers)
        self._scheduler = Scheduler(loaded.model, loaded.tokenizer, loaded.eos_token_ids, layers, limits)

    def card(self) -> ModelCard:
        m = self._loaded
        return ModelCard(self.model_id, m.backend, m.device, m.context_length, self._created)

    def stats(self) -> Stats:
        return self._scheduler.stats()

    def token_text(self, token: int) -> str:
        return str(self._loaded.tokenizer.decode([token]))

    def prompt_ids(self, request: GenerationInput) -> list[int]:
        tokenizer = self._loaded.tokenizer
        if request.messages is not None:
            if not request.messages:
                raise InvalidArgument("messages must not be empty")
            chat = [{"role": role, "content": content} for role, content in request.messages]
            rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if not request.prompt:
            raise InvalidArgument("prompt must not be empty")
        return list(tokenizer(request.prompt, add_special_tokens=False)["input_ids"])

    def _params(self, request: GenerationInput, prompt_tokens: int) -> SamplingParams:
        s = request.sampling
        context = self._loaded.context_length
        if prompt_tokens >= context:
            raise InvalidArgument(f"prompt is {prompt_tokens} tokens; this model's context is {context} tokens")
        room = context - prompt_tokens
        max_tokens = min(s.max_tokens or self._default_max_tokens, room)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            stop=tuple(x for x in s.stop if x),
            seed=s.seed,
            logprobs=s.logprobs or s.top_logprobs > 0,
            top_logprobs=s.top_logprobs,
        )

    async def generate(self, request: GenerationInput) -> AsyncGenerator[Event, None]:
        if request.model != self.model_id:
            raise NotFound(f"model {request.model!r} is not served here; try {self.model_id!r}")
        validate(request.sampling)
        prompt = self.prompt_ids(request)
        params = self._params(request, len(prompt))
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        seq = Seq(prompt, params, deliverer(asyncio.get_running_loop(), queue), self._loaded.tokenizer)
        self._scheduler.submit(seq)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self._scheduler.cancel(seq)

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests and waits for the admitted ones; True if all finished."""
        self._scheduler.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while not self._scheduler.idle():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def close(self) -> None:
        self._scheduler.shutdown()
