"""Incremental detokenization: the text a new token adds, without decoding the
whole sequence each step. Decodes a short window before the new tokens and
diffs, so tokenizers that merge spaces or bytes across tokens come out right;
holds text back while it ends in an unfinished multi-byte character."""

from __future__ import annotations

from typing import Any

# Tokens decoded before the new ones, for context (spaces, byte merges).
CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # where the context window starts
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix = max(0, len(self.ids) - CONTEXT)
        self._read = len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text of tokens held back (an unfinished character at the very end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""
