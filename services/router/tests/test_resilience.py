import random

import pytest

from services.router.catalog import BreakerConfig
from services.router.resilience import BreakerState, Bulkhead, CircuitBreaker, Ewma, backoff_delays


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **overrides: float) -> CircuitBreaker:
    config = BreakerConfig(**{"consecutive_failures": 3, "min_requests": 10, "open_s": 5.0, **overrides})
    return CircuitBreaker("pool", config, clock)


def test_consecutive_failures_open_the_breaker_and_it_refuses() -> None:
    clock = Clock()
    b = breaker(clock)
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()


def test_a_success_resets_the_consecutive_count() -> None:
    b = breaker(Clock())
    for _ in range(2):
        b.record_failure()
    b.record_success()
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_error_rate_in_the_window_opens_it_once_enough_calls_are_seen() -> None:
    clock = Clock()
    b = breaker(clock, consecutive_failures=100, error_rate=0.5)
    for _ in range(4):
        b.record_success()
        b.record_failure()  # alternating: never 2 in a row, 50% errors
        clock.now += 0.1
    assert b.state is BreakerState.CLOSED  # 8 calls: under min_requests
    b.record_success()
    b.record_failure()
    assert b.state is BreakerState.OPEN


def test_old_calls_leave_the_window() -> None:
    clock = Clock()
    b = breaker(clock, consecutive_failures=100, error_rate=0.5, window_s=10)
    for _ in range(9):
        b.record_failure()
        b.record_success()
    clock.now += 11  # all of them are out of the window now
    for _ in range(9):
        b.record_success()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()
    assert not b.allow()  # one probe at a time
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_a_failed_probe_opens_it_again_for_a_full_period() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.now += 4.9
    assert not b.allow()


def test_a_probe_that_was_not_made_is_given_back() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.allow()
    b.release_probe()
    assert b.allow()


def test_transitions_are_reported() -> None:
    changes: list[tuple[str, BreakerState]] = []
    clock = Clock()
    b = CircuitBreaker("p", BreakerConfig(consecutive_failures=1, open_s=1), clock, lambda n, s: changes.append((n, s)))
    b.record_failure()
    clock.now += 1
    b.allow()
    b.record_success()
    assert [s for _, s in changes] == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(1)
    for _ in range(200):
        delays = backoff_delays(5, base_s=0.1, cap_s=1.0, rng=rng)
        bounds = [0.1, 0.2, 0.4, 0.8, 1.0]
        assert all(0 <= d <= bound for d, bound in zip(delays, bounds, strict=True))
    # Full jitter: the delays spread over the whole range, not around the bound.
    samples = [backoff_delays(4, 0.1, 1.0, rng)[3] for _ in range(2000)]
    assert min(samples) < 0.1 and max(samples) > 0.7
    assert sum(samples) / len(samples) == pytest.approx(0.4, abs=0.05)


def test_backoff_with_the_same_seed_is_the_same() -> None:
    assert backoff_delays(3, 0.05, 1, random.Random(7)) == backoff_delays(3, 0.05, 1, random.Random(7))


def test_bulkhead_admits_up_to_its_limit() -> None:
    bulkhead = Bulkhead(2)
    assert bulkhead.try_acquire() and bulkhead.try_acquire()
    assert not bulkhead.try_acquire()
    bulkhead.release()
    assert bulkhead.try_acquire()
    assert bulkhead.in_flight == 2


def test_ewma_follows_recent_samples() -> None:
    ewma = Ewma(alpha=0.5)
    ewma.add(1.0)
    ewma.add(0.0)
    assert ewma.value == 0.5
