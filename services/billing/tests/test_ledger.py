"""The ledger on SQLite and on a real PostgreSQL server (same code, migrated
by Alembic), prices, and the usage event contract."""

from __future__ import annotations

import datetime as dt

import pytest

from mariana.billing.v1.billing_pb2 import UsageEvent
from mariana_common.errors import InvalidArgument
from mariana_common.sql import Database
from services.billing.consumer import to_entry
from services.billing.events import decode, encode
from services.billing.invoices import amount, make_invoice, to_csv
from services.billing.ledger import COLUMNS, Entry, Ledger
from services.billing.migrate import upgrade
from services.billing.prices import Price, PriceCatalog, load_prices


@pytest.fixture
def ledger(database_url: str) -> Ledger:
    return Ledger(Database(database_url))


def entry(request_id: str, tenant: str = "t1", cost: int = 0, key: str = "k1", at: float = 1.0) -> Entry:
    return Entry(request_id, tenant, key, "m", 10, 5, "stop", at, cost)


def test_applying_twice_changes_nothing(ledger: Ledger) -> None:
    assert ledger.record([entry("r1"), entry("r2")]) == 2
    assert ledger.record([entry("r1"), entry("r3")]) == 1
    assert [e.request_id for e in ledger.entries("t1")] == ["r1", "r2", "r3"]


def test_entries_are_per_tenant_and_survive_reopening(database_url: str) -> None:
    Ledger(Database(database_url)).record([entry("r1", "a"), entry("r2", "b")])
    reopened = Ledger(Database(database_url))  # migrations are idempotent
    assert [e.request_id for e in reopened.entries("a")] == ["r1"]
    assert [e.request_id for e in reopened.entries("b", "r2")] == ["r2"]
    assert reopened.entries("b", "r1") == []


def test_a_refused_entry_rolls_the_whole_batch_back(ledger: Ledger) -> None:
    with pytest.raises(Exception, match=r"(?i)check"):
        ledger.record([entry("ok"), Entry("bad", "t1", "k", "m", -1, 0, "stop", 1.0, 0)])
    assert ledger.entries("t1") == []


def test_balances_derive_from_credits_adjustments_and_usage(ledger: Ledger) -> None:
    assert ledger.add_credit("topup-1", "t1", 5_000_000)
    assert not ledger.add_credit("topup-1", "t1", 5_000_000)  # the same credit id adds once
    assert ledger.add_credit("fix-1", "t1", -250_000, kind="adjustment", note="refund reversal")
    ledger.record([entry("r1", cost=1_000_000), entry("r2", cost=500_000)])
    assert ledger.budget_status("t1").balance_micros == 5_000_000 - 250_000 - 1_500_000
    for bad in ({"amount_micros": 0}, {"amount_micros": 5, "kind": "gift"}):
        with pytest.raises(InvalidArgument):
            ledger.add_credit("x", "t1", **bad)  # type: ignore[arg-type]


def test_budgets_per_tenant_and_per_key(ledger: Ledger) -> None:
    assert not ledger.budget_status("t1", "k1").over_hard  # no budget: never over
    ledger.set_budget("t1", hard_limit_micros=100, soft_limit_micros=50)
    ledger.set_budget("t1", hard_limit_micros=30, soft_limit_micros=20, key_id="k2")
    ledger.record([entry("r1", cost=25, key="k1"), entry("r2", cost=25, key="k2")])
    assert ledger.budget_status("t1", "k1").tenant.over_soft and not ledger.budget_status("t1", "k1").over_hard
    assert not ledger.budget_status("t1", "k2").over_hard
    ledger.record([entry("r3", cost=10, key="k2")])  # k2 reaches its own limit, the tenant does not
    assert ledger.budget_status("t1", "k2").over_hard and not ledger.budget_status("t1", "k1").over_hard
    ledger.record([entry("r4", cost=40, key="k1")])
    assert ledger.budget_status("t1", "k1").over_hard  # now the tenant's


def test_a_soft_limit_alerts_once(ledger: Ledger) -> None:
    ledger.set_budget("t1", hard_limit_micros=0, soft_limit_micros=10)
    ledger.record([entry("r1", cost=5)])
    assert ledger.soft_alerts_due({("t1", "")}) == []
    ledger.record([entry("r2", cost=5)])
    (alert,) = ledger.soft_alerts_due({("t1", ""), ("t1", "k1")})
    assert alert[:2] == ("t1", "") and alert[2].spent_micros == 10
    assert ledger.soft_alerts_due({("t1", "")}) == []


def test_usage_report_and_invoice(ledger: Ledger) -> None:
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
    assert invoice.total_micros == 3_500_008 and amount(3_500_008) == "3.500008"
    rows = to_csv(invoice).splitlines()
    assert rows[0].startswith("model,requests") and rows[1] == "m1,2,30,10,3500001,3.500001"
    assert rows[-1] == "TOTAL,3,60,10,3500008,3.500008"


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
    priced = to_entry(encode(event), load_prices())
    # 3 tokens in at 1.0 and 4 out at 2.0 micro-units each (the default price)
    assert priced.completion_tokens == 4 and priced.cost_micros == 11


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


def test_spend_is_kept_per_key_and_tenant_as_usage_is_recorded(ledger: Ledger) -> None:
    ledger.record([entry("r1", cost=100), entry("r2", cost=20, key="k2"), entry("r3", "t2", cost=7)])
    ledger.record([entry("r1", cost=100), entry("r4", cost=3)])  # r1 again: not counted twice
    assert sorted(ledger.spend_by_scope()) == [
        ("t1", "", 123),
        ("t1", "k1", 103),
        ("t1", "k2", 20),
        ("t2", "", 7),
        ("t2", "k1", 7),
    ]
    status = ledger.budget_status("t1", "k2")
    assert status.tenant.spent_micros == 123 and status.key.spent_micros == 20


def test_upgrading_an_older_ledger_totals_the_usage_it_already_has(database_url: str) -> None:
    upgrade(database_url, "0001")
    old = Database(database_url)
    for request_id, key, cost in (("r1", "k1", 5), ("r2", "k1", 6), ("r3", "k2", 7)):
        old.execute(
            f"INSERT INTO usage_entries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, "t1", key, "m", 1, 1, "stop", 1.0, cost),
        )
    ledger = Ledger(Database(database_url))  # migrates to the newest schema
    assert sorted(ledger.spend_by_scope()) == [("t1", "", 18), ("t1", "k1", 11), ("t1", "k2", 7)]
    ledger.record([entry("r4", cost=2, key="k2")])
    assert ledger.budget_status("t1", "k2").key.spent_micros == 9
