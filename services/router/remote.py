"""A pool served by an external OpenAI-compatible HTTP API: chat completions
streamed over SSE, turned into the router's pieces. The key is read from an
environment variable or a file, sent only as the bearer token, never logged."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import httpx

from mariana_common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.router.domain import GenerationRequest, ModelEntry, Piece, TokenLogprob


def read_key(env: str | None, file: Path | None) -> str:
    if env and os.environ.get(env):
        return os.environ[env]
    if file is not None:
        return file.read_text().strip()
    return ""


def request_body(request: GenerationRequest) -> dict[str, object]:
    s = request.sampling
    body: dict[str, object] = {
        "model": request.model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": s.temperature,
        "top_p": s.top_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    if request.messages is not None:
        body["messages"] = [{"role": role, "content": text} for role, text in request.messages]
    else:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = s.top_logprobs
    return body


def _error_for(status: int, text: str) -> Exception:
    if status == 429:
        return ResourceExhausted(f"remote provider is rate limiting: {text[:200]}")
    if status in (400, 404, 413, 422):
        return InvalidArgument(f"remote provider refused the request: {text[:200]}")
    return Unavailable(f"remote provider failed with HTTP {status}")


class OpenAICompatiblePool:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, client: httpx.AsyncClient | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        headers = {**self._headers, "x-request-id": request_id}
        timeout = httpx.Timeout(timeout_s or self._timeout_s, connect=min(5.0, timeout_s or 5.0))
        prompt_tokens = completion_tokens = 0
        finish: str | None = None
        try:
            async with self._client.stream(
                "POST",
                f"{self._base_url}/chat/completions",
                json=request_body(request),
                headers=headers,
                timeout=timeout,
            ) as response:
                if response.status_code != 200:
                    raise _error_for(response.status_code, (await response.aread()).decode(errors="replace"))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if usage := chunk.get("usage"):
                        prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                        completion_tokens = usage.get("completion_tokens", completion_tokens)
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        logprobs = tuple(
                            TokenLogprob(lp["token"], lp["logprob"])
                            for lp in ((choice.get("logprobs") or {}).get("content") or [])
                        )
                        finish = choice.get("finish_reason") or finish
                        if text or logprobs:
                            completion_tokens += 0 if usage else 1
                            yield Piece(text, None, prompt_tokens, completion_tokens, logprobs)
        except (httpx.TransportError, json.JSONDecodeError) as error:
            raise Unavailable(f"remote provider unreachable: {type(error).__name__}") from error
        if finish is None:
            raise Unavailable("remote provider ended the stream without a finish reason")
        yield Piece("", finish, prompt_tokens, completion_tokens)

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]:
        raise InvalidArgument("embeddings are not routed to remote providers")

    async def models(self) -> list[ModelEntry]:
        return []

    async def close(self) -> None:
        await self._client.aclose()
