"""Remote OpenAI-compatible pools, against a real HTTP server on loopback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mariana_common.errors import ResourceExhausted, Unavailable
from services.router.catalog import Catalog, PoolConfig
from services.router.domain import GenerationRequest, Inference, Piece
from services.router.remote import OpenAICompatiblePool, read_key
from services.router.routing import ModelRouter, Route
from services.router.tests.test_cache import Switchable
from tests.openai_compatible_server import OpenAICompatibleServer

KEY = "sk-remote-test-key"


@pytest.fixture
async def server() -> AsyncIterator[OpenAICompatibleServer]:
    s = OpenAICompatibleServer(api_key=KEY)
    await s.start()
    yield s
    await s.stop()


async def pieces(pool: Inference, model: str, text: str = "hello there") -> list[Piece]:
    request = GenerationRequest(model, messages=[("user", text)])
    return [p async for p in pool.generate(request, "req-1", 5.0)]


async def test_a_remote_stream_becomes_pieces_with_the_providers_usage(server: OpenAICompatibleServer) -> None:
    pool = OpenAICompatiblePool(server.base_url, KEY, 10)
    got = await pieces(pool, "gpt-remote")
    assert "".join(p.text for p in got) == "remote says: hello there "
    assert (got[-1].finish_reason, got[-1].prompt_tokens, got[-1].completion_tokens) == ("stop", 7, 4)
    assert server.requests[0]["model"] == "gpt-remote" and server.requests[0]["stream"] is True
    assert server.authorizations == [f"Bearer {KEY}"]
    await pool.close()


async def test_provider_errors_map_to_statuses(server: OpenAICompatibleServer) -> None:
    pool = OpenAICompatiblePool(server.base_url, KEY, 10)
    with pytest.raises(Unavailable):
        await pieces(pool, "fail-500")
    with pytest.raises(ResourceExhausted):
        await pieces(pool, "rate-limited")
    with pytest.raises(Unavailable):
        await pieces(pool, "hang-up")
    with pytest.raises(Unavailable):
        await pieces(OpenAICompatiblePool("http://127.0.0.1:1/v1", KEY, 2), "m")
    await pool.close()


def test_the_key_comes_from_the_environment_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    monkeypatch.setenv("REMOTE_KEY", "sk-from-env")
    assert read_key("REMOTE_KEY", secret) == "sk-from-env"
    assert read_key("UNSET_VARIABLE", secret) == "sk-from-file"


async def test_a_remote_provider_serves_as_the_fallback_of_a_local_model(server: OpenAICompatibleServer) -> None:
    catalog = Catalog.model_validate(
        {
            "pools": {
                "local": {"upstream": "inference", "model": "m"},
                "remote": {"kind": "openai", "base_url": server.base_url, "model": "gpt-remote"},
            },
            "models": {"m": {"pools": ["local"], "fallbacks": ["r"]}, "r": {"pools": ["remote"]}},
            "retry": {"retries": 0},
        }
    )
    local = Switchable(["local answer"])
    local.down = True
    remote = OpenAICompatiblePool(server.base_url, KEY, 10)

    def make(name: str, config: PoolConfig) -> Inference:
        return local if config.kind == "mesh" else remote

    router = ModelRouter(lambda: catalog, make, random.Random(1))
    route = Route()
    request = GenerationRequest("m", messages=[("user", "hi")])
    text = "".join([p.text async for p in router.generate(request, "req", route)])
    assert text == "remote says: hi "
    assert (route.model, route.pool, route.step) == ("r", "remote", "fallback")
    await remote.close()
