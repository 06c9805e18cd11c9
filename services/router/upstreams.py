"""gRPC clients of inference and moderation, reached through Envoy's mesh
listeners. They speak the domain types of `domain.py`; upstream statuses come
back as domain errors so the router's interceptor passes the code on."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import grpc

from mariana.inference.v1 import inference_pb2 as inf
from mariana.inference.v1 import inference_pb2_grpc as inf_grpc
from mariana.moderation.v1 import moderation_pb2 as mod
from mariana.moderation.v1 import moderation_pb2_grpc as mod_grpc
from mariana_common.interceptors import error_from_rpc
from services.router.domain import (
    Direction,
    GenerationRequest,
    ModelEntry,
    ModerationVerdict,
    Piece,
    TokenLogprob,
    moderation_reasons,
)

DIRECTIONS = {"input": mod.DIRECTION_INPUT, "output": mod.DIRECTION_OUTPUT}
ACTIONS = {mod.ACTION_ALLOW: "allow", mod.ACTION_FLAG: "flag", mod.ACTION_REDACT: "redact", mod.ACTION_BLOCK: "block"}


def verdict_of(result: mod.TextVerdict) -> ModerationVerdict:
    reasons = moderation_reasons(result.triggered, ((f.category, f.kind) for f in result.findings))
    return ModerationVerdict(
        flagged=result.flagged,
        categories=dict(result.categories),
        scores=dict(result.category_scores),
        action=ACTIONS.get(result.action, "allow"),
        reasons=reasons,
        redacted_text=result.redacted_text,
    )


def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


def generate_request(request: GenerationRequest, request_id: str) -> inf.GenerateRequest:
    s = request.sampling
    sampling = inf.SamplingParams(
        max_tokens=s.max_tokens or 0,
        temperature=s.temperature,
        top_p=s.top_p,
        stop=list(s.stop),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    message = inf.GenerateRequest(request_id=request_id, model=request.model, sampling=sampling)
    if request.messages is not None:
        message.messages.items.extend(inf.Message(role=r, content=t) for r, t in request.messages)
    else:
        message.prompt = request.prompt
    return message


def piece_of(reply: inf.GenerateResponse) -> Piece:
    logprobs = tuple(
        TokenLogprob(lp.token, lp.logprob, tuple((t.token, t.logprob) for t in lp.top_logprobs))
        for lp in reply.logprobs
    )
    usage = reply.usage
    return Piece(
        reply.text,
        reply.finish_reason or None,
        usage.prompt_tokens,
        usage.completion_tokens,
        logprobs,
        after_first_token_s=reply.after_first_token_s,
    )


class GrpcInference:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = inf_grpc.InferenceServiceStub(channel)
        self._timeout_s = timeout_s

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        timeout = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        message = generate_request(request, request_id)
        if not stream:
            # The whole answer in one unary call: a stream's messages cost CPU
            # at both ends and in Envoy, for pieces this caller only joins.
            try:
                reply = await self._stub.Complete(message, timeout=timeout, metadata=_metadata(request_id))
            except grpc.aio.AioRpcError as error:
                raise error_from_rpc(error) from error
            yield piece_of(reply)
            return
        call = self._stub.Generate(message, timeout=timeout, metadata=_metadata(request_id))
        try:
            last: Piece | None = None
            async for reply in call:
                piece = piece_of(reply)
                if piece.finish_reason is None:
                    yield piece
                else:
                    last = piece
            # The last piece is handed on once the call has ended (its status
            # read): callers stop at the last piece, and a call left open would
            # end as cancelled, with its client span never finished.
            if last is not None:
                yield last
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from error
        finally:
            call.cancel()  # a no-op when done; frees inference when our caller went away

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]:
        try:
            reply = await self._stub.Embed(
                inf.EmbedRequest(model=model, texts=list(texts)),
                timeout=self._timeout_s,
                metadata=_metadata(request_id),
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from error
        return [list(v.values) for v in reply.vectors], reply.prompt_tokens

    async def models(self) -> list[ModelEntry]:
        try:
            reply = await self._stub.ListModels(inf.ListModelsRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from error
        return [ModelEntry(m.id, m.created, m.kind or "chat") for m in reply.models]


class GrpcModeration:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = mod_grpc.ModerationServiceStub(channel)
        self._timeout_s = timeout_s

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
        request = mod.CheckRequest(
            decision_only=decision_only,
            texts=list(texts),
            tenant_id=tenant_id,
            direction=DIRECTIONS[direction],
            context=context,
            contexts=list(contexts),
        )
        try:
            reply = await self._stub.Check(request, timeout=self._timeout_s, metadata=_metadata(request_id))
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from error
        return [verdict_of(r) for r in reply.results]
