"""gRPC adapter of the Gateway for the public `mariana.llm.v1` API: converts
OpenAI-shaped protos to domain requests and domain pieces back to OpenAI's
response and chunk shapes. No routing logic lives here."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from mariana.common.v1.usage_pb2 import Usage
from mariana.llm.v1 import llm_pb2 as pb
from mariana.llm.v1 import llm_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument, Unauthenticated
from mariana_common.server import Context, Registrar
from services.router.domain import Caller, GenerationRequest, Piece, Sampling
from services.router.gateway import Gateway
from services.router.openai_convert import embedding_value, message_text, string_list

SERVICE_NAME = "mariana.llm.v1.LlmService"
ROLES = ("system", "developer", "user", "assistant", "tool")


def caller_of(context: Context) -> Caller:
    """Identity headers are set by auth in Envoy's ext_authz; the edge strips
    any a client sent, and only Envoy can reach this port."""
    headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    tenant, key_id = headers.get("x-mariana-tenant"), headers.get("x-mariana-key-id")
    if not tenant or not key_id:
        raise Unauthenticated("no caller identity: requests must come through the edge")
    return Caller(tenant, key_id, headers.get("x-request-id") or uuid.uuid4().hex)


def sampling_of(
    max_tokens: int | None, temperature: float | None, top_p: float | None, stop: list[str], seed: int | None
) -> Sampling:
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument("max_tokens must be at least 1")
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=tuple(stop),
        seed=seed,
    )


def _opt(message: object, name: str) -> object | None:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]


def chat_request(request: pb.CreateChatCompletionRequest) -> GenerationRequest:
    if not request.model:
        raise InvalidArgument("model is required")
    if not request.messages:
        raise InvalidArgument("messages must not be empty")
    if request.HasField("n") and request.n != 1:
        raise InvalidArgument("n must be 1; several choices per request are not supported yet")
    if request.HasField("logprobs") and request.logprobs:
        raise InvalidArgument("logprobs are not supported yet")
    messages = []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        messages.append(("system" if m.role == "developer" else m.role, message_text(m.content, i)))
    max_tokens = request.max_completion_tokens if request.HasField("max_completion_tokens") else None
    if max_tokens is None and request.HasField("max_tokens"):
        max_tokens = request.max_tokens
    sampling = sampling_of(
        max_tokens,
        request.temperature if request.HasField("temperature") else None,
        request.top_p if request.HasField("top_p") else None,
        string_list(request.stop, "stop", max_items=4),
        request.seed if request.HasField("seed") else None,
    )
    return GenerationRequest(request.model, messages=messages, sampling=sampling)


def usage_of(piece: Piece) -> Usage:
    return Usage(
        prompt_tokens=piece.prompt_tokens,
        completion_tokens=piece.completion_tokens,
        total_tokens=piece.prompt_tokens + piece.completion_tokens,
    )


class LlmServicer(pb_grpc.LlmServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: Context
    ) -> pb.ChatCompletion:
        caller = caller_of(context)
        if request.stream:
            raise InvalidArgument("stream=true is served by StreamChatCompletion")
        generation = chat_request(request)
        parts, last = [], Piece("")
        async for piece in self._gateway.generate(caller, generation):
            parts.append(piece.text)
            last = piece
        return pb.ChatCompletion(
            id=f"chatcmpl-{caller.request_id}",
            object="chat.completion",
            created=int(time.time()),
            model=request.model,
            choices=[
                pb.ChatChoice(
                    index=0,
                    message=pb.AssistantMessage(role="assistant", content="".join(parts)),
                    finish_reason=last.finish_reason or "stop",
                )
            ],
            usage=usage_of(last),
        )

    async def StreamChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: Context
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        caller = caller_of(context)
        generation = chat_request(request)
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

        pieces = self._gateway.generate(caller, generation)
        # The first piece is awaited before anything is sent, so a refusal
        # (moderation, bad model) is a clean status, not a broken stream.
        first = await anext(pieces)
        yield chunk([pb.ChatChunkChoice(index=0, delta=pb.ChatDelta(role="assistant", content=""))])
        piece = first
        while True:
            if piece.text:
                yield chunk([pb.ChatChunkChoice(index=0, delta=pb.ChatDelta(content=piece.text))])
            if piece.finish_reason is not None:
                yield chunk([pb.ChatChunkChoice(index=0, delta=pb.ChatDelta(), finish_reason=piece.finish_reason)])
                if include_usage:
                    yield chunk([], usage_of(piece))
                return
            piece = await anext(pieces)

    async def CreateCompletion(self, request: pb.CreateCompletionRequest, context: Context) -> pb.Completion:
        caller = caller_of(context)
        if request.stream:
            raise InvalidArgument("stream=true is not supported on /v1/completions yet; use chat completions")
        if not request.model:
            raise InvalidArgument("model is required")
        if request.HasField("n") and request.n != 1:
            raise InvalidArgument("n must be 1")
        prompts = string_list(request.prompt, "prompt")
        if len(prompts) != 1:
            raise InvalidArgument("prompt must be one string")
        sampling = sampling_of(
            request.max_tokens if request.HasField("max_tokens") else None,
            request.temperature if request.HasField("temperature") else None,
            request.top_p if request.HasField("top_p") else None,
            string_list(request.stop, "stop", max_items=4),
            request.seed if request.HasField("seed") else None,
        )
        generation = GenerationRequest(request.model, prompt=prompts[0], sampling=sampling)
        parts, last = [prompts[0]] if request.echo else [], Piece("")
        async for piece in self._gateway.generate(caller, generation):
            parts.append(piece.text)
            last = piece
        return pb.Completion(
            id=f"cmpl-{caller.request_id}",
            object="text_completion",
            created=int(time.time()),
            model=request.model,
            choices=[pb.CompletionChoice(index=0, text="".join(parts), finish_reason=last.finish_reason or "stop")],
            usage=usage_of(last),
        )

    async def CreateEmbedding(self, request: pb.CreateEmbeddingRequest, context: Context) -> pb.CreateEmbeddingResponse:
        caller = caller_of(context)
        if not request.model:
            raise InvalidArgument("model is required")
        texts = string_list(request.input, "input")
        if not texts:
            raise InvalidArgument("input must be a non-empty string or list of strings")
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
        caller_of(context)
        models = await self._gateway.models()
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
