"""gRPC adapter of the served models: proto <-> domain, nothing else."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import replace

import grpc
import structlog

from mariana.common.v1.usage_pb2 import Usage
from mariana.inference.v1 import inference_pb2 as pb
from mariana.inference.v1 import inference_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument, NotFound, Unavailable
from mariana_common.server import Context, Registrar
from services.inference.embedder import Embedder
from services.inference.engine import ChatEngine, GenerationInput, Sampling
from services.inference.metrics import TIME_TO_FIRST_TOKEN, TOKENS_GENERATED
from services.inference.sampling import TokenLogprob
from services.inference.scheduler import Event

SERVICE_NAME = "mariana.inference.v1.InferenceService"
log = structlog.get_logger()


def generation_input(request: pb.GenerateRequest) -> GenerationInput:
    s = request.sampling
    sampling = Sampling(
        max_tokens=s.max_tokens or None,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    if request.WhichOneof("input") == "messages":
        messages = [(m.role, m.content) for m in request.messages.items]
        return GenerationInput(request.model, messages=messages, sampling=sampling)
    if request.WhichOneof("input") != "prompt":
        raise InvalidArgument("a generate request needs messages or a prompt")
    return GenerationInput(request.model, prompt=request.prompt, sampling=sampling)


def response_of(engine: ChatEngine, event: Event, after_first_token_s: float = 0.0) -> pb.GenerateResponse:
    usage = Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )
    return pb.GenerateResponse(
        text=event.text,
        finish_reason=event.finish_reason or "",
        usage=usage,
        logprobs=[logprob_to_proto(engine, lp) for lp in event.logprobs],
        after_first_token_s=after_first_token_s,
    )


def logprob_to_proto(engine: ChatEngine, lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token=engine.token_text(lp.token),
        logprob=lp.logprob,
        top_logprobs=[pb.TopLogprob(token=engine.token_text(t), logprob=v) for t, v in lp.top],
    )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, engines: Mapping[str, ChatEngine], embedder: Embedder | None) -> None:
        self._engines = engines
        self._embedder = embedder

    def _engine(self, model: str) -> ChatEngine:
        engine = self._engines.get(model)
        if engine is None:
            raise NotFound(f"model {model!r} is not served here; models: {', '.join(self._engines)}")
        return engine

    async def _steps(self, engine: ChatEngine, request: pb.GenerateRequest) -> AsyncGenerator[Event, None]:
        """The engine's events for one request, counted in the metrics."""
        generated, started = 0, time.perf_counter()
        try:
            async with aclosing(engine.generate(generation_input(request))) as events:
                async for step in events:
                    if not generated and step.completion_tokens:
                        TIME_TO_FIRST_TOKEN.labels(request.model).observe(time.perf_counter() - started)
                    generated = step.completion_tokens
                    yield step
        finally:
            TOKENS_GENERATED.labels(request.model).inc(generated)

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        engine = self._engine(request.model)
        sent, finished = 0, False
        try:
            async with aclosing(self._steps(engine, request)) as steps:
                async for event in steps:
                    finished = event.finish_reason is not None
                    yield response_of(engine, event)
                    sent = event.completion_tokens
        finally:
            if not finished:
                # The caller went away (or the engine failed): what it was sent
                # is what it can bill; the batch slot is freed at the next step.
                log.info("generation stopped early", request_id=request.request_id, completion_tokens_sent=sent)

    async def Complete(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        engine = self._engine(request.model)
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        last: Event | None = None
        first_token_at = None
        try:
            async with aclosing(self._steps(engine, request)) as steps:
                async for last in steps:
                    if first_token_at is None and last.completion_tokens:
                        first_token_at = time.perf_counter()
                    texts.append(last.text)
                    logprobs.extend(last.logprobs)
        except BaseException:  # the caller went away (or the engine failed): it was sent nothing
            log.info("generation stopped early", request_id=request.request_id, completion_tokens_sent=0)
            raise
        if last is None or last.finish_reason is None:
            raise Unavailable("the engine ended without finishing the answer")
        answer = replace(last, text="".join(texts), logprobs=tuple(logprobs))
        after_first = 0.0 if first_token_at is None else time.perf_counter() - first_token_at
        return response_of(engine, answer, after_first)

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        if self._embedder is None:
            raise NotFound("no embedding model is served here")
        vectors, tokens = await self._embedder.embed(request.model, list(request.texts))
        return pb.EmbedResponse(vectors=[pb.Vector(values=v) for v in vectors], prompt_tokens=tokens)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        models = []
        for engine in self._engines.values():
            card = engine.card()
            models.append(
                pb.ModelInfo(
                    id=card.id,
                    backend=card.backend,
                    device=card.device,
                    context_length=card.context_length,
                    created=card.created,
                    kind="chat",
                )
            )
        if self._embedder is not None:
            e = self._embedder
            models.append(
                pb.ModelInfo(
                    id=e.model_id,
                    backend="torch",
                    device="cpu",
                    context_length=e.max_tokens,
                    created=e.created,
                    kind="embedding",
                )
            )
        return pb.ListModelsResponse(models=models)

    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.GetStatsResponse:
        engines = []
        for model, engine in self._engines.items():
            stats = engine.stats()
            engines.append(
                pb.EngineStats(
                    model=model,
                    running=stats.running,
                    prefilling=stats.prefilling,
                    waiting=stats.waiting,
                    free_slots=stats.free_slots,
                    kv_tokens_reserved=stats.kv_tokens_reserved,
                )
            )
        return pb.GetStatsResponse(engines=engines)


def register(engines: Mapping[str, ChatEngine], embedder: Embedder | None) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        servicer = InferenceServicer(engines, embedder)
        pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    return add
