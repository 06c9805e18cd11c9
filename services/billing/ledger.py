"""The usage ledger in SQLite, and tenants' budgets. The request id is the
primary key, so applying an event twice changes nothing. Money is integer
micro-units."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from mariana_common.errors import InvalidArgument

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_entries (
    request_id        TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    finish_reason     TEXT NOT NULL,
    completed_at      REAL NOT NULL,
    cost_micros       INTEGER NOT NULL DEFAULT 0 CHECK (cost_micros >= 0)
);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage_entries (tenant_id, completed_at);
CREATE TABLE IF NOT EXISTS budgets (
    tenant_id         TEXT PRIMARY KEY,
    hard_limit_micros INTEGER NOT NULL CHECK (hard_limit_micros >= 0),
    soft_limit_micros INTEGER NOT NULL CHECK (soft_limit_micros >= 0)
);
"""


# How usage_report groups; SQLite's date function (the ledger's SQL dialect).
REPORT_GROUPS = {"day": "date(completed_at, 'unixepoch')", "model": "model", "key": "key_id"}


@dataclass(frozen=True)
class UsageLine:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


COLUMNS = (
    "request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, finish_reason, completed_at, cost_micros"
)


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
class BudgetStatus:
    tenant_id: str
    spent_micros: int
    hard_limit_micros: int  # 0: no limit
    soft_limit_micros: int

    @property
    def over_hard(self) -> bool:
        return bool(self.hard_limit_micros) and self.spent_micros >= self.hard_limit_micros

    @property
    def over_soft(self) -> bool:
        return bool(self.soft_limit_micros) and self.spent_micros >= self.soft_limit_micros


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(usage_entries)")}
        if "cost_micros" not in columns:  # a ledger from before prices existed
            self._db.execute("ALTER TABLE usage_entries ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0")
        self._lock = threading.Lock()

    def record(self, entries: list[Entry]) -> int:
        """Applies entries in one transaction; returns how many were new."""
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    # Only a duplicate request id is ignored; OR IGNORE would also
                    # drop rows that break a CHECK, silently.
                    f"INSERT INTO usage_entries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (request_id) DO NOTHING",
                    [
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
                        )
                        for e in entries
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def entries(self, tenant_id: str, request_id: str = "") -> list[Entry]:
        query = f"SELECT {COLUMNS} FROM usage_entries WHERE tenant_id = ?"
        params: tuple[str, ...] = (tenant_id,)
        if request_id:
            query += " AND request_id = ?"
            params += (request_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY completed_at", params).fetchall()
        return [Entry(*row) for row in rows]

    def usage_report(self, tenant_id: str, start: float, end: float, group_by: str) -> list[UsageLine]:
        """Usage in [start, end) grouped by day (UTC), model or key; 0 bounds nothing."""
        column = REPORT_GROUPS.get(group_by)
        if column is None:
            raise InvalidArgument(f"group_by must be one of {', '.join(REPORT_GROUPS)}")
        if end and start > end:
            raise InvalidArgument("start must not be after end")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_micros) "
                "FROM usage_entries WHERE tenant_id = ? AND completed_at >= ? AND completed_at < ? "
                "GROUP BY 1 ORDER BY 1",
                (tenant_id, start, end or float("inf")),
            ).fetchall()
        return [UsageLine(str(g), int(n), int(p), int(c), int(m)) for g, n, p, c, m in rows]

    def set_budget(self, tenant_id: str, hard_limit_micros: int, soft_limit_micros: int) -> BudgetStatus:
        with self._lock:
            self._db.execute(
                "INSERT INTO budgets VALUES (?, ?, ?) ON CONFLICT (tenant_id) DO UPDATE SET "
                "hard_limit_micros = excluded.hard_limit_micros, soft_limit_micros = excluded.soft_limit_micros",
                (tenant_id, hard_limit_micros, soft_limit_micros),
            )
        return self.budget_status(tenant_id)

    def budget_status(self, tenant_id: str) -> BudgetStatus:
        """All-time spend against the tenant's budget."""
        with self._lock:
            spent = self._db.execute(
                "SELECT COALESCE(SUM(cost_micros), 0) FROM usage_entries WHERE tenant_id = ?", (tenant_id,)
            ).fetchone()[0]
            row = self._db.execute(
                "SELECT hard_limit_micros, soft_limit_micros FROM budgets WHERE tenant_id = ?", (tenant_id,)
            ).fetchone()
        hard, soft = row if row else (0, 0)
        return BudgetStatus(tenant_id, int(spent), int(hard), int(soft))

    def close(self) -> None:
        self._db.close()
