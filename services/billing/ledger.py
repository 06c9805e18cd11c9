"""The usage ledger in SQLite. The request id is the primary key, so applying
an event twice changes nothing."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_entries (
    request_id        TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    finish_reason     TEXT NOT NULL,
    completed_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage_entries (tenant_id, completed_at);
"""


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


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
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
                    "INSERT INTO usage_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
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
        query = "SELECT * FROM usage_entries WHERE tenant_id = ?"
        params: tuple[str, ...] = (tenant_id,)
        if request_id:
            query += " AND request_id = ?"
            params += (request_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY completed_at", params).fetchall()
        return [Entry(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
