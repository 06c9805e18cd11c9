"""The generation engine: tokenizes, prefills once, then decodes token by token
with the KV cache, streaming text deltas. Model steps run on one worker thread,
so concurrent requests interleave at token granularity and the event loop stays
free. (Batching many sequences per step is the inference issue's work.)"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from mariana_common.errors import InvalidArgument, NotFound
from services.inference.loader import LoadedModel
from services.inference.sampling import next_token
from services.inference.text_stops import scan_for_stops


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationInput:
    model: str
    messages: Sequence[tuple[str, str]] | None = None
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelCard:
    id: str
    backend: str
    device: str
    context_length: int
    created: int


class Engine:
    def __init__(self, model_id: str, loaded: LoadedModel, default_max_tokens: int) -> None:
        self.model_id = model_id
        self._loaded = loaded
        self._default_max_tokens = default_max_tokens
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._created = int(time.time())

    def card(self) -> ModelCard:
        m = self._loaded
        return ModelCard(self.model_id, m.backend, m.device, m.context_length, self._created)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- generation -----------------------------------------------------

    def _prompt_ids(self, request: GenerationInput) -> list[int]:
        tokenizer = self._loaded.tokenizer
        if request.messages is not None:
            if not request.messages:
                raise InvalidArgument("messages must not be empty")
            chat = [{"role": role, "content": content} for role, content in request.messages]
            rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"])

    def _check(self, request: GenerationInput) -> None:
        if request.model != self.model_id:
            raise NotFound(f"model {request.model!r} is not served here; try {self.model_id!r}")
        s = request.sampling
        if s.temperature < 0 or s.temperature > 2:
            raise InvalidArgument("temperature must be between 0 and 2")
        if not 0 < s.top_p <= 1:
            raise InvalidArgument("top_p must be in (0, 1]")
        if s.max_tokens is not None and s.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1")

    def _decode(self, ids: list[int]) -> str:
        return str(self._loaded.tokenizer.decode(ids, skip_special_tokens=True))

    def _forward(self, ids: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
        with torch.inference_mode():
            out = self._loaded.model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits[0, -1, :], out.past_key_values

    async def generate(self, request: GenerationInput) -> AsyncIterator[Delta]:
        self._check(request)
        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(self._worker, self._prompt_ids, request)
        context = self._loaded.context_length
        if len(prompt_ids) >= context:
            raise InvalidArgument(f"prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens")
        s = request.sampling
        budget = min(s.max_tokens or self._default_max_tokens, context - len(prompt_ids))
        generator = torch.Generator().manual_seed(s.seed if s.seed is not None else random.getrandbits(63))
        eos = self._loaded.eos_token_ids

        step_input = torch.tensor([prompt_ids])
        past: Any = None
        generated: list[int] = []
        sent = 0
        finish = "length"
        stopped_by_sequence = False
        while len(generated) < budget:
            logits, past = await loop.run_in_executor(self._worker, self._forward, step_input, past)
            token = next_token(logits, s.temperature, s.top_p, generator)
            if token in eos:
                finish = "stop"
                break
            generated.append(token)
            step_input = torch.tensor([[token]])
            text = self._decode(generated)
            if text.endswith("\ufffd"):
                continue  # a multi-byte character is not complete yet
            scan = scan_for_stops(text, s.stop)
            if scan.safe_end > sent:
                yield Delta(text[sent : scan.safe_end], None, len(prompt_ids), len(generated))
                sent = scan.safe_end
            if scan.stopped:
                finish, stopped_by_sequence = "stop", True
                break
        if not stopped_by_sequence:
            # Text held back as a possible stop prefix, or an unfinished character.
            text = self._decode(generated)
            if len(text) > sent:
                yield Delta(text[sent:], None, len(prompt_ids), len(generated))
        yield Delta("", finish, len(prompt_ids), len(generated))

    # -- embeddings -----------------------------------------------------

    def _embed_one(self, text: str) -> tuple[list[float], int]:
        tokenizer = self._loaded.tokenizer
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            raise InvalidArgument("an embedding input must not be empty")
        if ids.shape[1] > self._loaded.context_length:
            raise InvalidArgument(f"input is longer than the context of {self._loaded.context_length} tokens")
        with torch.inference_mode():
            out = self._loaded.model(input_ids=ids, output_hidden_states=True)
        pooled = out.hidden_states[-1][0].mean(dim=0)
        vector = torch.nn.functional.normalize(pooled, dim=0)
        return vector.tolist(), int(ids.shape[1])

    async def embed(self, model: str, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        if model != self.model_id:
            raise NotFound(f"model {model!r} is not served here; try {self.model_id!r}")
        if not texts:
            raise InvalidArgument("input must not be empty")
        loop = asyncio.get_running_loop()
        vectors, tokens = [], 0
        for text in texts:
            vector, count = await loop.run_in_executor(self._worker, self._embed_one, text)
            vectors.append(vector)
            tokens += count
        return vectors, tokens
