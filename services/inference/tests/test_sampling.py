from __future__ import annotations

import torch

from services.inference.sampling import next_token


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert next_token(logits, 0.0, 1.0, torch.Generator().manual_seed(0)) == 1


def test_same_seed_same_choices() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))

    def draw(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [next_token(logits, 1.0, 1.0, generator) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_p_keeps_only_the_nucleus() -> None:
    # Token 0 holds ~88% of the mass: top_p=0.5 must always pick it.
    logits = torch.tensor([4.0, 2.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(3)
    assert {next_token(logits, 1.0, 0.5, generator) for _ in range(200)} == {0}


def test_high_temperature_spreads_choices() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    generator = torch.Generator().manual_seed(3)
    assert {next_token(logits, 1.0, 1.0, generator) for _ in range(200)} == {0, 1, 2, 3}
