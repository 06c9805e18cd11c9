"""A config file that operators edit while the service runs: re-read when it
changes (looked at no more than once per `interval_s`); a broken edit is
logged and the last good version stays in force.

An editor that rewrites the file in place truncates it, then writes it. The
kernel stamps both with a clock that ticks every few milliseconds, so a look
that falls between the two can see an empty or half-written file with the
same mtime the finished one will have. The mtime alone would then hide the
finished edit for good. So a file whose mtime is recent ("racy", as git calls
it) is read again on every look until it has settled, and a change is decided
by the content, not the stamp."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import structlog
import yaml

log = structlog.get_logger()

T = TypeVar("T")

# An mtime this close to the clock may still be shared by a write to come.
RACY_NS = 2_000_000_000


class ReloadingFile(Generic[T]):
    def __init__(self, path: Path, parse: Callable[[str], T], what: str, interval_s: float = 1.0) -> None:
        self._path = path
        self._parse = parse
        self._what = what
        self._interval_s = interval_s
        self._stamp: tuple[int, int, int] | None = None
        self._settled = False
        self._digest = b""
        text = self._read_if_changed()
        assert text is not None  # nothing had been seen yet
        self._value = parse(text)
        self._next_look = time.monotonic() + interval_s

    def __call__(self) -> T:
        now = time.monotonic()
        if now < self._next_look:
            return self._value
        self._next_look = now + self._interval_s
        try:
            text = self._read_if_changed()
        except OSError as error:
            log.error(f"{self._what} file unreadable; keeping the last good one", error=str(error))
            return self._value
        if text is not None:
            try:
                self._value = self._parse(text)
                log.info(f"{self._what} reloaded", path=str(self._path))
            except (ValueError, yaml.YAMLError) as error:
                log.error(f"{self._what} not reloaded; keeping the last good one", error=str(error))
        return self._value

    def _read_if_changed(self) -> str | None:
        """The file's text if it differs from the last text seen, else None."""
        before = self._path.stat()
        stamp = (before.st_mtime_ns, before.st_size, before.st_ino)
        if stamp == self._stamp and self._settled:
            return None
        data = self._path.read_bytes()
        self._stamp = stamp
        self._settled = time.time_ns() - before.st_mtime_ns > RACY_NS
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return None
        self._digest = digest
        return data.decode()
