"""The official `openai` SDK against the edge, unmodified but for base_url."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import EMBEDDER, MODEL, Platform, TenantKey, create_key_with_cli
from tests.e2e.ledger import ledger_entries, wait_for_ledger

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL, EMBEDDER}
    assert models[MODEL].object == "model" and models[MODEL].created > 1_700_000_000


def test_several_choices_and_logprobs(client: openai.OpenAI, platform: Platform, tenant_key: TenantKey) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=1.0, seed=11, n=3, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)  # type: ignore[union-attr]
    (entry,) = wait_for_ledger(platform, tenant_key.tenant_id, [reply.id.removeprefix("chatcmpl-")])
    assert (entry.prompt_tokens, entry.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_every_completed_request_has_exactly_one_ledger_row(platform: Platform) -> None:
    key = create_key_with_cli(platform, "ledger-check")
    client = platform.openai(key.secret)
    ids = []
    for _ in range(2):
        ids.append(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4).id)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True)
    ids.append({chunk.id for chunk in stream}.pop())
    ids.append(client.completions.create(model=MODEL, prompt="Hello", max_tokens=4).id)
    with pytest.raises(openai.BadRequestError):  # refused: no usage
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a@b.org"}], max_tokens=4)
    request_ids = [i.split("-", 1)[1] for i in ids]
    assert len(wait_for_ledger(platform, key.tenant_id, request_ids)) == 4
    entries = ledger_entries(platform, key.tenant_id)
    assert sorted(e.request_id for e in entries) == sorted(request_ids)


def test_chat_completion(client: openai.OpenAI, platform: Platform, tenant_key: TenantKey) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.object == "chat.completion" and isinstance(reply.created, int)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    request_id = reply.id.removeprefix("chatcmpl-")
    (entry,) = wait_for_ledger(platform, tenant_key.tenant_id, [request_id])
    assert (entry.key_id, entry.model) == (tenant_key.key_id, MODEL)
    assert (entry.prompt_tokens, entry.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_streamed_chat_arrives_incrementally(client: openai.OpenAI, platform: Platform, tenant_key: TenantKey) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long poem about the sea."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, texts, finish, usage, ids = [], [], None, None, set()
    for chunk in stream:
        arrivals.append(time.monotonic())
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content:
                texts.append(delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    # Output is released in moderated windows of ~32 characters, not per token.
    assert len(texts) >= 3, texts
    assert "".join(texts).strip()
    assert arrivals[-1] - arrivals[0] > 0  # not one buffered blob
    assert finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 48
    if finish == "length":
        assert usage.completion_tokens == 48
    assert len(ids) == 1
    (entry,) = wait_for_ledger(platform, tenant_key.tenant_id, [ids.pop().removeprefix("chatcmpl-")])
    assert (entry.completion_tokens, entry.finish_reason) == (usage.completion_tokens, finish)


def test_completion_and_stop(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="One, two, three, four,", max_tokens=12, temperature=0, stop=[","]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert "," not in reply.choices[0].text
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    as_base64 = client.embeddings.create(model=EMBEDDER, input=["hello world", "goodbye"])  # SDK default: base64
    as_float = client.embeddings.create(model=EMBEDDER, input="hello world", encoding_format="float")
    assert len(as_base64.data) == 2 and as_base64.data[1].index == 1
    assert len(as_base64.data[0].embedding) == len(as_float.data[0].embedding) == 384
    assert as_base64.data[0].embedding == pytest.approx(as_float.data[0].embedding, abs=1e-6)
    assert as_base64.usage.prompt_tokens > 0


def test_embeddings_of_many_texts_and_too_many(client: openai.OpenAI) -> None:
    """Past the stream's buffer (1 MiB) the edge's transcoder used to answer 500,
    and the mesh's HTTP/1.1 bridge, which holds the whole answer, did too: 800
    embeddings are ~1.3 MB as protobuf, ~6.5 MB as JSON floats. Past OpenAI's
    2,048 inputs, a 400."""
    texts = [f"sentence number {i} about the sky" for i in range(800)]
    many = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    assert [d.index for d in many.data] == list(range(800))
    assert all(len(d.embedding) == 384 for d in many.data)
    with pytest.raises(openai.BadRequestError, match="at most 2048"):
        client.embeddings.create(model=EMBEDDER, input=["x"] * 2049)


def test_moderations_endpoint(client: openai.OpenAI) -> None:
    result = client.moderations.create(
        input=["hello there", "write to bob@example.com", "I will find you and kill you"]
    )
    assert [r.flagged for r in result.results] == [False, True, True]
    clean, pii, violent = (r.model_dump(by_alias=True) for r in result.results)
    for key in ("harassment", "hate", "self-harm", "sexual", "violence", "illicit", "pii", "secrets"):
        assert 0 <= clean["category_scores"][key] <= 1
    assert pii["categories"]["pii"] and not pii["categories"]["violence"]
    assert violent["categories"]["violence"] and violent["category_scores"]["violence"] > 0.8


def test_bad_key_is_401(platform: Platform) -> None:
    with pytest.raises(openai.AuthenticationError) as error:
        platform.openai("mk_000000000000_not-a-real-key").models.list()
    assert error.value.status_code == 401
    assert "invalid API key" in str(error.value)


def test_missing_key_is_401(platform: Platform) -> None:
    reply = httpx.get(f"http://{platform.edge}/v1/models", timeout=10)
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_flagged_prompt_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "my card is 4111 1111 1111 1111"}], max_tokens=5
        )
    assert "pii (credit_card)" in str(error.value)


def test_toxic_prompt_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "you are a worthless idiot, everyone hates you"}]
        )
    assert "harassment" in str(error.value)


def test_flagged_prompt_is_400_when_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "mail jane@example.org"}], max_tokens=5, stream=True
        )


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-99", messages=QUESTION, max_tokens=5)
    assert error.value.code == "not_found" and "gpt-99" in error.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 9},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
    ],
)
def test_bad_requests_are_400(platform: Platform, tenant_key: TenantKey, body: dict[str, object]) -> None:
    reply = httpx.post(
        f"http://{platform.edge}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {tenant_key.secret}"},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]  # OpenAI's error shape
    assert error["message"] and error["type"] == "invalid_request_error" and error["code"] == "invalid_request"


def test_unknown_path_is_404(platform: Platform, tenant_key: TenantKey) -> None:
    reply = httpx.get(
        f"http://{platform.edge}/v2/nothing", headers={"Authorization": f"Bearer {tenant_key.secret}"}, timeout=10
    )
    assert reply.status_code == 404


def test_route_headers_aliases_and_the_answer_cache(platform: Platform) -> None:
    key = create_key_with_cli(platform, "cache-check")
    client = platform.openai(key.secret)
    question = [{"role": "user", "content": "Name a colour of the sky."}]
    first = client.chat.completions.with_raw_response.create(
        model="default",
        messages=question,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert first.headers["x-mariana-model"] == MODEL
    assert first.headers["x-mariana-route"] == "primary" and first.headers["x-mariana-pool"] == "local"
    again = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=question,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert again.headers["x-mariana-route"] == "cache"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    sampled = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=question,
        max_tokens=8,
        temperature=0.9,  # type: ignore[arg-type]
    )
    assert sampled.headers["x-mariana-route"] == "primary"  # not deterministic: never cached
    other = platform.openai(create_key_with_cli(platform, "cache-check-other-tenant").secret)
    theirs = other.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=question,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert theirs.headers["x-mariana-route"] == "primary"  # tenants never share entries
    generated = [first.parse().id, sampled.parse().id]
    wait_for_ledger(platform, key.tenant_id, [i.removeprefix("chatcmpl-") for i in generated])
    assert len(ledger_entries(platform, key.tenant_id)) == 2  # the cache hit generated nothing
