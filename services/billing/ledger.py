"""The ledger, on SQLite or PostgreSQL (the same SQL; Alembic migrations):
usage debits (one per request: the request id is the primary key, so applying
an event twice changes nothing), credits and adjustments (append-only, each
with its own idempotency key), balances derived from them, and budgets per
tenant and per key. Money is integer micro-units."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from mariana_common.errors import InvalidArgument
from mariana_common.sql import Database, IntegrityError
from services.billing.migrate import upgrade

TENANT_WIDE = ""  # the key id of a tenant-level budget


@dataclass(frozen=True)
class Entry:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    completed_at: float
    cost_micros: int = 0


@dataclass(frozen=True)
class UsageLine:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


@dataclass(frozen=True)
class Limits:
    spent_micros: int
    hard_limit_micros: int  # 0: no limit
    soft_limit_micros: int

    @property
    def over_hard(self) -> bool:
        return bool(self.hard_limit_micros) and self.spent_micros >= self.hard_limit_micros

    @property
    def over_soft(self) -> bool:
        return bool(self.soft_limit_micros) and self.spent_micros >= self.soft_limit_micros


@dataclass(frozen=True)
class BudgetStatus:
    tenant_id: str
    key_id: str
    tenant: Limits
    key: Limits
    balance_micros: int  # credits and adjustments minus usage, tenant-wide

    @property
    def over_hard(self) -> bool:
        return self.tenant.over_hard or self.key.over_hard


COLUMNS = (
    "request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, finish_reason, completed_at, cost_micros"
)
KINDS = ("credit", "adjustment")


class Ledger:
    def __init__(self, db: Database) -> None:
        upgrade(db.url)
        self._db = db
        day = "to_char(to_timestamp(completed_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        self._groups = {
            "day": day if db.is_postgres else "date(completed_at, 'unixepoch')",
            "model": "model",
            "key": "key_id",
        }

    # -- usage ------------------------------------------------------------------

    def record(self, entries: list[Entry]) -> int:
        """Applies entries in one transaction; returns how many were new."""
        return len(self.record_new(entries))

    def record_new(self, entries: list[Entry]) -> list[Entry]:
        """Applies entries in one transaction; returns the ones that were new.
        Only a duplicate request id is skipped; anything else a constraint
        refuses rolls the whole batch back."""
        new: list[Entry] = []
        with self._db.transaction():
            for e in entries:
                inserted = self._db.execute(
                    f"INSERT INTO usage_entries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (request_id) DO NOTHING",
                    (
                        e.request_id,
                        e.tenant_id,
                        e.key_id,
                        e.model,
                        e.prompt_tokens,
                        e.completion_tokens,
                        e.finish_reason,
                        e.completed_at,
                        e.cost_micros,
                    ),
                )
                if inserted:
                    new.append(e)
            added: Counter[tuple[str, str]] = Counter()
            for e in new:
                added[(e.tenant_id, e.key_id)] += e.cost_micros
                added[(e.tenant_id, TENANT_WIDE)] += e.cost_micros
            # in one order for every batch: two billing replicas applying at
            # once (PostgreSQL, row locks) then wait for each other, never deadlock
            for (tenant_id, key_id), cost in sorted(added.items()):
                self._db.execute(
                    "INSERT INTO spend (tenant_id, key_id, spent_micros) VALUES (?, ?, ?)"
                    " ON CONFLICT (tenant_id, key_id)"
                    " DO UPDATE SET spent_micros = spend.spent_micros + excluded.spent_micros",
                    (tenant_id, key_id, cost),
                )
        return new

    def entries(self, tenant_id: str, request_id: str = "") -> list[Entry]:
        query = f"SELECT {COLUMNS} FROM usage_entries WHERE tenant_id = ?"
        params: tuple[str, ...] = (tenant_id,)
        if request_id:
            query += " AND request_id = ?"
            params += (request_id,)
        rows = self._db.fetchall(query + " ORDER BY completed_at, request_id", params)
        return [Entry(*row) for row in rows]  # type: ignore[arg-type]

    def usage_report(self, tenant_id: str, start: float, end: float, group_by: str) -> list[UsageLine]:
        """Usage in [start, end) grouped by day (UTC), model or key; 0 bounds nothing."""
        column = self._groups.get(group_by)
        if column is None:
            raise InvalidArgument(f"group_by must be one of {', '.join(self._groups)}")
        if end and start > end:
            raise InvalidArgument("start must not be after end")
        rows = self._db.fetchall(
            f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_micros) "
            "FROM usage_entries WHERE tenant_id = ? AND completed_at >= ? AND completed_at < ? "
            "GROUP BY 1 ORDER BY 1",
            (tenant_id, start, end or 1e18),
        )
        return [UsageLine(str(g), int(n), int(p), int(c), int(m)) for g, n, p, c, m in rows]

    # -- credits, adjustments, balances -----------------------------------------

    def add_credit(
        self, credit_id: str, tenant_id: str, amount_micros: int, kind: str = "credit", note: str = "", key_id: str = ""
    ) -> bool:
        """Appends a credit (prepaid money, > 0) or an adjustment (either sign).
        `credit_id` is the idempotency key: the same id twice adds once.
        Returns whether it was new."""
        if kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}")
        if not credit_id or not tenant_id:
            raise InvalidArgument("credit_id and tenant_id are required")
        if kind == "credit" and amount_micros <= 0:
            raise InvalidArgument("a credit must be positive; use an adjustment to take money back")
        try:
            return bool(
                self._db.execute(
                    "INSERT INTO credits VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (credit_id) DO NOTHING",
                    (credit_id, tenant_id, key_id, kind, amount_micros, note, time.time()),
                )
            )
        except IntegrityError as error:
            raise InvalidArgument(str(error)) from error

    def _spent(self, tenant_id: str, key_id: str | None = None) -> int:
        row = self._db.fetchone(
            "SELECT spent_micros FROM spend WHERE tenant_id = ? AND key_id = ?",
            (tenant_id, TENANT_WIDE if key_id is None else key_id),
        )
        return int(row[0]) if row else 0

    def _limits(self, tenant_id: str, key_id: str, spent: int) -> Limits:
        row = self._db.fetchone(
            "SELECT hard_limit_micros, soft_limit_micros FROM budgets WHERE tenant_id = ? AND key_id = ?",
            (tenant_id, key_id),
        )
        hard, soft = row if row else (0, 0)
        return Limits(spent, int(hard), int(soft))  # type: ignore[arg-type]

    # -- budgets ----------------------------------------------------------------

    def spend_by_scope(self) -> list[tuple[str, str, int]]:
        """(tenant, key, spent) for every key, and (tenant, "", spent) for every tenant."""
        rows = self._db.fetchall("SELECT tenant_id, key_id, spent_micros FROM spend")
        return [(str(t), str(k), int(c)) for t, k, c in rows]

    def hard_limits(self) -> list[tuple[str, str, int]]:
        rows = self._db.fetchall("SELECT tenant_id, key_id, hard_limit_micros FROM budgets")
        return [(str(t), str(k), int(h)) for t, k, h in rows]

    def set_budget(
        self, tenant_id: str, hard_limit_micros: int, soft_limit_micros: int, key_id: str = ""
    ) -> BudgetStatus:
        self._db.execute(
            "INSERT INTO budgets (tenant_id, key_id, hard_limit_micros, soft_limit_micros) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant_id, key_id) DO UPDATE SET hard_limit_micros = excluded.hard_limit_micros, "
            "soft_limit_micros = excluded.soft_limit_micros, soft_alerted = 0",
            (tenant_id, key_id, hard_limit_micros, soft_limit_micros),
        )
        return self.budget_status(tenant_id, key_id)

    def budget_status(self, tenant_id: str, key_id: str = "") -> BudgetStatus:
        tenant_spent = self._spent(tenant_id)
        credits = self._db.fetchone(
            "SELECT COALESCE(SUM(amount_micros), 0) FROM credits WHERE tenant_id = ?", (tenant_id,)
        )
        key = self._limits(tenant_id, key_id, self._spent(tenant_id, key_id)) if key_id else Limits(0, 0, 0)
        return BudgetStatus(
            tenant_id,
            key_id,
            self._limits(tenant_id, TENANT_WIDE, tenant_spent),
            key,
            int(credits[0]) - tenant_spent if credits else -tenant_spent,
        )

    def soft_alerts_due(self, scopes: set[tuple[str, str]]) -> list[tuple[str, str, Limits]]:
        """Budgets among `scopes` ((tenant, key); key "" for the tenant) whose
        soft limit has just been crossed; each is reported once (until the
        budget is set again)."""
        armed = {
            (str(t), str(k))
            for t, k in self._db.fetchall(
                "SELECT tenant_id, key_id FROM budgets WHERE soft_limit_micros > 0 AND soft_alerted = 0"
            )
        }
        due = []
        for tenant_id, key_id in sorted(scopes & armed):  # most batches touch no armed budget: no more queries
            spent = self._spent(tenant_id, key_id if key_id else None)
            limits = self._limits(tenant_id, key_id, spent)
            if limits.over_soft and self._db.execute(
                "UPDATE budgets SET soft_alerted = 1 WHERE tenant_id = ? AND key_id = ? AND soft_alerted = 0",
                (tenant_id, key_id),
            ):
                due.append((tenant_id, key_id, limits))
        return due

    def close(self) -> None:
        self._db.close()
