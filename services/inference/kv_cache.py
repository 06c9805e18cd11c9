"""The running batch's KV cache. Rows are left-padded to one length so the
whole batch decodes in one forward pass; sequences join (their prefilled cache
is padded and stacked on) and leave (their row is dropped) between steps.

Each layer keeps keys and values in a buffer with room to spare and writes new
positions in place, so a decode step does not copy the whole cache the way
transformers' DynamicLayer (torch.cat per step) does."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 64


class GrowableLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _ensure(self, needed: int, like: torch.Tensor) -> None:
        if self._k is not None and needed <= self._k.shape[2]:
            return
        capacity = max(MIN_CAPACITY, needed * 2 if self._k is not None else needed + MIN_CAPACITY)
        batch, heads, _, dim = like.shape
        k = like.new_zeros((batch, heads, capacity, dim))
        v = like.new_zeros((batch, heads, capacity, dim))
        if self._k is not None and self._v is not None:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v = k, v

    def _publish(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the positions written so far."""
        assert self._k is not None and self._v is not None
        return self._k[:, :, : self._len], self._v[:, :, : self._len]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._ensure(self._len + n, key_states)
        assert self._k is not None and self._v is not None
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._publish()
        return self.view()

    def get_seq_length(self) -> int:
        return self._len

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replaces the contents (a copy with room to grow)."""
        self._k = self._v = None
        self._len = 0
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._ensure(keys.shape[2], keys)
        assert self._k is not None and self._v is not None
        self._k[:, :, : keys.shape[2]] = keys
        self._v[:, :, : keys.shape[2]] = values
        self._len = keys.shape[2]
        self._publish()


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[GrowableLayer() for _ in range(num_layers)])


def _layers(cache: Cache) -> list[GrowableLayer]:
    return cache.layers  # type: ignore[return-value]


def _pad_left(t: torch.Tensor, amount: int) -> torch.Tensor:
    if amount == 0:
        return t
    pad = t.new_zeros((*t.shape[:2], amount, t.shape[3]))
    return torch.cat([pad, t], dim=2)


def stack(batch: Cache, joining: Cache) -> None:
    """Adds `joining`'s rows under `batch`'s, left-padding the shorter one."""
    for mine, theirs in zip(_layers(batch), _layers(joining), strict=True):
        length = max(mine.get_seq_length(), theirs.get_seq_length())
        (my_keys, my_values), (their_keys, their_values) = mine.view(), theirs.view()
        my_pad, their_pad = length - mine.get_seq_length(), length - theirs.get_seq_length()
        keys = torch.cat([_pad_left(my_keys, my_pad), _pad_left(their_keys, their_pad)])
        values = torch.cat([_pad_left(my_values, my_pad), _pad_left(their_values, their_pad)])
        mine.set(keys, values)


def keep_rows(cache: Cache, rows: torch.Tensor, drop_left: int) -> None:
    """Keeps only `rows` and drops `drop_left` leading positions (padding no row needs)."""
    for layer in _layers(cache):
        keys, values = layer.view()
        layer.set(keys[rows, :, drop_left:], values[rows, :, drop_left:])
