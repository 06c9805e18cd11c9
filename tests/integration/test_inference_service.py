"""The inference service's gRPC face on a real server with mTLS: several
models in one process, streaming and whole answers, cancellation by the
client, and statuses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from mariana.inference.v1 import inference_pb2 as pb
from mariana.inference.v1 import inference_pb2_grpc as pb_grpc
from mariana_common.server import Server, create_server
from mariana_common.settings import ServiceSettings
from mariana_common.tls import channel_credentials
from mesh.pki import CertFiles
from services.inference import servicer
from services.inference.embedder import Embedder, packaged_minilm
from services.inference.engine import Engine
from services.inference.loader import load_model
from services.inference.scheduler import Limits


@pytest.fixture(scope="module")
def engines(model_dir: Path) -> dict[str, Engine]:
    loaded = load_model(model_dir, "torch")
    # Two names over one set of weights: enough to show routing by model.
    return {"chat-a": Engine("chat-a", loaded, 16, Limits()), "chat-b": Engine("chat-b", loaded, 16, Limits())}


@contextlib.asynccontextmanager
async def serving(engines: dict[str, Engine], pki: dict[str, CertFiles]) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    own = pki["inference"]
    settings = ServiceSettings(tls_cert=own.cert, tls_key=own.key, tls_ca=own.ca, port=0)
    embedder = Embedder("all-minilm-l6-v2", packaged_minilm())
    server: Server = create_server(settings, servicer.register(engines, embedder), [servicer.SERVICE_NAME])
    await server.start()
    client = pki["router"]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{server.port}", channel_credentials(client.cert, client.key, client.ca)
    ) as channel:
        yield pb_grpc.InferenceServiceStub(channel)
    await server.stop(0)


@pytest.fixture
async def stub(engines: dict[str, Engine], pki: dict[str, CertFiles]) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    async with serving(engines, pki) as stub:
        yield stub


def chat(model: str, text: str, **sampling: object) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, sampling=pb.SamplingParams(**sampling))  # type: ignore[arg-type]
    request.messages.items.add(role="user", content=text)
    return request


async def test_lists_every_model_with_backend_and_kind(stub: pb_grpc.InferenceServiceStub) -> None:
    reply = await stub.ListModels(pb.ListModelsRequest())
    kinds = {m.id: (m.kind, m.backend, m.device) for m in reply.models}
    assert kinds == {
        "chat-a": ("chat", "torch", "cpu"),
        "chat-b": ("chat", "torch", "cpu"),
        "all-minilm-l6-v2": ("embedding", "torch", "cpu"),
    }


async def test_stream_carries_usage_on_every_message(stub: pb_grpc.InferenceServiceStub) -> None:
    replies = [r async for r in stub.Generate(chat("chat-b", "Count to ten.", max_tokens=12))]
    assert len(replies) >= 3
    completions = [r.usage.completion_tokens for r in replies]
    assert completions == sorted(completions) and replies[-1].finish_reason in ("stop", "length")
    assert all(r.usage.prompt_tokens == replies[0].usage.prompt_tokens > 0 for r in replies)


async def test_complete_is_the_whole_answer_in_one_reply(stub: pb_grpc.InferenceServiceStub) -> None:
    request = chat("chat-a", "Name three rivers.", max_tokens=24, temperature=0.0, logprobs=True)
    streamed = [r async for r in stub.Generate(request)]
    whole = await stub.Complete(request)
    assert whole.text == "".join(r.text for r in streamed) and whole.text
    assert whole.usage == streamed[-1].usage and whole.finish_reason == streamed[-1].finish_reason
    assert len(whole.logprobs) == whole.usage.completion_tokens
    assert [lp.token for lp in whole.logprobs] == [lp.token for r in streamed for lp in r.logprobs]
    assert 0 < whole.after_first_token_s < 60


async def test_a_cancelled_complete_frees_the_slot(
    stub: pb_grpc.InferenceServiceStub, engines: dict[str, Engine]
) -> None:
    call = stub.Complete(chat("chat-b", "Write a very long essay about rivers.", max_tokens=400))
    deadline = time.monotonic() + 10
    while engines["chat-b"].stats().running == 0:
        assert time.monotonic() < deadline, engines["chat-b"].stats()
        await asyncio.sleep(0.02)
    call.cancel()
    while engines["chat-b"].stats().kv_tokens_reserved:
        assert time.monotonic() < deadline, engines["chat-b"].stats()
        await asyncio.sleep(0.02)
    assert engines["chat-b"].stats().free_slots == Limits().max_batch


async def test_client_cancel_frees_the_slot(stub: pb_grpc.InferenceServiceStub, engines: dict[str, Engine]) -> None:
    call = stub.Generate(chat("chat-a", "Write a very long essay about rivers.", max_tokens=400))
    await call.read()
    await call.read()
    assert engines["chat-a"].stats().running == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while engines["chat-a"].stats().kv_tokens_reserved:
        assert time.monotonic() < deadline, engines["chat-a"].stats()
        await asyncio.sleep(0.02)
    assert engines["chat-a"].stats().free_slots == Limits().max_batch
    stats = {e.model: e for e in (await stub.GetStats(pb.GetStatsRequest())).engines}
    assert stats["chat-a"].free_slots == Limits().max_batch and stats["chat-a"].running == 0


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (chat("nope", "hi"), grpc.StatusCode.NOT_FOUND),
        (chat("chat-a", "hi", temperature=5), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(model="chat-a"), grpc.StatusCode.INVALID_ARGUMENT),
        (chat("chat-a", "word " * 9000), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_requests_get_clear_statuses(
    stub: pb_grpc.InferenceServiceStub, request_: pb.GenerateRequest, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [r async for r in stub.Generate(request_)]
    assert error.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as whole:
        await stub.Complete(request_)
    assert whole.value.code() == code


async def test_embed(stub: pb_grpc.InferenceServiceStub) -> None:
    reply = await stub.Embed(pb.EmbedRequest(model="all-minilm-l6-v2", texts=["a", "b c"]))
    assert [len(v.values) for v in reply.vectors] == [384, 384] and reply.prompt_tokens > 0
