"""Which pool serves a request, and what happens when it cannot: the model's
pools in its policy's order (an open breaker or a full bulkhead skips a pool),
retries with backoff and full jitter inside the deadline, then the model's
fallbacks. A stream fails over only before its first piece; after that the
error ends it. The step taken is logged and counted, and told to the caller
through a `Route`."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace

import structlog

from mariana_common.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable
from services.router.catalog import Catalog, PoolConfig
from services.router.domain import GenerationRequest, Inference, Piece
from services.router.metrics import BREAKER_STATE, ROUTE_STEPS
from services.router.policies import PoolState, order_pools
from services.router.resilience import BreakerState, Bulkhead, CircuitBreaker, Ewma, backoff_delays

log = structlog.get_logger()
BREAKER_LEVEL = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

# Upstream errors worth another try (here or on another pool). Anything else
# (a bad request) goes straight back to the client.
RETRYABLE = (Unavailable, ResourceExhausted, DeadlineExceeded, NotFound)
RETRY_AFTER_S = 5


class StreamBroken(Unavailable):
    """The pool failed after the stream had started; nothing can take over."""


class NoPoolCanServe(Unavailable):
    """Every pool of the model and of its fallbacks failed or is shut off."""


@dataclass
class Route:
    """Where a request went: the public model that answered, its pool, and the
    step of the chain (primary, fallback, cache, stale_cache)."""

    model: str = ""
    pool: str = ""
    step: str = ""
    attempts: int = 0
    # The pool's breaker when it was chosen: closed, half_open (a probe).
    breaker: str = ""


PoolFactory = Callable[[str, PoolConfig], Inference]


class ModelRouter:
    def __init__(
        self,
        catalog: Callable[[], Catalog],
        make_client: PoolFactory,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._catalog = catalog
        self._make_client = make_client
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._pools: dict[str, PoolState] = {}
        self._clients: dict[tuple[str, PoolConfig], Inference] = {}
        self.steps: Counter[str] = Counter()

    def _on_breaker(self, pool: str, state: BreakerState) -> None:
        BREAKER_STATE.labels(pool).set(BREAKER_LEVEL[state])

    def _count(self, step: str) -> None:
        self.steps[step] += 1
        ROUTE_STEPS.labels(step).inc()

    def pool(self, name: str) -> PoolState:
        """The run-time state of a pool, following the catalog as it is edited."""
        catalog = self._catalog()
        config = catalog.pools[name]
        state = self._pools.get(name)
        if state is None:
            breaker = CircuitBreaker(name, catalog.breaker, self._clock, self._on_breaker)
            state = PoolState(name, config, breaker, Bulkhead(config.max_concurrency), Ewma())
            self._pools[name] = state
        else:
            state.config = config
            state.bulkhead.limit = config.max_concurrency
            state.breaker.config = catalog.breaker
        return state

    def client(self, state: PoolState) -> Inference:
        key = (state.name, state.config)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self._make_client(state.name, state.config)
        return client

    def models(self) -> list[str]:
        return list(self._catalog().models)

    def resolve(self, name: str) -> str:
        return self._catalog().resolve(name)

    def chain(self, model: str) -> list[str]:
        """The public models a request for `model` may be served by."""
        return self._catalog().chain(model)

    async def generate(
        self,
        request: GenerationRequest,
        request_id: str,
        route: Route,
        deadline: float | None = None,
        stream: bool = True,
        needed_context: int = 0,
    ) -> AsyncGenerator[Piece, None]:
        catalog = self._catalog()
        public = catalog.resolve(request.model)
        failures: list[str] = []
        void = False  # pieces were yielded by an attempt that then failed
        for step, model in enumerate(catalog.chain(public)):
            entry = catalog.models[model]
            states = [self.pool(name) for name in entry.pools]
            for state in order_pools(entry.policy, states, needed_context, self._rng):
                route.model, route.pool, route.step = model, state.name, "primary" if step == 0 else "fallback"
                route.breaker = state.breaker.state.value
                pooled = replace(request, model=state.config.model)
                outcome = self._try_pool(state, pooled, request_id, route, deadline, stream)
                try:
                    async with aclosing(outcome):
                        async for piece in outcome:
                            if void:
                                piece, void = replace(piece, restarted=True), False
                            yield piece
                    self._count(route.step)
                    if step:
                        log.warning("served by a fallback model", model=model, pool=state.name, asked=public)
                    return
                except _PoolFailed as failed:
                    failures.append(f"{state.name}: {failed}")
                    if failed.after_first and stream:
                        self._count("broken_stream")
                        raise StreamBroken(f"the model failed mid-stream ({failed})") from failed
                    void = void or failed.after_first
        self._count("unavailable")
        log.error("no pool can serve", model=public, failures=failures)
        raise NoPoolCanServe(f"no pool can serve {public!r} now; retry later", RETRY_AFTER_S)

    async def _try_pool(
        self,
        state: PoolState,
        request: GenerationRequest,
        request_id: str,
        route: Route,
        deadline: float | None,
        stream: bool = True,
    ) -> AsyncGenerator[Piece, None]:
        """The pool's answer, with retries; _PoolFailed when it cannot give one."""
        if not state.breaker.allow():
            self._count("breaker_open")
            raise _PoolFailed("circuit open")
        if not state.bulkhead.try_acquire():
            state.breaker.release_probe()
            self._count("bulkhead_full")
            raise _PoolFailed("bulkhead full")
        settled = False  # the breaker has heard how this call went
        try:
            retry = self._catalog().retry
            delays = backoff_delays(retry.retries, retry.base_s, retry.cap_s, self._rng)
            for attempt in range(retry.retries + 1):
                route.attempts += 1
                started = self._clock()
                remaining = None if deadline is None else deadline - started
                if remaining is not None and remaining <= 0:
                    raise _PoolFailed("deadline exceeded")
                first = True
                try:
                    upstream = self.client(state).generate(request, request_id, remaining, stream)
                    async with aclosing(upstream):
                        async for piece in upstream:
                            if first:
                                first = False
                                # the time to the first token, also when it came with the rest
                                state.latency.add(self._clock() - started - piece.after_first_token_s)
                            if piece.finish_reason is not None and not settled:
                                # Counted when the answer is complete: the
                                # caller may stop reading at the last piece.
                                settled = True
                                state.breaker.record_success()
                            yield piece
                    return
                except RETRYABLE as error:
                    if not first:
                        # A stream cut after it started is a replica going away
                        # (Envoy's concern: it ejects the replica and sends new
                        # calls to the others), not the pool failing: the
                        # breaker does not count it.
                        raise _PoolFailed(str(error), after_first=True) from error
                    settled = True
                    state.breaker.record_failure()
                    log.warning("pool call failed", pool=state.name, attempt=attempt, error=str(error))
                    if attempt == retry.retries or not state.breaker.allow():
                        raise _PoolFailed(str(error)) from error
                    settled = False
                    delay = delays[attempt]
                    if deadline is not None and self._clock() + delay >= deadline:
                        raise _PoolFailed(f"{error} (no time left to retry)") from error
                    self._count("retry")
                    await self._sleep(delay)
        finally:
            state.bulkhead.release()
            if not settled:
                # Neither success nor failure (the caller went away, or the
                # request was bad): a half-open breaker may probe again.
                state.breaker.release_probe()


class _PoolFailed(Exception):
    def __init__(self, reason: str, after_first: bool = False) -> None:
        super().__init__(reason)
        self.after_first = after_first


def pool_clients(upstreams: Mapping[str, Inference], remote: Callable[[PoolConfig], Inference]) -> PoolFactory:
    """Mesh pools share the channel of their upstream; remote pools get their own client."""

    def make(name: str, config: PoolConfig) -> Inference:
        if config.kind == "mesh":
            assert config.upstream is not None
            client = upstreams.get(config.upstream)
            if client is None:
                raise Unavailable(f"pool {name!r}: upstream {config.upstream!r} is not configured in the router")
            return client
        return remote(config)

    return make
