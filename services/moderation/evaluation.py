"""Precision and recall per category of a Moderator on a labelled set
(tests/moderation/eval_set.jsonl): shared by the test that holds the rule
detectors to their targets and by bench/moderation_eval.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.moderation.moderator import Moderator
from services.moderation.spans import CATEGORIES


@dataclass(frozen=True)
class Example:
    text: str
    labels: frozenset[str]
    kind: str
    lang: str


@dataclass(frozen=True)
class Score:
    category: str
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0

    @property
    def recall(self) -> float:
        actual = self.true_positives + self.false_negatives
        return self.true_positives / actual if actual else 1.0


def load_examples(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Example(r["text"], frozenset(r["labels"]), r["kind"], r["lang"]) for r in rows]


def evaluate(moderator: Moderator, examples: list[Example]) -> tuple[dict[str, Score], list[tuple[Example, set[str]]]]:
    """Scores per category, and the examples the moderator got wrong with what it said."""
    counts = {c: [0, 0, 0] for c in CATEGORIES}
    mistakes = []
    for example in examples:
        verdict = moderator.check(example.text)
        predicted = {c for c, hit in verdict.categories.items() if hit}
        for category in CATEGORIES:
            truth, guess = category in example.labels, category in predicted
            if truth and guess:
                counts[category][0] += 1
            elif guess:
                counts[category][1] += 1
            elif truth:
                counts[category][2] += 1
        if predicted != set(example.labels):
            mistakes.append((example, predicted))
    return {c: Score(c, *counts[c]) for c in CATEGORIES}, mistakes
