"""A config file that operators edit while the service runs: re-read when it
changes (looked at no more than once per `interval_s`); a broken edit is
logged and the last good version stays in force."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import structlog
import yaml

log = structlog.get_logger()

T = TypeVar("T")


class ReloadingFile(Generic[T]):
    def __init__(self, path: Path, load: Callable[[Path], T], what: str, interval_s: float = 1.0) -> None:
        self._path = path
        self._load = load
        self._what = what
        self._interval_s = interval_s
        self._value = load(path)
        self._mtime = path.stat().st_mtime_ns
        self._next_look = time.monotonic() + interval_s

    def __call__(self) -> T:
        now = time.monotonic()
        if now < self._next_look:
            return self._value
        self._next_look = now + self._interval_s
        try:
            mtime = self._path.stat().st_mtime_ns
        except OSError as error:
            log.error(f"{self._what} file unreadable; keeping the last good one", error=str(error))
            return self._value
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                self._value = self._load(self._path)
                log.info(f"{self._what} reloaded", path=str(self._path))
            except (OSError, ValueError, yaml.YAMLError) as error:
                log.error(f"{self._what} not reloaded; keeping the last good one", error=str(error))
        return self._value
