"""The engine and its scheduler on the real default model (prepared by `make model`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mariana_common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.inference.engine import Engine, GenerationInput, Sampling
from services.inference.loader import LoadedModel, load_model
from services.inference.scheduler import Event, Limits
from tests.waiting import until

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(model_dir, "torch")


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> AsyncIterator[Engine]:
    engine = Engine(MODEL, loaded, default_max_tokens=16, limits=Limits(max_batch=8))
    yield engine  # type: ignore[misc]
    engine.close()


async def collect(stream: AsyncIterator[Event]) -> tuple[str, Event]:
    parts, last = [], None
    async for event in stream:
        parts.append(event.text)
        last = event
    assert last is not None and last.finish_reason is not None
    return "".join(parts), last


def chat(text: str, **sampling: object) -> GenerationInput:
    return GenerationInput(MODEL, messages=[("user", text)], sampling=Sampling(**sampling))  # type: ignore[arg-type]


async def wait_until_idle(engine: Engine) -> None:
    max_batch = engine._scheduler.limits.max_batch
    await until(lambda: not engine.stats().kv_tokens_reserved and engine.stats().free_slots == max_batch, "idle")


async def test_greedy_answer_is_real_and_repeatable(engine: Engine) -> None:
    request = chat("What is the capital of France?", temperature=0, max_tokens=12)
    first, final = await collect(engine.generate(request))
    second, _ = await collect(engine.generate(request))
    assert "Paris" in first and first == second
    assert final.prompt_tokens > 10 and 0 < final.completion_tokens <= 12


async def test_batched_greedy_equals_unbatched(engine: Engine) -> None:
    prompts = ["What is 2+2?", "Name a fruit.", "Say hello.", "Write a haiku about rain.", "Why is the sky blue?"]
    alone = [(await collect(engine.generate(chat(p, temperature=0, max_tokens=10))))[0] for p in prompts]
    together = await asyncio.gather(*(collect(engine.generate(chat(p, temperature=0, max_tokens=10))) for p in prompts))
    assert [t for t, _ in together] == alone


async def test_requests_join_a_running_batch(engine: Engine) -> None:
    """A short request started while a long one decodes finishes first, and
    both answers equal their unbatched versions."""
    long_req = chat("Write a long story about a dragon.", temperature=0, max_tokens=48)
    short_req = chat("What is the capital of France?", temperature=0, max_tokens=8)
    long_alone = (await collect(engine.generate(long_req)))[0]
    short_alone = (await collect(engine.generate(short_req)))[0]
    finished: list[str] = []

    async def run(name: str, request: GenerationInput) -> str:
        text, _ = await collect(engine.generate(request))
        finished.append(name)
        return text

    long_task = asyncio.create_task(run("long", long_req))
    stream = engine.generate(chat("Count to five.", temperature=0, max_tokens=48))
    await anext(stream)  # the batch is decoding now
    short_text = await run("short", short_req)
    long_text = await long_task
    await stream.aclose()
    assert finished == ["short", "long"]
    assert (short_text, long_text) == (short_alone, long_alone)


async def test_same_seed_same_sample_alone_or_batched(engine: Engine) -> None:
    request = chat("Name a colour.", temperature=1.0, seed=42, max_tokens=8)
    alone = (await collect(engine.generate(request)))[0]
    pair = await asyncio.gather(collect(engine.generate(request)), collect(engine.generate(request)))
    assert alone == pair[0][0] == pair[1][0]


async def test_top_k_one_is_greedy(engine: Engine) -> None:
    greedy = (await collect(engine.generate(chat("Name a planet.", temperature=0, max_tokens=8))))[0]
    top1 = (await collect(engine.generate(chat("Name a planet.", temperature=1.5, top_k=1, seed=3, max_tokens=8))))[0]
    assert top1 == greedy


async def test_frequency_penalty_stops_repetition(engine: Engine) -> None:
    prompt = "List ten fruits, one per line."
    plain = (await collect(engine.generate(chat(prompt, temperature=0, max_tokens=24))))[0]
    penalised = (await collect(engine.generate(chat(prompt, temperature=0, max_tokens=24, frequency_penalty=2))))[0]
    # Greedy decoding of this prompt repeats one fruit; the penalty makes it move on.
    assert plain.count("Apple") >= 3
    assert penalised.count("Apple") < plain.count("Apple")


async def test_logprobs(engine: Engine) -> None:
    events = [e async for e in engine.generate(chat("Say yes.", temperature=0, max_tokens=4, top_logprobs=3))]
    logprobs = [lp for e in events for lp in e.logprobs]
    assert 1 <= len(logprobs) <= 5
    for lp in logprobs:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][1] >= lp.top[-1][1]
        assert lp.token == lp.top[0][0]  # greedy picks the most likely token


async def test_max_tokens_ends_with_length(engine: Engine) -> None:
    text, final = await collect(engine.generate(chat("Tell me a long story.", temperature=0, max_tokens=5)))
    assert (final.finish_reason, final.completion_tokens) == ("length", 5)
    assert text


async def test_stop_sequence_cuts_before_it(engine: Engine) -> None:
    full, _ = await collect(engine.generate(chat("What is the capital of France?", temperature=0, max_tokens=12)))
    text, final = await collect(
        engine.generate(chat("What is the capital of France?", temperature=0, max_tokens=12, stop=["Paris"]))
    )
    assert final.finish_reason == "stop" and "Paris" not in text and full.startswith(text)


async def test_cancelling_frees_the_slot_and_kv(engine: Engine) -> None:
    stream = engine.generate(chat("Write a very long essay.", temperature=0, max_tokens=200))
    await anext(stream)
    await anext(stream)
    assert engine.stats().running == 1 and engine.stats().kv_tokens_reserved > 200
    await stream.aclose()
    await wait_until_idle(engine)


async def test_overload_is_resource_exhausted(loaded: LoadedModel) -> None:
    small = Engine(MODEL, loaded, 64, Limits(max_batch=1, max_waiting=1, kv_budget_tokens=100_000))
    try:
        busy = [small.generate(chat(f"Story number {i}.", temperature=0, max_tokens=64)) for i in range(2)]
        await anext(busy[0])  # running
        waiting = asyncio.create_task(anext(busy[1]))  # queued
        await until(lambda: small.stats().waiting + small.stats().prefilling > 0, "second request queued")
        with pytest.raises(ResourceExhausted) as refused:
            await anext(small.generate(chat("One more.", max_tokens=4)))
        assert refused.value.retry_after_s
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for stream in busy:
            await stream.aclose()
    finally:
        small.close()


async def test_kv_budget_is_resource_exhausted(loaded: LoadedModel) -> None:
    small = Engine(MODEL, loaded, 64, Limits(kv_budget_tokens=300))
    try:
        first = small.generate(chat("Hi.", max_tokens=200))
        await anext(first)
        with pytest.raises(ResourceExhausted, match="KV cache budget"):
            await anext(small.generate(chat("Hi again.", max_tokens=200)))
        await first.aclose()
    finally:
        small.close()


async def test_drain_finishes_admitted_and_refuses_new(loaded: LoadedModel) -> None:
    draining = Engine(MODEL, loaded, 64, Limits())
    try:
        stream = draining.generate(chat("Say something.", temperature=0, max_tokens=8))
        first = await anext(stream)  # admitted and running
        running = asyncio.create_task(collect(stream))
        assert await draining.drain(timeout_s=30)
        _, final = await running
        assert first.finish_reason is None and final.finish_reason in ("stop", "length")
        with pytest.raises(Unavailable):
            await anext(draining.generate(chat("Too late.")))
    finally:
        draining.close()


async def test_prompt_longer_than_context_is_refused(engine: Engine) -> None:
    huge = "word " * (engine.card().context_length + 10)
    with pytest.raises(InvalidArgument, match="context"):
        await collect(engine.generate(GenerationInput(MODEL, prompt=huge)))


async def test_unknown_model_is_not_found(engine: Engine) -> None:
    with pytest.raises(NotFound):
        await collect(engine.generate(GenerationInput("gpt-17", prompt="hi")))


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"max_tokens": 0},
        {"top_k": -1},
        {"presence_penalty": 3},
        {"top_logprobs": 21},
        {"stop": ["a", "b", "c", "d", "e"]},
    ],
)
async def test_bad_sampling_is_invalid(engine: Engine, sampling: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        await collect(engine.generate(chat("hi", **sampling)))


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(loaded: LoadedModel) -> None:
    """While a 600-token prompt is prefilled 64 tokens per iteration, the
    running stream keeps getting tokens: it is not stalled for the whole prompt."""
    chunked = Engine(MODEL, loaded, 64, Limits(prefill_chunk=64))
    order: list[str] = []
    try:
        short = chunked.generate(chat("Count slowly from one to fifty.", temperature=0, max_tokens=60))
        await anext(short)  # decoding now

        async def drain_short() -> None:
            async for _ in short:
                order.append("short")

        async def first_of_long() -> None:
            long_prompt = GenerationInput(
                MODEL, prompt="The history of the river. " * 100, sampling=Sampling(max_tokens=1)
            )
            async for _ in chunked.generate(long_prompt):
                order.append("long")
                return

        await asyncio.gather(drain_short(), first_of_long())
    finally:
        chunked.close()
    assert "long" in order
    assert order.index("long") >= 5, order  # several decode steps happened during the long prefill
