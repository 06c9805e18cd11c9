"""Per-tenant moderation policy on the running platform: the operator edits
the policy file, moderation picks it up without a restart, and the tenant's
streams are moderated by it as they are generated."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.e2e.conftest import MODEL, Platform, create_key_with_cli
from tests.e2e.ledger import wait_for_ledger

pytestmark = pytest.mark.e2e

T = TypeVar("T")


def set_tenant_policy(platform: Platform, tenant_id: str, rules: dict[str, object]) -> None:
    path = platform.stack.data_dir / "moderation" / "policy.yaml"
    policy = yaml.safe_load(path.read_text())
    policy["tenants"][tenant_id] = rules
    path.write_text(yaml.safe_dump(policy))


def wait_for_policy(client: openai.OpenAI, marker_category: str) -> None:
    """A tenant's input rules decide /v1/moderations' verdict too: poll it.
    That is the moderation service's copy of the file; the router reads its
    own for chat, as its next look allows (`until_chat_applies`)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        result = client.moderations.create(input="hello").results[0]
        if result.model_dump(by_alias=True)["categories"][marker_category]:
            return
        time.sleep(0.2)
    raise AssertionError("the edited policy was not picked up")


def until_chat_applies(attempt: Callable[[], T | None], what: str) -> T:
    """Repeats a chat request until the router's copy of the policy shows in
    its answer (`attempt` gives None until then), within 15 s."""
    deadline = time.monotonic() + 15
    while True:
        answer = attempt()
        if answer is not None:
            return answer
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_blocked_output_ends_the_stream_with_content_filter(platform: Platform) -> None:
    key = create_key_with_cli(platform, "strict-output")
    client = platform.openai(key.secret)
    # Any output at all scores above this threshold: the first window is blocked.
    set_tenant_policy(
        platform,
        key.tenant_id,
        {
            "input": {"illicit": {"action": "flag", "threshold": 1e-9}},
            "output": {"violence": {"action": "block", "threshold": 1e-9}},
        },
    )
    wait_for_policy(client, "illicit")

    def filtered_stream() -> list[ChatCompletionChunk] | None:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishes) == 1, finishes
        return chunks if finishes == ["content_filter"] else None

    chunks = until_chat_applies(filtered_stream, "the router did not pick up the output rule")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    (entry,) = wait_for_ledger(platform, key.tenant_id, [chunks[0].id.removeprefix("chatcmpl-")])
    assert (entry.finish_reason, entry.completion_tokens) == ("content_filter", usage.completion_tokens)


def test_tenant_may_send_pii_and_gets_it_redacted_in_output(platform: Platform) -> None:
    key = create_key_with_cli(platform, "redacting")
    client = platform.openai(key.secret)
    set_tenant_policy(
        platform,
        key.tenant_id,
        {"input": {"pii": {"action": "flag"}, "self-harm": {"action": "flag", "threshold": 1e-9}}},
    )
    wait_for_policy(client, "self-harm")

    def let_through() -> ChatCompletion | None:
        try:
            return client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Repeat exactly: my email is anna.schmidt@example.com"}],
                max_tokens=32,
                temperature=0,
            )
        except openai.BadRequestError as refused:  # the default policy, until the router's next look
            assert "blocked by moderation: pii" in str(refused), refused
            return None

    reply = until_chat_applies(let_through, "the router did not pick up the input rule")
    content = reply.choices[0].message.content or ""
    assert content, reply  # the input was let through (flagged only)
    assert "anna.schmidt@example.com" not in content  # output PII is redacted by default
