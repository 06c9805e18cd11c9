from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from services.inference.detokenizer import IncrementalDetokenizer
from services.inference.kv_cache import keep_rows, new_cache, stack


@pytest.mark.parametrize(
    "text",
    ["Hello world, how are you?", "  leading spaces and\nnew lines\n\n", "Ünïcödé ✓ 日本語 emoji 🚀 mixed", "a" * 50],
)
def test_incremental_text_equals_full_decode(model_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids)
    assert len([p for p in pieces if p]) > 1


def layer_kv(batch: int, length: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((batch, 2, length, 4), fill), torch.full((batch, 2, length, 4), -fill)


def test_stack_left_pads_and_keep_rows_trims() -> None:
    a, b = new_cache(2), new_cache(2)
    for layer in range(2):
        a.layers[layer].update(*layer_kv(2, 5, 1.0))
        b.layers[layer].update(*layer_kv(1, 3, 2.0))
    stack(a, b)
    keys, values = a.layers[0].view()
    assert keys.shape == (3, 2, 5, 4)
    assert torch.all(keys[2, :, :2] == 0) and torch.all(keys[2, :, 2:] == 2.0)  # padded on the left
    assert torch.all(values[0] == -1.0)
    keep_rows(a, torch.tensor([2]), drop_left=2)
    keys, _ = a.layers[1].view()
    assert keys.shape == (1, 2, 3, 4) and torch.all(keys == 2.0)


def test_growable_layer_writes_in_place_and_grows() -> None:
    cache = new_cache(1)
    layer = cache.layers[0]
    layer.update(*layer_kv(1, 60, 1.0))
    for step in range(100):
        keys, _ = layer.update(*layer_kv(1, 1, float(step)))
    assert keys.shape[2] == 160 and layer.get_seq_length() == 160
    assert float(keys[0, 0, -1, 0]) == 99.0 and float(keys[0, 0, 0, 0]) == 1.0
