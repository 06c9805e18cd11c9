"""gRPC adapter of the Engine: proto <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mariana.common.v1.usage_pb2 import Usage
from mariana.inference.v1 import inference_pb2 as pb
from mariana.inference.v1 import inference_pb2_grpc as pb_grpc
from mariana_common.server import Context, Registrar
from services.inference.engine import Engine, GenerationInput, Sampling

SERVICE_NAME = "mariana.inference.v1.InferenceService"


def generation_input(request: pb.GenerateRequest) -> GenerationInput:
    s = request.sampling
    sampling = Sampling(
        max_tokens=s.max_tokens or None,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
    )
    if request.WhichOneof("input") == "messages":
        messages = [(m.role, m.content) for m in request.messages.items]
        return GenerationInput(request.model, messages=messages, sampling=sampling)
    return GenerationInput(request.model, prompt=request.prompt, sampling=sampling)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        async for delta in self._engine.generate(generation_input(request)):
            usage = Usage(
                prompt_tokens=delta.prompt_tokens,
                completion_tokens=delta.completion_tokens,
                total_tokens=delta.prompt_tokens + delta.completion_tokens,
            )
            yield pb.GenerateResponse(text=delta.text, finish_reason=delta.finish_reason or "", usage=usage)

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        vectors, tokens = await self._engine.embed(request.model, list(request.texts))
        return pb.EmbedResponse(vectors=[pb.Vector(values=v) for v in vectors], prompt_tokens=tokens)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        card = self._engine.card()
        info = pb.ModelInfo(
            id=card.id,
            backend=card.backend,
            device=card.device,
            context_length=card.context_length,
            created=card.created,
        )
        return pb.ListModelsResponse(models=[info])


def register(engine: Engine) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine), server)

    return add
