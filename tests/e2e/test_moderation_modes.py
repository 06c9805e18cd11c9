"""Where requests are moderated. By default the router runs the moderation
engine in its own process (two gRPC round trips fewer per request): chat is
moderated the same with the moderation service gone, which then only takes
/v1/moderations down. With `MARIANA_ROUTER_MODERATION=service` the router
asks the moderation service, and without it refuses chat with 503 rather than
pass it unmoderated."""

from __future__ import annotations

import contextlib
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from pydantic import SecretStr

from launcher.settings import LauncherSettings
from launcher.stack import Stack
from mariana.auth.v1 import auth_pb2, auth_pb2_grpc
from mesh.plan import free_port
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

SECRET = "my key is sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"  # the default policy blocks secrets


@contextlib.contextmanager
def platform_moderating(data_dir: Path, model_dir: Path, moderation: str) -> Iterator[tuple[Stack, openai.OpenAI]]:
    master = "sk-modes-" + secrets.token_urlsafe(12)
    settings = LauncherSettings(
        data_dir=data_dir,
        edge_port=free_port(),
        any_ports=True,
        master_key=SecretStr(master),
        model_dir=model_dir,
        inference_backend="echo",
        service_settings={"router": {"MODERATION": moderation}},
    )
    with Stack(settings) as stack:
        assert stack.plan is not None
        edge = f"127.0.0.1:{stack.plan.edge_port}"
        with grpc.insecure_channel(edge) as channel:
            key = auth_pb2_grpc.AuthAdminServiceStub(channel).CreateKey(
                auth_pb2.CreateKeyRequest(tenant="modes"), metadata=(("authorization", f"Bearer {master}"),), timeout=10
            )
        yield stack, openai.OpenAI(base_url=f"http://{edge}/v1", api_key=key.secret, max_retries=0)


@pytest.fixture
def in_process(tmp_path: Path, model_dir: Path) -> Iterator[tuple[Stack, openai.OpenAI]]:
    with platform_moderating(tmp_path, model_dir, "in_process") as running:
        yield running


@pytest.fixture
def as_service(tmp_path: Path, model_dir: Path) -> Iterator[tuple[Stack, openai.OpenAI]]:
    with platform_moderating(tmp_path, model_dir, "service") as running:
        yield running


def chat(client: openai.OpenAI, text: str) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8)
    return reply.choices[0].message.content or ""


def assert_blocked(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, SECRET)
    assert "blocked by moderation" in str(refused.value) and "secrets" in str(refused.value)


def test_in_process_moderation_holds_without_the_moderation_service(in_process: tuple[Stack, openai.OpenAI]) -> None:
    stack, client = in_process
    assert chat(client, "Say hello.")
    assert_blocked(client)
    stack.process("moderation").signal(signal.SIGKILL)
    stack.process("moderation").popen.wait(10)  # type: ignore[union-attr]
    # Chat is still moderated (by the router), only the moderation API is gone.
    assert chat(client, "Say hello again.")
    assert_blocked(client)
    with pytest.raises(openai.APIStatusError) as down:
        client.moderations.create(input="hello")
    assert down.value.status_code == 503


def test_the_router_can_ask_the_moderation_service_instead(as_service: tuple[Stack, openai.OpenAI]) -> None:
    stack, client = as_service
    assert chat(client, "Say hello.")
    assert_blocked(client)
    stack.process("moderation").signal(signal.SIGKILL)
    stack.process("moderation").popen.wait(10)  # type: ignore[union-attr]
    with pytest.raises(openai.APIStatusError) as refused:
        chat(client, "Say hello again.")
    assert refused.value.status_code == 503
