"""One small interface over SQLite (the embedded default) and PostgreSQL
(selected by a `postgresql://` URL), so a store's code and SQL are the same on
both. SQL is written with `?` placeholders and portable types (TEXT, INTEGER,
BIGINT, DOUBLE PRECISION). Calls are blocking; async callers use
`asyncio.to_thread`."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Row = tuple[Any, ...]


class IntegrityError(Exception):
    """A constraint (unique, check, foreign key) refused the change."""


class Database:
    """A connection with a lock: statements from several threads take turns."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self.is_postgres = url.startswith(("postgresql://", "postgres://"))
        if self.is_postgres:
            import psycopg

            self._pg = psycopg.connect(url, autocommit=True)
            self._integrity: tuple[type[BaseException], ...] = (psycopg.errors.IntegrityError,)
        else:
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._sqlite = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._sqlite.execute("PRAGMA journal_mode=WAL")
            self._sqlite.execute("PRAGMA synchronous=FULL")
            self._sqlite.execute("PRAGMA foreign_keys=ON")
            self._integrity = (sqlite3.IntegrityError,)

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.is_postgres else statement

    def _run(self, statement: str, params: Sequence[Any]) -> Any:
        try:
            if self.is_postgres:
                return self._pg.execute(self._sql(statement), params)  # type: ignore[arg-type]
            return self._sqlite.execute(statement, params)
        except self._integrity as error:
            raise IntegrityError(str(error)) from error

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Runs one statement; returns the rows it changed."""
        with self._lock:
            return int(self._run(statement, params).rowcount)

    def fetchone(self, statement: str, params: Sequence[Any] = ()) -> Row | None:
        with self._lock:
            row = self._run(statement, params).fetchone()
        return tuple(row) if row is not None else None

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return [tuple(r) for r in self._run(statement, params).fetchall()]

    def script(self, statements: str) -> None:
        """Runs `;`-separated DDL (schema creation)."""
        with self._lock:
            for statement in (s.strip() for s in statements.split(";")):
                if statement:
                    self._run(statement, ())

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """All statements inside commit together or not at all."""
        with self._lock:
            self._run("BEGIN", ())
            try:
                yield self
            except BaseException:
                self._run("ROLLBACK", ())
                raise
            self._run("COMMIT", ())

    def close(self) -> None:
        with self._lock:
            if self.is_postgres:
                self._pg.close()
            else:
                self._sqlite.close()


def database_url(value: str | Path) -> str:
    """A path means SQLite; URLs pass through."""
    text = str(value)
    return text if "://" in text else f"sqlite:///{text}"
