"""Stop sequences on streamed text: how much of the text generated so far is
safe to send, and whether a stop sequence has ended it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopScan:
    # Characters of the text that may be sent now.
    safe_end: int
    # True when a stop sequence was found; the text ends at `safe_end`.
    stopped: bool


def scan_for_stops(text: str, stops: Sequence[str]) -> StopScan:
    """Finds the earliest stop sequence in `text`; otherwise holds back the
    longest suffix that could still grow into one."""
    earliest = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if earliest >= 0:
        return StopScan(earliest, True)
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    return StopScan(len(text) - held, False)
