from services.inference.coalesce import Coalescer
from services.inference.sampling import TokenLogprob
from services.inference.scheduler import Event


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(text: str, tokens: int, finish: str | None = None) -> Event:
    return Event(text, 7, tokens, finish, (TokenLogprob(tokens, -0.5, ()),))


def test_the_first_step_goes_at_once_then_steps_merge_until_the_end() -> None:
    clock = Clock()
    coalescer = Coalescer(interval_s=0.25, clock=clock)
    first = coalescer.add(step("a", 1))
    assert first is not None and first.text == "a"
    clock.now += 0.01
    assert coalescer.add(step("b", 2)) is None
    clock.now += 0.01
    assert coalescer.add(step("c", 3)) is None
    last = coalescer.add(step("d", 4, "stop"))
    assert last is not None
    assert (last.text, last.completion_tokens, last.prompt_tokens, last.finish_reason) == ("bcd", 4, 7, "stop")
    assert [lp.token for lp in last.logprobs] == [2, 3, 4]


def test_progress_goes_out_once_per_interval() -> None:
    clock = Clock()
    coalescer = Coalescer(interval_s=0.25, clock=clock)
    sent = []
    for tokens in range(1, 31):  # 30 steps, 40 ms apart
        merged = coalescer.add(step("x", tokens, "length" if tokens == 30 else None))
        if merged is not None:
            sent.append(merged)
        clock.now += 0.04
    assert [m.completion_tokens for m in sent] == [1, 8, 15, 22, 29, 30]
    assert "".join(m.text for m in sent) == "x" * 30
