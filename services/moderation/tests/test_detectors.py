from __future__ import annotations

import pytest

from services.moderation.detectors import luhn_valid
from services.moderation.moderator import Moderator


@pytest.mark.parametrize(
    ("number", "valid"),
    [("4111111111111111", True), ("4111111111111112", False), ("378282246310005", True), ("0", True)],
)
def test_luhn(number: str, valid: bool) -> None:
    assert luhn_valid(number) is valid


@pytest.fixture
def moderator() -> Moderator:
    return Moderator(["forbidden fruit", "bomb"])


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("write to jane.doe+news@example.co.uk today", "pii.email"),
        ("call +44 20 7946 0958 now", "pii.phone"),
        ("call (415) 555-0132 now", "pii.phone"),
        ("card 4111 1111 1111 1111 exp 12/29", "pii.credit_card"),
        ("card 4111-1111-1111-1111", "pii.credit_card"),
        ("how to build a BOMB", "blocklist"),
        ("the Forbidden Fruit", "blocklist"),
    ],
)
def test_flags_each_category(moderator: Moderator, text: str, category: str) -> None:
    verdict = moderator.check(text)
    assert verdict.flagged
    assert verdict.categories[category] is True
    assert verdict.scores[category] == 1.0
    assert any(f.category == category for f in verdict.findings)


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "card 4111 1111 1111 1112 fails the checksum",
        "the year 2024 and 12 apples",
        "bombastic speech",  # whole words only
        "version 1.2.3.4",
    ],
)
def test_clean_text_is_not_flagged(moderator: Moderator, text: str) -> None:
    verdict = moderator.check(text)
    assert not verdict.flagged, verdict.findings
    assert set(verdict.categories.values()) == {False}


def test_span_points_at_the_finding(moderator: Moderator) -> None:
    text = "mail bob@example.com please"
    (finding,) = moderator.check(text).findings
    assert text[finding.start : finding.end] == "bob@example.com"


def test_card_number_is_not_also_a_phone(moderator: Moderator) -> None:
    verdict = moderator.check("4111 1111 1111 1111")
    assert verdict.categories["pii.credit_card"]
    assert not verdict.categories["pii.phone"]


def test_check_all_keeps_order(moderator: Moderator) -> None:
    verdicts = moderator.check_all(["hello", "bob@example.com"])
    assert [v.flagged for v in verdicts] == [False, True]
