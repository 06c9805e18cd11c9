from __future__ import annotations

import pytest

from mariana_common.errors import InvalidArgument, NotFound
from services.inference.embedder import Embedder, packaged_minilm


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder("all-minilm-l6-v2", packaged_minilm())


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_shape_normalisation_and_determinism(embedder: Embedder) -> None:
    texts = ["a cat sits on the mat", "a kitten is sitting on a rug", "quarterly stock market results"]
    vectors, tokens = await embedder.embed("all-minilm-l6-v2", texts)
    again, _ = await embedder.embed("all-minilm-l6-v2", texts[:1])
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert tokens > 10
    assert all(abs(dot(v, v) - 1) < 1e-4 for v in vectors)
    assert again[0] == pytest.approx(vectors[0], abs=1e-5)  # alone or batched with others
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]) + 0.2  # meaning, not noise


async def test_many_texts_are_batched(embedder: Embedder) -> None:
    vectors, _ = await embedder.embed("all-minilm-l6-v2", [f"sentence number {i}" for i in range(70)])
    assert len(vectors) == 70


async def test_bad_inputs(embedder: Embedder) -> None:
    with pytest.raises(NotFound):
        await embedder.embed("text-embedding-3-large", ["x"])
    with pytest.raises(InvalidArgument):
        await embedder.embed("all-minilm-l6-v2", [""])
    with pytest.raises(InvalidArgument, match="longer than"):
        await embedder.embed("all-minilm-l6-v2", ["word " * 2000])
