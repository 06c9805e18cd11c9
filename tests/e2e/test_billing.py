"""Billing's admin API over REST through the edge: usage reports and invoices
for what a tenant really used."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import MODEL, Platform, create_key_with_cli
from tests.e2e.ledger import wait_for_ledger

pytestmark = pytest.mark.e2e


def get(platform: Platform, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(
        f"http://{platform.edge}{path}", headers={"Authorization": f"Bearer {key or platform.master_key}"}, timeout=10
    )


def test_usage_report_and_invoice_over_rest(platform: Platform) -> None:
    key = create_key_with_cli(platform, "invoiced")
    client = platform.openai(key.secret)
    ids = [
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4).id
        for _ in range(2)
    ]
    entries = wait_for_ledger(platform, key.tenant_id, [i.removeprefix("chatcmpl-") for i in ids])
    assert len(entries) == 2 and all(e.cost_micros > 0 for e in entries)

    report = get(platform, f"/admin/v1/billing/tenants/{key.tenant_id}/usage?group_by=model")
    assert report.status_code == 200, report.text
    (line,) = report.json()["lines"]
    assert line["group"] == MODEL and int(line["requests"]) == 2  # uint64 is a JSON string in proto3 JSON

    invoice = get(platform, f"/admin/v1/billing/tenants/{key.tenant_id}/invoice").json()
    assert int(invoice["total_micros"]) == sum(e.cost_micros for e in entries)
    assert invoice["csv"].splitlines()[-1].startswith("TOTAL,2,")

    assert get(platform, f"/admin/v1/billing/tenants/{key.tenant_id}/invoice", key=key.secret).status_code == 403
    assert get(platform, f"/admin/v1/billing/tenants/{key.tenant_id}/usage?group_by=hour").status_code == 400


def post(platform: Platform, path: str, **body: object) -> httpx.Response:
    return httpx.post(
        f"http://{platform.edge}{path}",
        json=body,
        headers={"Authorization": f"Bearer {platform.master_key}"},
        timeout=10,
    )


def test_credits_balances_and_a_keys_own_budget(platform: Platform) -> None:
    import openai

    spender, saver = create_key_with_cli(platform, "shared-tenant"), create_key_with_cli(platform, "shared-tenant")
    tenant = spender.tenant_id
    base = f"/admin/v1/billing/tenants/{tenant}"
    credit = post(platform, f"{base}/credits", credit_id="topup-1", amount_micros=5_000_000, note="prepaid")
    assert credit.status_code == 200 and credit.json()["applied"] is True
    again = post(platform, f"{base}/credits", credit_id="topup-1", amount_micros=5_000_000)
    assert again.json()["applied"] is False  # idempotent
    assert int(again.json()["status"]["balance_micros"]) == 5_000_000
    budget = post(platform, f"{base}/budget", key_id=spender.key_id, hard_limit_micros=15)
    assert budget.status_code == 200, budget.text

    # Each of these could cost up to ~6 micro-units: the key's own budget admits
    # what fits its worst case, then refuses; the tenant's other key goes on.
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            platform.openai(spender.secret).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=10
            )
    assert refused.value.response.json()["error"]["code"] == "insufficient_quota"
    platform.openai(saver.secret).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=10
    )
    deadline = time.monotonic() + 15
    while True:  # the ledger applies usage asynchronously
        status = get(platform, f"{base}/budget?key_id={spender.key_id}").json()["status"]
        if int(status.get("key_spent_micros", 0)) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 0 < int(status["key_spent_micros"]) <= 15  # never past the key's hard budget
    assert int(status["balance_micros"]) < 5_000_000
