"""The engine on the real default model (prepared by `make model`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mariana_common.errors import InvalidArgument, NotFound
from services.inference.engine import Delta, Engine, GenerationInput, Sampling
from services.inference.loader import load_model

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(MODEL, load_model(model_dir, "torch"), default_max_tokens=16)


async def collect(stream: AsyncIterator[Delta]) -> tuple[str, Delta]:
    parts, last = [], None
    async for delta in stream:
        parts.append(delta.text)
        last = delta
    assert last is not None and last.finish_reason is not None
    return "".join(parts), last


def chat(text: str, **sampling: object) -> GenerationInput:
    return GenerationInput(MODEL, messages=[("user", text)], sampling=Sampling(**sampling))  # type: ignore[arg-type]


async def test_greedy_answer_is_real_and_repeatable(engine: Engine) -> None:
    request = chat("What is the capital of France?", temperature=0, max_tokens=12)
    first, final = await collect(engine.generate(request))
    second, _ = await collect(engine.generate(request))
    assert "Paris" in first
    assert first == second
    assert final.prompt_tokens > 10
    assert 0 < final.completion_tokens <= 12


async def test_max_tokens_ends_with_length(engine: Engine) -> None:
    text, final = await collect(
        engine.generate(chat("Tell me a long story about a dragon.", temperature=0, max_tokens=5))
    )
    assert final.finish_reason == "length"
    assert final.completion_tokens == 5
    assert text


async def test_same_seed_same_sample(engine: Engine) -> None:
    request = chat("Name a colour.", temperature=1.0, seed=42, max_tokens=8)
    assert (await collect(engine.generate(request)))[0] == (await collect(engine.generate(request)))[0]


async def test_stop_sequence_cuts_before_it(engine: Engine) -> None:
    full, _ = await collect(engine.generate(chat("What is the capital of France?", temperature=0, max_tokens=12)))
    assert "Paris" in full
    text, final = await collect(
        engine.generate(chat("What is the capital of France?", temperature=0, max_tokens=12, stop=["Paris"]))
    )
    assert final.finish_reason == "stop"
    assert "Paris" not in text
    assert full.startswith(text)


async def test_streams_several_pieces(engine: Engine) -> None:
    pieces = [d async for d in engine.generate(chat("Count from one to ten.", temperature=0, max_tokens=12))]
    assert len([p for p in pieces if p.text]) >= 3


async def test_concurrent_requests_match_sequential(engine: Engine) -> None:
    prompts = ["What is 2+2?", "Name a fruit.", "Say hello."]
    alone = [(await collect(engine.generate(chat(p, temperature=0, max_tokens=8))))[0] for p in prompts]
    together = await asyncio.gather(*(collect(engine.generate(chat(p, temperature=0, max_tokens=8))) for p in prompts))
    assert [t for t, _ in together] == alone


async def test_prompt_longer_than_context_is_refused(engine: Engine) -> None:
    huge = "word " * (engine.card().context_length + 10)
    with pytest.raises(InvalidArgument, match="context"):
        await collect(engine.generate(GenerationInput(MODEL, prompt=huge)))


async def test_unknown_model_is_not_found(engine: Engine) -> None:
    with pytest.raises(NotFound):
        await collect(engine.generate(GenerationInput("gpt-17", prompt="hi")))


@pytest.mark.parametrize("sampling", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}])
async def test_bad_sampling_is_invalid(engine: Engine, sampling: dict[str, float]) -> None:
    with pytest.raises(InvalidArgument):
        await collect(engine.generate(chat("hi", **sampling)))


async def test_embeddings_are_normalised_and_deterministic(engine: Engine) -> None:
    vectors, tokens = await engine.embed(MODEL, ["a cat sat on the mat", "a cat sat on the mat", "stock markets"])
    assert tokens > 0
    assert len(vectors) == 3 and len(vectors[0]) == len(vectors[2])
    norm = sum(x * x for x in vectors[0]) ** 0.5
    assert abs(norm - 1) < 1e-4
    assert vectors[0] == vectors[1]
    assert vectors[0] != vectors[2]
