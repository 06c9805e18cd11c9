"""gRPC adapter of the Gateway for the public `mariana.llm.v1` API: converts
OpenAI-shaped protos to domain requests and domain pieces back to OpenAI's
response and chunk shapes. No routing logic lives here."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace

import grpc

from mariana.common.v1.usage_pb2 import Usage
from mariana.llm.v1 import llm_pb2 as pb
from mariana.llm.v1 import llm_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from mariana_common.server import Context, Registrar
from mariana_common.tracing import annotate
from services.router.domain import ROUTE_HEADERS, Caller, GenerationRequest, Piece, Sampling
from services.router.gateway import Gateway
from services.router.openai_convert import embedding_value, message_text, string_list
from services.router.routing import Route, StreamBroken

SERVICE_NAME = "mariana.llm.v1.LlmService"
ROLES = ("system", "developer", "user", "assistant", "tool")


def caller_of(context: Context) -> Caller:
    """Identity headers are set by auth in Envoy's ext_authz; the edge strips
    any a client sent, and only Envoy can reach this port."""
    headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    tenant, key_id = headers.get("x-mariana-tenant"), headers.get("x-mariana-key-id")
    if not tenant or not key_id:
        raise Unauthenticated("no caller identity: requests must come through the edge")
    models = frozenset(m for m in headers.get("x-mariana-models", "").split(",") if m)
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    return Caller(tenant, key_id, headers.get("x-request-id") or uuid.uuid4().hex, models, deadline)


def annotate_span(caller: Caller, route: Route, usage: Usage | None) -> None:
    """What an operator needs on the router's span: tenant (never the key),
    model, the step of the chain, the pool and its breaker, tokens."""
    attributes: dict[str, str | int | bool] = {
        "mariana.tenant": caller.tenant_id,
        "mariana.model": route.model,
        "mariana.route": route.step,
        "mariana.pool": route.pool,
        "mariana.breaker": route.breaker,
        "mariana.cache_hit": route.step in ("cache", "stale_cache"),
    }
    if usage is not None:
        attributes["mariana.prompt_tokens"] = usage.prompt_tokens
        attributes["mariana.completion_tokens"] = usage.completion_tokens
    annotate(attributes)


def route_headers(route: Route) -> tuple[tuple[str, str], ...]:
    """Where the answer came from: a stream's initial metadata, a whole
    answer's trailing metadata (the edge makes both HTTP response headers)."""
    return tuple(zip(ROUTE_HEADERS, (route.model, route.step, route.pool or "-"), strict=True))


def may_use(caller: Caller, model: str) -> None:
    if caller.models and model not in caller.models:
        raise PermissionDenied(f"this key may not use model {model!r}")


MAX_CHOICES = 8
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit


def sampling_of(
    request: pb.CreateChatCompletionRequest | pb.CreateCompletionRequest, max_tokens: int | None
) -> Sampling:
    """The sampling fields both completion APIs share."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument("max_tokens must be at least 1")
    return Sampling(
        max_tokens=max_tokens,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        stop=tuple(string_list(request.stop, "stop", max_items=4)),
        seed=request.seed if request.HasField("seed") else None,
        presence_penalty=request.presence_penalty if request.HasField("presence_penalty") else 0.0,
        frequency_penalty=request.frequency_penalty if request.HasField("frequency_penalty") else 0.0,
    )


def choices_of(request: pb.CreateChatCompletionRequest | pb.CreateCompletionRequest) -> int:
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}")
    return n


def chat_request(request: pb.CreateChatCompletionRequest) -> GenerationRequest:
    if not request.model:
        raise InvalidArgument("model is required")
    if not request.messages:
        raise InvalidArgument("messages must not be empty")
    if request.HasField("top_logprobs") and not request.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: true")
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        messages.append(("system" if m.role == "developer" else m.role, message_text(m.content, i)))
    max_tokens = request.max_completion_tokens if request.HasField("max_completion_tokens") else None
    if max_tokens is None and request.HasField("max_tokens"):
        max_tokens = request.max_tokens
    sampling = replace(
        sampling_of(request, max_tokens),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs if request.HasField("top_logprobs") else 0,
    )
    return GenerationRequest(request.model, messages=messages, sampling=sampling)


def logprobs_of(pieces: list[Piece]) -> pb.ChoiceLogprobs:
    return pb.ChoiceLogprobs(
        content=[
            pb.TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[pb.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top],
            )
            for piece in pieces
            for lp in piece.logprobs
        ]
    )


def total_usage(pieces: dict[int, list[Piece]]) -> Usage:
    """The prompt once and every choice's completion, as OpenAI counts n > 1."""
    last = [parts[-1] for parts in pieces.values() if parts]
    prompt = max((p.prompt_tokens for p in last), default=0)
    completion = sum(p.completion_tokens for p in last)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class LlmServicer(pb_grpc.LlmServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: Context
    ) -> pb.ChatCompletion:
        caller = caller_of(context)
        if request.stream:
            raise InvalidArgument("stream=true is served by StreamChatCompletion")
        generation, n = chat_request(request), choices_of(request)
        may_use(caller, generation.model)
        pieces = await self._whole_answers(caller, generation, n, context)
        choices = []
        for index, parts in pieces.items():
            choice = pb.ChatChoice(
                index=index,
                message=pb.AssistantMessage(role="assistant", content="".join(p.text for p in parts)),
                finish_reason=parts[-1].finish_reason or "stop",
            )
            if request.logprobs:
                choice.logprobs.CopyFrom(logprobs_of(parts))
            choices.append(choice)
        return pb.ChatCompletion(
            id=f"chatcmpl-{caller.request_id}",
            object="chat.completion",
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=total_usage(pieces),
        )

    async def _whole_answers(
        self, caller: Caller, generation: GenerationRequest, n: int, context: Context
    ) -> dict[int, list[Piece]]:
        """Every choice's pieces of a request not streamed (a restart voids the
        pieces before it); route headers sent and the span annotated."""
        pieces: dict[int, list[Piece]] = {i: [] for i in range(n)}
        route = Route()
        async with aclosing(self._gateway.generate(caller, generation, n, stream=False, route=route)) as stream:
            async for piece in stream:
                if piece.restarted:
                    pieces[piece.index].clear()
                pieces[piece.index].append(piece)
        # With the status, not as headers of their own: sending initial metadata
        # is a write (and a completion to wait for) of its own, ~0.1 ms of the
        # router's CPU per request; the edge copies them into HTTP headers.
        context.set_trailing_metadata(route_headers(route))
        annotate_span(caller, route, total_usage(pieces))
        return pieces

    async def StreamChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: Context
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        caller = caller_of(context)
        generation, n = chat_request(request), choices_of(request)
        may_use(caller, generation.model)
        include_usage = request.stream_options.include_usage
        created = int(time.time())

        def chunk(choices: list[pb.ChatChunkChoice], usage: Usage | None = None) -> pb.ChatCompletionChunk:
            return pb.ChatCompletionChunk(
                id=f"chatcmpl-{caller.request_id}",
                object="chat.completion.chunk",
                created=created,
                model=request.model,
                choices=choices,
                usage=usage,
            )

        route = Route()
        async with aclosing(self._gateway.generate(caller, generation, n, route=route)) as pieces:
            chunks_of = self._stream_chunks(pieces, context, caller, route, n, include_usage, chunk)
            async with aclosing(chunks_of) as chunks:
                async for out in chunks:
                    yield out

    async def _stream_chunks(
        self,
        pieces: AsyncGenerator[Piece, None],
        context: Context,
        caller: Caller,
        route: Route,
        n: int,
        include_usage: bool,
        chunk: Callable[..., pb.ChatCompletionChunk],
    ) -> AsyncGenerator[pb.ChatCompletionChunk, None]:
        # The first piece is awaited before anything is sent, so a refusal
        # (moderation, bad model, overload, no pool) is a clean status, not a
        # broken stream.
        piece = await anext(pieces)
        await context.send_initial_metadata(route_headers(route))
        for index in range(n):
            yield chunk([pb.ChatChunkChoice(index=index, delta=pb.ChatDelta(role="assistant", content=""))])
        latest: dict[int, list[Piece]] = {}
        while True:
            latest[piece.index] = [piece]
            choice = pb.ChatChunkChoice(index=piece.index, delta=pb.ChatDelta())
            if piece.text:
                choice.delta.content = piece.text
            if piece.logprobs:
                choice.logprobs.CopyFrom(logprobs_of([piece]))
            if piece.finish_reason is not None:
                choice.finish_reason = piece.finish_reason
            yield chunk([choice])
            try:
                piece = await anext(pieces, None)  # type: ignore[arg-type]
            except StreamBroken as error:
                broken = chunk([])
                broken.error.CopyFrom(pb.StreamError(message=str(error), type="server_error", code="stream_broken"))
                yield broken
                return
            if piece is None:
                break
        annotate_span(caller, route, total_usage(latest))
        if include_usage:
            yield chunk([], total_usage(latest))

    async def CreateCompletion(self, request: pb.CreateCompletionRequest, context: Context) -> pb.Completion:
        caller = caller_of(context)
        if request.stream:
            raise InvalidArgument("stream=true is not supported on /v1/completions yet; use chat completions")
        if not request.model:
            raise InvalidArgument("model is required")
        may_use(caller, request.model)
        prompts = string_list(request.prompt, "prompt")
        if len(prompts) != 1:
            raise InvalidArgument("prompt must be one string")
        n = choices_of(request)
        sampling = sampling_of(request, request.max_tokens if request.HasField("max_tokens") else None)
        generation = GenerationRequest(request.model, prompt=prompts[0], sampling=sampling)
        pieces = await self._whole_answers(caller, generation, n, context)
        echo = prompts[0] if request.echo else ""
        return pb.Completion(
            id=f"cmpl-{caller.request_id}",
            object="text_completion",
            created=int(time.time()),
            model=request.model,
            choices=[
                pb.CompletionChoice(
                    index=i,
                    text=echo + "".join(p.text for p in parts),
                    finish_reason=parts[-1].finish_reason or "stop",
                )
                for i, parts in pieces.items()
            ],
            usage=total_usage(pieces),
        )

    async def CreateEmbedding(self, request: pb.CreateEmbeddingRequest, context: Context) -> pb.CreateEmbeddingResponse:
        caller = caller_of(context)
        if not request.model:
            raise InvalidArgument("model is required")
        may_use(caller, request.model)
        texts = string_list(request.input, "input")
        if not texts:
            raise InvalidArgument("input must be a non-empty string or list of strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise InvalidArgument(f"input may hold at most {MAX_EMBEDDING_INPUTS} texts, not {len(texts)}")
        vectors, tokens = await self._gateway.embed(caller, request.model, texts)
        if request.HasField("dimensions") and vectors and request.dimensions != len(vectors[0]):
            raise InvalidArgument(f"dimensions must be {len(vectors[0])} for {request.model}")
        return pb.CreateEmbeddingResponse(
            object="list",
            model=request.model,
            data=[
                pb.Embedding(object="embedding", index=i, embedding=embedding_value(v, request.encoding_format))
                for i, v in enumerate(vectors)
            ],
            usage=pb.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        caller = caller_of(context)
        models = [m for m in await self._gateway.models() if not caller.models or m.id in caller.models]
        return pb.ListModelsResponse(
            object="list",
            data=[pb.Model(id=m.id, object="model", created=m.created, owned_by="mariana") for m in models],
        )

    async def CreateModeration(
        self, request: pb.CreateModerationRequest, context: Context
    ) -> pb.CreateModerationResponse:
        caller = caller_of(context)
        texts = string_list(request.input, "input")
        if not texts:
            raise InvalidArgument("input must be a non-empty string or list of strings")
        verdicts = await self._gateway.moderate(caller, texts)
        return pb.CreateModerationResponse(
            id=f"modr-{caller.request_id}",
            model=request.model or "mariana-moderation-rules",
            results=[
                pb.ModerationResult(flagged=v.flagged, categories=v.categories, category_scores=v.scores)
                for v in verdicts
            ],
        )


def register(gateway: Gateway) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_LlmServiceServicer_to_server(LlmServicer(gateway), server)

    return add
