"""Per-pool protection: a circuit breaker, a bulkhead, and the retry backoff
schedule. Plain Python with an injectable clock, so the state machines are
tested without waiting."""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from collections.abc import Callable

import structlog

from services.router.catalog import BreakerConfig

log = structlog.get_logger()


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed: calls pass; it opens on `consecutive_failures` in a row, or on an
    error rate of at least `error_rate` over `window_s` once `min_requests`
    calls are in the window. Open: calls are refused for `open_s`. Half-open:
    one probe call at a time; its success closes the breaker, its failure
    opens it again."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.config.open_s:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def _move(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        self._probing = False
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        if state is BreakerState.CLOSED:
            self._consecutive = 0
            self._window.clear()
        log.warning("circuit breaker changed", pool=self.name, state=state.value)
        if self._on_change is not None:
            self._on_change(self.name, state)

    def allow(self) -> bool:
        """May a call go now? In half-open, True for one probe at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def release_probe(self) -> None:
        """A call allowed by `allow` that was never made (e.g. the bulkhead was full)."""
        self._probing = False

    def _record(self, ok: bool) -> None:
        now = self._clock()
        self._window.append((now, ok))
        while self._window and self._window[0][0] < now - self.config.window_s:
            self._window.popleft()

    def record_success(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)
            return
        self._consecutive = 0
        self._record(True)

    def record_failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)
            return
        if self._state is BreakerState.OPEN:
            return
        self._consecutive += 1
        self._record(False)
        failures = sum(1 for _, ok in self._window if not ok)
        by_rate = len(self._window) >= self.config.min_requests and failures / len(self._window) >= (
            self.config.error_rate
        )
        if self._consecutive >= self.config.consecutive_failures or by_rate:
            self._move(BreakerState.OPEN)


class Bulkhead:
    """At most `limit` calls in flight; a call over the limit is refused at
    once (the router tries another pool) rather than queued behind a slow one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


def backoff_delays(retries: int, base_s: float, cap_s: float, rng: random.Random) -> list[float]:
    """Exponential backoff with full jitter: retry i waits a uniform time in
    [0, min(cap, base * 2**i)]."""
    return [rng.uniform(0, min(cap_s, base_s * 2**i)) for i in range(retries)]


class Ewma:
    """Exponentially weighted moving average of a latency (seconds)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
