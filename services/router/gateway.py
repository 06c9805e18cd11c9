"""What the router does with a request: moderation of the input (refuse,
redact or pass) side by side with the cache lookup, generation through the
model router (pools, breakers, fallbacks) with its output moderated as it
streams, a stale cached answer when nothing can serve, and one usage record
per generated request, whether it completed, was filtered or was cut off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import replace

from mariana_common.errors import InvalidArgument
from mariana_common.tracing import current_traceparent
from services.router.admission import Admission, Ticket
from services.router.cache import CachedAnswer, Lookup, ResponseCache
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
from services.router.metrics import TIME_TO_FIRST_TOKEN, TOKENS
from services.router.output_guard import ContentFiltered, OutputGuard
from services.router.routing import ModelRouter, NoPoolCanServe, Route

CONTENT_FILTER = "content_filter"
CANCELLED = "cancelled"


def reasons_of(verdicts: Sequence[ModerationVerdict]) -> list[str]:
    return sorted({r for v in verdicts for r in v.reasons})


def redacted(request: GenerationRequest, verdicts: Sequence[ModerationVerdict]) -> GenerationRequest:
    texts = [v.redacted_text if v.action == "redact" else t for v, t in zip(verdicts, request.texts(), strict=True)]
    if request.messages is None:
        return replace(request, prompt=texts[0])
    return replace(request, messages=[(role, text) for (role, _), text in zip(request.messages, texts, strict=True)])


CACHEABLE_FINISH = ("stop", "length")


def cached_piece(answer: CachedAnswer) -> Piece:
    return Piece(answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, restarted=True)


class Gateway:
    def __init__(
        self,
        router: ModelRouter,
        inference: Inference,
        moderation: Moderation,
        usage: UsageSink,
        output_window_chars: int = 32,
        cache: ResponseCache | None = None,
        admission: Admission | None = None,
        default_max_tokens: int = 256,
        moderation_api: Moderation | None = None,
    ) -> None:
        self._router = router
        self._inference = inference  # embeddings and the model list
        self._moderation = moderation
        # /v1/moderations: the moderation service, where a batch of 256 texts
        # does not hold up the router's requests; else the same as chat's.
        self._moderation_api = moderation_api or moderation
        self._usage = usage
        self._output_window_chars = output_window_chars
        self._cache = cache
        self._admission = admission
        self._default_max_tokens = default_max_tokens

    async def _moderate_input(self, caller: Caller, request: GenerationRequest) -> GenerationRequest:
        verdicts = await self._moderation.check(request.texts(), caller.request_id, caller.tenant_id, "input")
        if any(v.action == "block" for v in verdicts):
            blocking = [v for v in verdicts if v.action == "block"]
            raise InvalidArgument("the input was blocked by moderation: " + ", ".join(reasons_of(blocking)))
        if any(v.action == "redact" for v in verdicts):
            return redacted(request, verdicts)
        return request

    def _output_guard(self, caller: Caller) -> OutputGuard | None:
        if not self._output_window_chars:
            return None

        async def check(text: str, context: str) -> ModerationVerdict:
            (verdict,) = await self._moderation.check([text], caller.request_id, caller.tenant_id, "output", context)
            return verdict

        async def check_many(texts: list[str], contexts: list[str]) -> list[ModerationVerdict]:
            return await self._moderation.check(texts, caller.request_id, caller.tenant_id, "output", contexts=contexts)

        return OutputGuard(check, self._output_window_chars, check_many)

    def _record(
        self, caller: Caller, model: str, prompt_tokens: int, completion: int, finish_reason: str, reserved: bool
    ) -> None:
        now = time.time()
        TOKENS.labels(model, "prompt").inc(prompt_tokens)
        TOKENS.labels(model, "completion").inc(completion)
        settle = None
        if reserved and self._admission is not None:
            settle = self._admission.actual_cost(model, prompt_tokens, completion, now)
        self._usage.publish(
            UsageRecord(
                request_id=caller.request_id,
                tenant_id=caller.tenant_id,
                key_id=caller.key_id,
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                finish_reason=finish_reason,
                completed_at=now,
                settle_micros=settle,
                traceparent=current_traceparent(),
            )
        )

    async def _admit(
        self, caller: Caller, request: GenerationRequest, model: str, n: int
    ) -> tuple[GenerationRequest, Ticket]:
        """Reserves the request's worst case (or starts to: see admission); the
        request it returns names its max_tokens, so inference cannot go past
        what was reserved."""
        if self._admission is None:
            return request, Ticket.made(False)
        max_tokens = request.sampling.max_tokens or self._default_max_tokens
        request = replace(request, sampling=replace(request.sampling, max_tokens=max_tokens))
        worst = self._admission.worst_case(request, n, max_tokens, self._router.chain(model))
        return request, await self._admission.admit(caller, worst)

    async def _choice(
        self, caller: Caller, request: GenerationRequest, index: int, stream: bool, route: Route
    ) -> AsyncGenerator[Piece, None]:
        """One choice: generation with its output moderated; ends with a finish
        reason. Not streamed, the text is held and moderated once at the end
        (the pieces before carry token counts and logprobs, no text)."""
        guard = self._output_guard(caller)
        last = Piece("", index=index)
        held: list[str] = []
        try:
            pieces = self._router.generate(request, caller.request_id, route, caller.deadline, stream)
            async with aclosing(pieces):
                async for piece in pieces:
                    last = replace(piece, index=index)
                    if not stream:
                        if piece.restarted:  # an attempt failed and another pool took over
                            held.clear()
                        held.append(piece.text)
                        if piece.finish_reason is None:
                            yield replace(last, text="")
                            continue
                        text = "".join(held)
                        yield replace(last, text=await guard.whole(text) if guard else text)
                        return
                    text = await guard.feed(piece.text) if guard else piece.text
                    if piece.finish_reason is None:
                        if text or piece.logprobs:
                            yield replace(last, text=text)
                        continue
                    if guard:
                        text += await guard.finish()
                    yield replace(last, text=text)
                    return
        except ContentFiltered:
            yield replace(last, text="", logprobs=(), finish_reason=CONTENT_FILTER)

    async def _input_and_cache(
        self, caller: Caller, request: GenerationRequest, model: str, n: int
    ) -> tuple[GenerationRequest, str | None, Lookup | None]:
        """Input moderation and the cache lookup, side by side; the cached answer
        is used only once moderation has let the request through."""
        key = self._cache.key_for(caller.tenant_id, model, request, n) if self._cache else None
        if key is None or self._cache is None:
            return await self._moderate_input(caller, request), None, None
        moderated, lookup = await asyncio.gather(self._moderate_input(caller, request), self._cache.get(key))
        return moderated, key, lookup

    async def generate(
        self, caller: Caller, request: GenerationRequest, n: int = 1, stream: bool = True, route: Route | None = None
    ) -> AsyncGenerator[Piece, None]:
        """Pieces of every choice as they come (each with its index); one usage
        record for the request: the prompt once, the completions summed.
        `stream=False`: the caller wants only the whole answers, so their text
        comes in each choice's last piece, moderated in one call. `route` is
        filled in with where the answer came from."""
        route = route if route is not None else Route()
        model = self._router.resolve(request.model)
        request, key, lookup = await self._input_and_cache(caller, request, model, n)
        if lookup is not None and lookup.fresh:
            route.model, route.step = model, "cache"
            yield cached_piece(lookup.answer)
            return
        request, ticket = await self._admit(caller, request, model, n)
        latest: dict[int, Piece] = {}
        recorded = False
        first_finish = "stop"

        def record(finish_reason: str) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                prompt = max((p.prompt_tokens for p in latest.values()), default=0)
                completion = sum(p.completion_tokens for p in latest.values())
                self._record(caller, route.model or model, prompt, completion, finish_reason, ticket.reserved)

        text: list[str] = []
        undelivered = False  # not streamed, and no pool could finish it
        started = time.perf_counter()
        try:
            async with aclosing(self._merged(caller, request, n, stream, route)) as merged:
                async for piece in merged:
                    if piece.restarted:
                        text.clear()
                    if not latest:
                        await ticket.confirm()  # refused: inference is closed, nothing was sent
                        TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - started)
                    latest[piece.index] = piece
                    text.append(piece.text)
                    if piece.finish_reason is not None and piece.index == 0:
                        first_finish = piece.finish_reason
                    if len([p for p in latest.values() if p.finish_reason]) == n:
                        record(first_finish)
                    yield piece
            if not latest:
                await ticket.confirm()
        except NoPoolCanServe:
            await ticket.confirm()  # a refusal is the answer, whatever inference did
            undelivered = not stream
            if lookup is None:
                raise
            route.model, route.pool, route.step = model, "", "stale_cache"
            assert self._cache is not None
            self._cache.count_stale_hit()
            yield cached_piece(lookup.answer)
            return
        except Exception:
            await ticket.confirm()
            raise
        finally:
            # The caller went away, or the stream broke, after tokens were made:
            # they are billed. An answer no pool could finish, never sent, is not.
            if not recorded and not undelivered and any(p.completion_tokens for p in latest.values()):
                record(CANCELLED)
            if not recorded:
                ticket.release_if_reserved(lambda: self._usage.release(caller.request_id))
        last = latest.get(0)
        if key is not None and self._cache is not None and last is not None and first_finish in CACHEABLE_FINISH:
            answer = CachedAnswer("".join(text), first_finish, last.prompt_tokens, last.completion_tokens)
            await self._cache.put(key, answer)

    async def _merged(
        self, caller: Caller, request: GenerationRequest, n: int, stream: bool, route: Route
    ) -> AsyncGenerator[Piece, None]:
        if n == 1:
            async with aclosing(self._choice(caller, request, 0, stream, route)) as only:
                async for piece in only:
                    yield piece
            return
        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            seed = request.sampling.seed
            choice = replace(request, sampling=replace(request.sampling, seed=None if seed is None else seed + index))
            try:
                async with aclosing(self._choice(caller, choice, index, stream, route)) as pieces:
                    async for piece in pieces:
                        await queue.put(piece)
                await queue.put(None)
            except Exception as error:  # noqa: BLE001 - handed to the consumer, raised there
                await queue.put(error)

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        try:
            done = 0
            while done < n:
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def embed(self, caller: Caller, model: str, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return await self._inference.embed(model, texts, caller.request_id)

    async def models(self) -> list[ModelEntry]:
        """The catalog's chat models, and the embedding models inference serves."""
        served = await self._inference.models()
        created = {m.id: m.created for m in served}
        chat = [ModelEntry(name, created.get(name, 0)) for name in self._router.models()]
        return chat + [m for m in served if m.kind == "embedding"]

    async def moderate(self, caller: Caller, texts: Sequence[str]) -> list[ModerationVerdict]:
        return await self._moderation_api.check(
            texts, caller.request_id, caller.tenant_id, "input", decision_only=False
        )
