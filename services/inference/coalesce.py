"""Events merged for a caller that wants only the whole answer (a request not
streamed to its client). Every message is a cost in this service, in Envoy and
in the router, and a 256-token answer was 256 of them; merged, it is the first
step as it comes (the time to first token, which the router's lowest-latency
policy reads), then at most one message every `interval_s` (so a caller cut
off midway still knows how many tokens were generated, and bills them), then
the last."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from services.inference.scheduler import Event

PROGRESS_INTERVAL_S = 0.25


class Coalescer:
    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._sent_at = -math.inf
        self._pending: Event | None = None

    def add(self, event: Event) -> Event | None:
        """The merged event to send now, or None to hold it."""
        pending = self._pending
        if pending is not None:
            event = replace(event, text=pending.text + event.text, logprobs=pending.logprobs + event.logprobs)
        now = self._clock()
        if event.finish_reason is None and now - self._sent_at < self._interval_s:
            self._pending = event
            return None
        self._pending, self._sent_at = None, now
        return event
