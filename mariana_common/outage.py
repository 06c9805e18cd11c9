"""Remembering that a dependency just failed, so the next calls do not each
wait for their own timeout: after a failure, `is_down()` is true for
`hold_s`; then one call tries again (and either clears it or holds it)."""

from __future__ import annotations

import time
from collections.abc import Callable


class OutageGate:
    def __init__(self, hold_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._hold_s = hold_s
        self._clock = clock
        self._down_until = 0.0

    def is_down(self) -> bool:
        return self._clock() < self._down_until

    def failed(self) -> None:
        self._down_until = self._clock() + self._hold_s

    def succeeded(self) -> None:
        self._down_until = 0.0
