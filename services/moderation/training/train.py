"""Trains the toxicity head: one logistic regression per category (L2,
class-balanced, full-batch gradient descent, fixed seed) over the hashed
features of `toxicity.py`. Deterministic: the same data gives the same file.

    python -m services.moderation.training.train
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from services.moderation.spans import TOXIC_CATEGORIES
from services.moderation.toxicity import MODEL_FILE, features

DATA_FILE = Path(__file__).with_name("toxicity_train.jsonl")
STEPS = 3000
LEARNING_RATE = 2.0
L2 = 1e-4


def main() -> None:
    raw = DATA_FILE.read_bytes()
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    feature_rows = [features(r["text"]) for r in rows]
    buckets = sorted({b for f in feature_rows for b in f})
    column = {b: i for i, b in enumerate(buckets)}
    x = np.zeros((len(rows), len(buckets)), dtype=np.float64)
    for i, f in enumerate(feature_rows):
        for bucket, value in f.items():
            x[i, column[bucket]] = value
    y = np.array([[c in r["labels"] for c in TOXIC_CATEGORIES] for r in rows], dtype=np.float64)
    # Balance each category's positives against its negatives.
    positives = y.sum(axis=0)
    sample_weight = np.where(y == 1, len(rows) / (2 * positives), len(rows) / (2 * (len(rows) - positives)))

    w = np.zeros((len(buckets), len(TOXIC_CATEGORIES)))
    b = np.zeros(len(TOXIC_CATEGORIES))
    for step in range(STEPS):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        error = (p - y) * sample_weight / len(rows)
        w -= LEARNING_RATE * (x.T @ error + L2 * w)
        b -= LEARNING_RATE * error.sum(axis=0)
        if step % 500 == 0:
            loss = -np.mean(sample_weight * (y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9)))
            print(f"step {step:5d}  loss {loss:.4f}", flush=True)
    model = {
        "categories": list(TOXIC_CATEGORIES),
        "bias": [round(float(v), 5) for v in b],
        "weights": {str(bucket): [round(float(v), 5) for v in w[column[bucket]]] for bucket in buckets},
        "training": {
            "data": DATA_FILE.name,
            "data_sha256": hashlib.sha256(raw).hexdigest(),
            "examples": len(rows),
            "steps": STEPS,
            "learning_rate": LEARNING_RATE,
            "l2": L2,
        },
    }
    MODEL_FILE.write_text(json.dumps(model, separators=(",", ":")))
    print(f"wrote {MODEL_FILE} ({len(buckets)} features, {len(rows)} examples)")


if __name__ == "__main__":
    main()
