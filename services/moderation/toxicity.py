"""The learned part of moderation: a multi-label logistic regression over
hashed word and character n-grams, trained in-repo by
`python -m services.moderation.training.train` from the sentences in
`training/toxicity_train.py`. Small and fast enough to sit on every request
(tens of microseconds per text); its quality is measured by
`bench/moderation_eval.py` and written in the README."""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.moderation.spans import TOXIC_CATEGORIES

MODEL_FILE = Path(__file__).with_name("toxicity_model.json")
BUCKETS = 1 << 18
WORD = re.compile(r"\w+", re.UNICODE)


@functools.lru_cache(maxsize=1 << 16)
def _word_buckets(word: str) -> tuple[int, ...]:
    """A word's own buckets: the word and its character 3-grams. Words repeat
    (from text to text, and within one), so they are hashed once."""
    padded = f"<{word}>"
    grams = [f"w:{word}"] + [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
    return tuple(zlib.crc32(gram.encode()) % BUCKETS for gram in grams)


def features(text: str) -> dict[int, float]:
    """Bag of hashed features, L2-normalised: words, word pairs and character
    3-grams inside words (which carry across inflections and typos)."""
    words = WORD.findall(text.lower())
    buckets = [bucket for word in words for bucket in _word_buckets(word)]
    buckets += [zlib.crc32(f"b:{a} {b}".encode()) % BUCKETS for a, b in itertools.pairwise(words)]
    counts = collections.Counter(buckets)
    norm = math.sqrt(sum(v * v for v in counts.values())) or 1.0
    return {k: v / norm for k, v in counts.items()}


@dataclass(frozen=True)
class ToxicityModel:
    categories: tuple[str, ...]
    bias: np.ndarray
    # The weights of the buckets the training saw, one row each; `rows` maps
    # a bucket to its row (any other bucket weighs nothing).
    matrix: np.ndarray
    rows: dict[int, int]

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> ToxicityModel:
        raw = json.loads(path.read_text())
        categories = tuple(raw["categories"])
        if set(categories) != set(TOXIC_CATEGORIES):
            raise ValueError(f"{path}: categories {categories} do not match {TOXIC_CATEGORIES}")
        weights = {int(k): v for k, v in raw["weights"].items()}
        matrix = np.asarray(list(weights.values()), dtype=np.float64).reshape(len(weights), len(categories))
        rows = {bucket: row for row, bucket in enumerate(weights)}
        return cls(categories, np.asarray(raw["bias"], dtype=np.float64), matrix, rows)

    def scores(self, text: str) -> dict[str, float]:
        known = [(self.rows[b], v) for b, v in features(text).items() if b in self.rows]
        logits = self.bias
        if known:
            rows, values = zip(*known, strict=True)
            logits = logits + np.asarray(values) @ self.matrix[list(rows)]
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        return dict(zip(self.categories, probabilities.tolist(), strict=True))
