from __future__ import annotations

import torch

from services.inference.sampling import SamplingParams, apply_penalties, logprob_of, next_token, next_tokens


def params(**kw: float) -> SamplingParams:
    return SamplingParams(max_tokens=8, **kw)  # type: ignore[arg-type]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_takes_the_argmax() -> None:
    assert next_token(torch.tensor([0.1, 3.0, 2.9, -1.0]), params(temperature=0), gen()) == 1


def test_same_seed_same_choices() -> None:
    logits = torch.randn(100, generator=gen(1))

    def draw(seed: int) -> list[int]:
        g = gen(seed)
        return [next_token(logits, params(temperature=1.0), g) for _ in range(20)]

    assert draw(7) == draw(7) and draw(7) != draw(8)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([4.0, 2.0, 1.0, 0.0])  # token 0 holds ~84% of the mass
    g = gen(3)
    assert {next_token(logits, params(temperature=1.0, top_p=0.5), g) for _ in range(200)} == {0}


def test_top_k_keeps_the_k_best() -> None:
    logits = torch.tensor([1.0, 1.1, 5.0, 0.9, 4.9])
    g = gen(3)
    assert {next_token(logits, params(temperature=2.0, top_k=2), g) for _ in range(200)} == {2, 4}


def test_high_temperature_spreads_choices() -> None:
    g = gen(3)
    assert {next_token(torch.ones(4), params(temperature=1.0), g) for _ in range(200)} == {0, 1, 2, 3}


def test_batched_draws_match_single_draws() -> None:
    logits = torch.randn(3, 50, generator=gen(5))
    rows = [params(temperature=0), params(temperature=0.7, top_p=0.9), params(temperature=1.3, top_k=5)]
    batched = next_tokens(logits, rows, [gen(i) for i in range(3)])
    single = [next_token(logits[i], rows[i], gen(i)) for i in range(3)]
    assert batched == single


def test_penalties_lower_seen_tokens() -> None:
    logits = torch.zeros(5)
    out = apply_penalties(logits, {1: 3, 4: 1}, params(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [0.0, -1.25, 0.0, 0.0, -0.75]
    assert logits.tolist() == [0.0] * 5  # not modified in place


def test_logprob_of() -> None:
    lp = logprob_of(torch.tensor([0.0, 0.0, 0.0, 0.0]), 2, top=2)
    assert abs(lp.logprob - torch.log(torch.tensor(0.25)).item()) < 1e-6
    assert len(lp.top) == 2
