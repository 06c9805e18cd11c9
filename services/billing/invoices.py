"""An invoice for a period: a line per model, the total, and a CSV rendering.
Money stays integer micro-units; the CSV also shows it in currency units with
exactly six decimals, formatted from the integer (no float on the way)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from services.billing.ledger import Ledger, UsageLine


@dataclass(frozen=True)
class Invoice:
    tenant_id: str
    start: float
    end: float
    lines: list[UsageLine]

    @property
    def total_micros(self) -> int:
        return sum(line.cost_micros for line in self.lines)


def amount(micros: int) -> str:
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def make_invoice(ledger: Ledger, tenant_id: str, start: float, end: float) -> Invoice:
    return Invoice(tenant_id, start, end, ledger.usage_report(tenant_id, start, end, "model"))


def to_csv(invoice: Invoice) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model", "requests", "prompt_tokens", "completion_tokens", "cost_micros", "cost"])
    for line in invoice.lines:
        writer.writerow(
            [
                line.group,
                line.requests,
                line.prompt_tokens,
                line.completion_tokens,
                line.cost_micros,
                amount(line.cost_micros),
            ]
        )
    requests = sum(line.requests for line in invoice.lines)
    prompt = sum(line.prompt_tokens for line in invoice.lines)
    completion = sum(line.completion_tokens for line in invoice.lines)
    writer.writerow(["TOTAL", requests, prompt, completion, invoice.total_micros, amount(invoice.total_micros)])
    return out.getvalue()
