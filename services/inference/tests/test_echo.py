import pytest

from mariana_common.errors import InvalidArgument, NotFound
from services.inference.echo import ECHO_TOKEN, EchoEngine
from services.inference.engine import GenerationInput, Sampling


async def events(engine: EchoEngine, request: GenerationInput) -> list:
    return [event async for event in engine.generate(request)]


async def test_streams_fixed_chunks_up_to_the_fixed_token_count() -> None:
    engine = EchoEngine("echo-model", completion_tokens=10, chunk_tokens=4)
    got = await events(engine, GenerationInput("echo-model", prompt="one two three"))
    assert [e.completion_tokens for e in got] == [4, 8, 10]
    assert "".join(e.text for e in got) == ECHO_TOKEN * 10
    assert [e.finish_reason for e in got] == [None, None, "stop"]
    assert {e.prompt_tokens for e in got} == {3}
    assert engine.card().backend == "echo"


async def test_max_tokens_cuts_the_answer_with_length() -> None:
    engine = EchoEngine("echo-model", completion_tokens=10, chunk_tokens=4)
    got = await events(engine, GenerationInput("echo-model", prompt="hi", sampling=Sampling(max_tokens=5)))
    assert got[-1].completion_tokens == 5
    assert got[-1].finish_reason == "length"


async def test_bad_requests_are_refused_like_a_real_engine() -> None:
    engine = EchoEngine("echo-model", completion_tokens=4, chunk_tokens=4)
    with pytest.raises(NotFound):
        await events(engine, GenerationInput("other", prompt="hi"))
    with pytest.raises(InvalidArgument):
        await events(engine, GenerationInput("echo-model", messages=[]))
    with pytest.raises(InvalidArgument):
        await events(engine, GenerationInput("echo-model", prompt="hi", sampling=Sampling(temperature=3)))
