"""The model router's fallback chain with in-memory pools (each pool a
scripted stand-in for an inference service)."""

from __future__ import annotations

import gc
import random
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import pytest

from mariana_common.errors import InvalidArgument, NotFound, Unavailable
from services.router.catalog import Catalog, PoolConfig
from services.router.domain import GenerationRequest, ModelEntry, Piece
from services.router.policies import PoolState, order_pools
from services.router.resilience import BreakerState, Bulkhead, CircuitBreaker, Ewma
from services.router.routing import ModelRouter, NoPoolCanServe, Route, StreamBroken


class Pool:
    """Answers "<name> says hi" in two pieces, or fails as scripted: `fail`
    failures before the first piece, or `break_after` pieces then a failure."""

    def __init__(self, name: str, fail: int = 0, break_after: int | None = None, error: Exception | None = None):
        self.name = name
        self.fail = fail
        self.break_after = break_after
        self.error = error or Unavailable("down")
        self.calls: list[tuple[str, float | None]] = []

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        self.calls.append((request.model, timeout_s))
        if self.fail:
            self.fail -= 1
            raise self.error
        for i, text in enumerate([f"{self.name} says ", "hi"]):
            if self.break_after is not None and i >= self.break_after:
                raise Unavailable("died mid-answer")
            yield Piece(text, None, 5, i + 1)
        yield Piece("", "stop", 5, 2)

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]:
        raise NotImplementedError

    async def models(self) -> list[ModelEntry]:
        return []


def catalog(**overrides: Any) -> Catalog:
    raw: dict[str, Any] = {
        "pools": {
            "a1": {"upstream": "a1", "model": "big-a"},
            "a2": {"upstream": "a2", "model": "big-a"},
            "b": {"upstream": "b", "model": "small-b"},
        },
        "models": {
            "big": {"aliases": ["default"], "pools": ["a1", "a2"], "fallbacks": ["small"]},
            "small": {"pools": ["b"]},
        },
        "retry": {"retries": 1, "base_s": 0.01, "cap_s": 0.01},
        "breaker": {"consecutive_failures": 2, "open_s": 30},
    }
    for key, value in overrides.items():
        raw[key] = value
    return Catalog.model_validate(raw)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def router(pools: dict[str, Pool], cat: Catalog | None = None) -> tuple[ModelRouter, Sleeps]:
    sleeps = Sleeps()
    chosen = cat or catalog()
    return ModelRouter(lambda: chosen, lambda name, config: pools[name], random.Random(1), sleep=sleeps), sleeps


async def answer(r: ModelRouter, route: Route, stream: bool = True, model: str = "big") -> str:
    pieces = [p async for p in r.generate(GenerationRequest(model, prompt="x"), "req", route, stream=stream)]
    text = ""
    for piece in pieces:
        text = piece.text if piece.restarted else text + piece.text
    return text


async def test_the_primary_pool_serves_with_the_upstream_model_name() -> None:
    pools = {"a1": Pool("a1"), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    route = Route()
    assert await answer(r, route, model="default") == "a1 says hi"
    assert (route.model, route.pool, route.step) == ("big", "a1", "primary")
    assert pools["a1"].calls[0][0] == "big-a"


async def test_a_failing_call_is_retried_after_a_backoff() -> None:
    pools = {"a1": Pool("a1", fail=1), "a2": Pool("a2"), "b": Pool("b")}
    r, sleeps = router(pools)
    route = Route()
    assert await answer(r, route) == "a1 says hi"
    assert len(pools["a1"].calls) == 2 and route.attempts == 2
    assert len(sleeps.delays) == 1 and 0 <= sleeps.delays[0] <= 0.01


async def test_a_pool_that_keeps_failing_hands_over_to_the_next_pool() -> None:
    pools = {"a1": Pool("a1", fail=5), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    route = Route()
    assert await answer(r, route) == "a2 says hi"
    assert (route.pool, route.step) == ("a2", "primary")


async def test_when_every_primary_pool_fails_the_fallback_model_serves() -> None:
    pools = {"a1": Pool("a1", fail=9), "a2": Pool("a2", fail=9), "b": Pool("b")}
    r, _ = router(pools)
    route = Route()
    assert await answer(r, route) == "b says hi"
    assert (route.model, route.pool, route.step) == ("small", "b", "fallback")
    assert pools["b"].calls[0][0] == "small-b"
    assert r.steps["fallback"] == 1


async def test_when_nothing_can_serve_it_is_unavailable_with_a_retry_hint() -> None:
    pools = {name: Pool(name, fail=9) for name in ("a1", "a2", "b")}
    r, _ = router(pools)
    with pytest.raises(NoPoolCanServe) as error:
        await answer(r, Route())
    assert error.value.retry_after_s and error.value.retry_after_s > 0
    assert isinstance(error.value, Unavailable)


async def test_an_open_breaker_skips_its_pool_without_calling_it() -> None:
    pools = {"a1": Pool("a1", fail=2), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    await answer(r, Route())  # two failures: a1's breaker opens
    assert r.pool("a1").breaker.state is BreakerState.OPEN
    calls = len(pools["a1"].calls)
    route = Route()
    assert await answer(r, route) == "a2 says hi"
    assert len(pools["a1"].calls) == calls
    assert r.steps["breaker_open"] >= 1


async def test_a_full_bulkhead_sends_the_request_to_the_next_pool() -> None:
    pools = {"a1": Pool("a1"), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    a1 = r.pool("a1")
    for _ in range(a1.bulkhead.limit):
        assert a1.bulkhead.try_acquire()
    route = Route()
    assert await answer(r, route) == "a2 says hi"
    assert pools["a1"].calls == [] and r.steps["bulkhead_full"] == 1


async def test_a_bad_request_is_not_failed_over() -> None:
    pools = {"a1": Pool("a1", fail=1, error=InvalidArgument("bad")), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    with pytest.raises(InvalidArgument):
        await answer(r, Route())
    assert pools["a2"].calls == []


async def test_an_unknown_model_is_not_found() -> None:
    r, _ = router({})
    with pytest.raises(NotFound):
        await answer(r, Route(), model="nope")


async def test_a_stream_that_breaks_after_its_first_piece_is_not_failed_over() -> None:
    pools = {"a1": Pool("a1", break_after=1), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    with pytest.raises(StreamBroken):
        await answer(r, Route(), stream=True)
    assert pools["a2"].calls == []


async def test_an_answer_not_streamed_restarts_on_another_pool_when_one_dies_mid_answer() -> None:
    pools = {"a1": Pool("a1", break_after=1), "a2": Pool("a2"), "b": Pool("b")}
    r, _ = router(pools)
    route = Route()
    assert await answer(r, route, stream=False) == "a2 says hi"
    assert route.pool == "a2"


async def test_no_retry_when_the_deadline_leaves_no_time() -> None:
    pools = {"a1": Pool("a1", fail=1), "a2": Pool("a2", fail=9), "b": Pool("b", fail=9)}
    now = [0.0]
    chosen = catalog(retry={"retries": 3, "base_s": 5.0, "cap_s": 5.0})
    sleeps = Sleeps()
    r = ModelRouter(lambda: chosen, lambda n, c: pools[n], random.Random(3), clock=lambda: now[0], sleep=sleeps)
    request = GenerationRequest("big", prompt="x")
    with pytest.raises(NoPoolCanServe):
        [p async for p in r.generate(request, "req", Route(), deadline=0.001)]
    assert all(delay < 0.001 for delay in sleeps.delays)
    # Every call was given the time that was left, not the service default.
    assert all(timeout is not None and timeout <= 0.001 for _, timeout in pools["a1"].calls)


def state(name: str, **config: Any) -> PoolState:
    pool = PoolConfig(upstream=name, model=name, **config)
    breaker = CircuitBreaker(name, catalog().breaker)
    return PoolState(name, pool, breaker, Bulkhead(pool.max_concurrency), Ewma())


def test_policies_order_pools() -> None:
    rng = random.Random(5)
    a, b, c = state("a", cost_per_mtok=30, context=4096), state("b", cost_per_mtok=10), state("c", cost_per_mtok=20)
    assert [p.name for p in order_pools("priority", [a, b, c], 0, rng)] == ["a", "b", "c"]
    a.bulkhead.in_flight, b.bulkhead.in_flight, c.bulkhead.in_flight = 5, 9, 1
    assert [p.name for p in order_pools("least_outstanding", [a, b, c], 0, rng)] == ["c", "a", "b"]
    a.latency.add(0.3), b.latency.add(0.1)
    assert [p.name for p in order_pools("lowest_latency", [a, b, c], 0, rng)] == ["c", "b", "a"]  # c unmeasured
    assert [p.name for p in order_pools("lowest_cost", [a, b, c], 0, rng)] == ["b", "c", "a"]
    assert [p.name for p in order_pools("lowest_cost", [a, b, c], 6000, rng)] == ["b", "c"]  # a's context is too small


def test_weighted_split_follows_the_weights() -> None:
    rng = random.Random(11)
    stable, canary, off = state("stable", weight=9), state("canary", weight=1), state("off", weight=0)
    firsts = [order_pools("weighted", [stable, canary, off], 0, rng)[0].name for _ in range(5000)]
    assert firsts.count("canary") / len(firsts) == pytest.approx(0.1, abs=0.02)
    assert "off" not in firsts


def test_the_catalog_refuses_broken_references() -> None:
    with pytest.raises(ValueError, match="unknown pool"):
        Catalog.model_validate({"pools": {}, "models": {"m": {"pools": ["x"]}}})
    with pytest.raises(ValueError, match="unknown fallback"):
        Catalog.model_validate(
            {"pools": {"p": {"upstream": "u", "model": "m"}}, "models": {"m": {"pools": ["p"], "fallbacks": ["z"]}}}
        )
    with pytest.raises(ValueError, match="used by"):
        catalog(models={"a": {"pools": ["a1"], "aliases": ["x"]}, "b": {"pools": ["b"], "aliases": ["x"]}})


def test_fallback_chains_visit_each_model_once() -> None:
    cat = catalog(
        models={
            "a": {"pools": ["a1"], "fallbacks": ["b", "c"]},
            "b": {"pools": ["b"], "fallbacks": ["a", "c"]},
            "c": {"pools": ["a2"]},
        }
    )
    assert cat.chain("a") == ["a", "b", "c"]


def test_fallback_chains_are_depth_first_and_leave_no_cycles_for_the_collector() -> None:
    cat = catalog(
        models={
            "a": {"pools": ["a1"], "fallbacks": ["b", "c"]},
            "b": {"pools": ["b"], "fallbacks": ["d"]},
            "c": {"pools": ["a2"]},
            "d": {"pools": ["a2"]},
        }
    )
    gc.collect()
    gc.disable()
    try:
        assert cat.chain("a") == ["a", "b", "d", "c"]
        # Called on every request: what it made is freed at once, not left
        # for a collection (a pause on the request path).
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_a_caller_that_stops_at_the_last_piece_still_counts_as_a_success() -> None:
    pools = {"a1": Pool("a1", fail=2), "a2": Pool("a2"), "b": Pool("b")}
    now = [0.0]
    chosen = catalog(breaker={"consecutive_failures": 2, "open_s": 5})
    r = ModelRouter(lambda: chosen, lambda n, c: pools[n], random.Random(1), clock=lambda: now[0], sleep=Sleeps())
    await answer(r, Route())  # a1 fails twice: open
    assert r.pool("a1").breaker.state is BreakerState.OPEN
    now[0] += 5  # half-open: the next request probes a1, which works now
    async for piece in r.generate(GenerationRequest("big", prompt="x"), "req", Route()):
        if piece.finish_reason is not None:
            break  # as the gateway does
    assert r.pool("a1").breaker.state is BreakerState.CLOSED


async def test_a_probe_whose_caller_went_away_lets_the_next_request_probe() -> None:
    pools = {"a1": Pool("a1", fail=2), "a2": Pool("a2"), "b": Pool("b")}
    now = [0.0]
    chosen = catalog(breaker={"consecutive_failures": 2, "open_s": 5})
    r = ModelRouter(lambda: chosen, lambda n, c: pools[n], random.Random(1), clock=lambda: now[0], sleep=Sleeps())
    await answer(r, Route())
    now[0] += 5
    stream = r.generate(GenerationRequest("big", prompt="x"), "req", Route())
    await anext(stream)  # the probe started...
    await stream.aclose()  # ...and its caller left before the answer was complete
    route = Route()
    await answer(r, route)
    assert route.pool == "a1" and r.pool("a1").breaker.state is BreakerState.CLOSED


async def test_a_whole_answer_counts_its_time_to_first_token_not_its_whole_time() -> None:
    now = [0.0]

    class Whole(Pool):
        async def generate(
            self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
        ) -> AsyncGenerator[Piece, None]:
            now[0] += 2.5  # 0.5 s to the first token, 2 s for the rest
            yield Piece(f"{self.name} says hi", "stop", 5, 2, after_first_token_s=2.0)

    pools = {"a1": Whole("a1"), "a2": Whole("a2"), "b": Whole("b")}
    r = ModelRouter(lambda: catalog(), lambda n, c: pools[n], random.Random(1), clock=lambda: now[0], sleep=Sleeps())
    pieces = [p async for p in r.generate(GenerationRequest("big", prompt="x"), "req", Route(), stream=False)]
    (piece,) = pieces
    served = piece.text.split(" ")[0]
    assert served in ("a1", "a2") and r.pool(served).latency.value == pytest.approx(0.5)
