from __future__ import annotations

from pathlib import Path

import pytest

from mariana.billing.v1.billing_pb2 import UsageEvent
from services.billing.consumer import to_entry
from services.billing.events import decode, encode
from services.billing.ledger import Entry, Ledger
from services.billing.prices import Price, PriceCatalog, load_prices


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
    event = UsageEvent(
        request_id="r",
        tenant_id="t",
        key_id="k",
        model="m",
        prompt_tokens=3,
        completion_tokens=4,
        completed_at=1_790_000_000,
    )
    assert decode(encode(event)) == event
    entry = to_entry(encode(event), load_prices())
    assert (
        entry.completion_tokens == 4 and entry.cost_micros == 11
    )  # 3 in at 1.0 + 4 out at 2.0 per token (default price)


@pytest.mark.parametrize(
    "fields", [{}, {b"event": b"\xff\xff"}, {b"event": UsageEvent(tenant_id="t").SerializeToString()}]
)
def test_malformed_entries_are_rejected(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        decode(fields)


def test_prices_are_integer_and_round_up() -> None:
    price = Price(input_per_million=100_000, cached_input_per_million=50_000, output_per_million=200_000)
    assert price.cost_micros(1, 0) == 1  # 0.1 micro-units is still charged
    assert price.cost_micros(10, 10) == 3
    assert price.cost_micros(0, 0) == 0
    assert price.cost_micros(20, 0, cached_prompt_tokens=20) == 1  # 20 x 0.05
    assert Price(input_per_million=7, output_per_million=0).cost_micros(1_000_000, 0, 1_000_000) == 7


def test_the_price_in_force_when_the_request_ran() -> None:
    import datetime as dt

    def at(day: str) -> float:
        return dt.datetime.fromisoformat(day + "T12:00:00+00:00").timestamp()

    catalog = PriceCatalog.model_validate(
        {
            "default": [{"effective_from": "2026-01-01", "input_per_million": 9, "output_per_million": 9}],
            "models": {
                "m": [
                    {"effective_from": "2026-06-01", "input_per_million": 2, "output_per_million": 2},
                    {"effective_from": "2026-03-01", "input_per_million": 1, "output_per_million": 1},
                ]
            },
        }
    )
    assert catalog.price("m", at("2026-04-15")).input_per_million == 1
    assert catalog.price("m", at("2026-06-01")).input_per_million == 2
    assert catalog.price("m", at("2026-02-01")).input_per_million == 9  # before the model had a price
    assert catalog.price("other", at("2026-07-01")).input_per_million == 9
    assert load_prices().price("smollm2-135m-instruct", at("2026-11-25")).input_per_million == 100_000


def test_budget_status_tracks_spend(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    assert not ledger.budget_status("t1").over_hard  # no budget: never over
    ledger.set_budget("t1", hard_limit_micros=100, soft_limit_micros=50)
    ledger.record([Entry("r1", "t1", "k", "m", 1, 1, "stop", 1.0, 60)])
    status = ledger.budget_status("t1")
    assert (status.spent_micros, status.over_soft, status.over_hard) == (60, True, False)
    ledger.record(
        [Entry("r2", "t1", "k", "m", 1, 1, "stop", 1.0, 40), Entry("r2", "t1", "k", "m", 1, 1, "stop", 1.0, 40)]
    )
    assert ledger.budget_status("t1").over_hard and ledger.budget_status("t1").spent_micros == 100


def test_usage_report_and_invoice(tmp_path: Path) -> None:
    from mariana_common.errors import InvalidArgument
    from services.billing.invoices import amount, make_invoice, to_csv

    ledger = Ledger(tmp_path / "ledger.db")
    day = 86_400.0
    start = 1_790_000_000.0 - 1_790_000_000.0 % day  # a UTC midnight
    ledger.record(
        [
            Entry("a", "t1", "k1", "m1", 10, 5, "stop", start + 10, 1_500_000),
            Entry("b", "t1", "k2", "m1", 20, 5, "stop", start + day + 10, 2_000_001),
            Entry("c", "t1", "k1", "m2", 30, 0, "stop", start + day + 20, 7),
            Entry("d", "t2", "k9", "m1", 99, 99, "stop", start + 30, 99),  # another tenant
            Entry("e", "t1", "k1", "m1", 1, 1, "stop", start + 3 * day, 1),  # outside the period
        ]
    )
    end = start + 2 * day
    by_day = ledger.usage_report("t1", start, end, "day")
    assert [(line.group, line.requests, line.cost_micros) for line in by_day] == [
        ("2026-09-21", 1, 1_500_000),
        ("2026-09-22", 2, 2_000_008),
    ]
    by_key = ledger.usage_report("t1", start, end, "key")
    assert [(line.group, line.prompt_tokens) for line in by_key] == [("k1", 40), ("k2", 20)]
    assert len(ledger.usage_report("t1", 0, 0, "model")) == 2  # unbounded: everything of t1
    with pytest.raises(InvalidArgument):
        ledger.usage_report("t1", start, end, "hour")
    invoice = make_invoice(ledger, "t1", start, end)
    assert invoice.total_micros == 3_500_008
    assert amount(3_500_008) == "3.500008"
    rows = to_csv(invoice).splitlines()
    assert rows[0].startswith("model,requests") and rows[1] == "m1,2,30,10,3500001,3.500001"
    assert rows[-1] == "TOTAL,3,60,10,3500008,3.500008"
