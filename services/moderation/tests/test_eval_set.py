"""The rule detectors against the labelled evaluation set in tests/moderation/
(the issue's targets: recall >= 0.98 at precision >= 0.95)."""

from __future__ import annotations

from pathlib import Path

from services.moderation.evaluation import evaluate, load_examples
from services.moderation.moderator import Moderator
from services.moderation.policy import load_policy
from services.moderation.toxicity import ToxicityModel

EVAL_SET = Path(__file__).parents[3] / "tests" / "moderation" / "eval_set.jsonl"


def test_eval_set_is_large_and_varied() -> None:
    examples = load_examples(EVAL_SET)
    assert len(examples) >= 300
    assert len({e.lang for e in examples}) >= 5
    assert sum(not e.labels for e in examples) >= 80


def test_pii_and_secrets_meet_their_targets() -> None:
    policy = load_policy()
    scores, _ = evaluate(Moderator(ToxicityModel.load(), lambda: policy), load_examples(EVAL_SET))
    for category in ("pii", "secrets"):
        assert scores[category].recall >= 0.98, scores[category]
        assert scores[category].precision >= 0.95, scores[category]
