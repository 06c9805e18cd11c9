from __future__ import annotations

from pathlib import Path

import pytest

from mariana.billing.v1.billing_pb2 import UsageEvent
from services.billing.consumer import to_entry
from services.billing.events import decode, encode
from services.billing.ledger import Entry, Ledger


def entry(request_id: str, tenant: str = "t1", prompt: int = 10, completion: int = 5) -> Entry:
    return Entry(request_id, tenant, "k1", "m", prompt, completion, "stop", 1.0)


def test_applying_twice_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    assert ledger.record([entry("r1"), entry("r2")]) == 2
    assert ledger.record([entry("r1"), entry("r3")]) == 1
    assert [e.request_id for e in ledger.entries("t1")] == ["r1", "r2", "r3"]


def test_entries_are_per_tenant_and_survive_reopening(tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.db").record([entry("r1", "a"), entry("r2", "b")])
    reopened = Ledger(tmp_path / "ledger.db")
    assert [e.request_id for e in reopened.entries("a")] == ["r1"]
    assert [e.request_id for e in reopened.entries("b", "r2")] == ["r2"]
    assert reopened.entries("b", "r1") == []


def test_negative_tokens_roll_back_the_whole_batch(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    with pytest.raises(Exception, match="CHECK"):
        ledger.record([entry("ok"), Entry("bad", "t1", "k", "m", -1, 0, "stop", 1.0)])
    assert ledger.entries("t1") == []


def test_event_round_trip() -> None:
    event = UsageEvent(request_id="r", tenant_id="t", key_id="k", model="m", prompt_tokens=3, completion_tokens=4)
    assert decode(encode(event)) == event
    assert to_entry(encode(event)).completion_tokens == 4


@pytest.mark.parametrize(
    "fields", [{}, {b"event": b"\xff\xff"}, {b"event": UsageEvent(tenant_id="t").SerializeToString()}]
)
def test_malformed_entries_are_rejected(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        decode(fields)
