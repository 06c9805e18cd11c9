"""The paced collector: which generation is due, full collections at most once
per interval, and a real cycle freed by a tick."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from mariana_common.gc_pacing import GcPacer, generation_due

THRESHOLDS = (10_000, 20, 20)


@pytest.mark.parametrize(
    ("counts", "since_full_s", "expected"),
    [
        ((0, 0, 0), 0.0, None),  # nothing allocated: nothing to do
        ((5, 0, 0), 0.0, 0),
        ((5, 19, 0), 0.0, 0),
        ((5, 20, 0), 0.0, 1),  # the middle generation's turn, as CPython counts it
        ((5, 20, 20), 59.0, 1),  # a full collection is due but one ran a moment ago
        ((5, 3, 20), 60.0, 2),
        ((0, 0, 25), 600.0, 2),
        ((5, 3, 19), 600.0, 0),  # long since the last full one, but not its turn
    ],
)
def test_the_generation_due(counts: tuple[int, int, int], since_full_s: float, expected: int | None) -> None:
    assert generation_due(counts, THRESHOLDS, since_full_s, full_every_s=60.0) == expected


def test_full_collections_come_at_most_once_per_interval() -> None:
    now = [0.0]
    collected: list[int] = []
    pacer = GcPacer(
        full_every_s=60.0,
        clock=lambda: now[0],
        collect=collected.append,
        counts=lambda: (1, 0, 30),  # the oldest generation stays due
        thresholds=lambda: THRESHOLDS,
    )
    for _ in range(200):  # 10 s of ticks
        now[0] += 0.05
        pacer.tick()
    now[0] = 60.0
    pacer.tick()
    for _ in range(200):
        now[0] += 0.05
        pacer.tick()
    assert collected.count(2) == 1
    assert collected.count(0) == 400


class Node:
    def __init__(self) -> None:
        self.me = self


def test_a_tick_frees_a_reference_cycle() -> None:
    gc.collect()
    node = Node()
    freed = weakref.ref(node)
    del node
    assert freed() is not None  # a cycle: reference counting alone keeps it
    assert GcPacer().tick() == 0
    assert freed() is None


async def test_the_pacer_collects_on_the_event_loop_until_cancelled() -> None:
    gc.collect()
    node = Node()
    freed = weakref.ref(node)
    del node
    task = asyncio.create_task(GcPacer(pace_s=0).run())
    for _ in range(10):  # a few turns of the loop: the pacer ticks on one of them
        await asyncio.sleep(0)
        if freed() is None:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert freed() is None
