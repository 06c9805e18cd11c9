"""A durable local spool for usage the router could not hand to Redis: records
are appended (and fsynced) to a JSON-lines file in order, and replayed in that
order when Redis is back; the file is emptied only after a replay succeeded.
A record replayed twice (a crash between sending and emptying) is harmless:
billing applies a request id once."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from services.router.domain import UsageRecord
from services.router.metrics import SPOOL_DEPTH

Item = UsageRecord | str  # a record to publish, or the request id of a reservation to release


def _encode(item: Item) -> str:
    if isinstance(item, str):
        return json.dumps({"release": item})
    return json.dumps({"record": dataclasses.asdict(item)})


def _decode(line: str) -> Item:
    raw = json.loads(line)
    if "release" in raw:
        return str(raw["release"])
    return UsageRecord(**raw["record"])


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.depth = len(self.read())
        SPOOL_DEPTH.set(self.depth)

    def append(self, items: list[Item]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(_encode(i) + "\n" for i in items))
            f.flush()
            os.fsync(f.fileno())
        self.depth += len(items)
        SPOOL_DEPTH.set(self.depth)

    def read(self) -> list[Item]:
        """Everything spooled, oldest first; a torn last line (a crash while
        appending) is skipped."""
        if not self.path.exists():
            return []
        items = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                items.append(_decode(line))
            except (ValueError, TypeError, KeyError):
                continue
        return items

    def clear(self) -> None:
        with self.path.open("w", encoding="utf-8") as f:
            f.flush()
            os.fsync(f.fileno())
        self.depth = 0
        SPOOL_DEPTH.set(0)
