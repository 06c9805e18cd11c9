"""Routing policies: the order in which a model's pools are tried."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from services.router.catalog import Policy, PoolConfig
from services.router.resilience import Bulkhead, CircuitBreaker, Ewma


@dataclass
class PoolState:
    """What the router knows of a pool at run time."""

    name: str
    config: PoolConfig
    breaker: CircuitBreaker
    bulkhead: Bulkhead
    latency: Ewma


def order_pools(policy: Policy, pools: Sequence[PoolState], needed_context: int, rng: random.Random) -> list[PoolState]:
    """Pools to try, best first. The others stay behind the first as
    in-model fallbacks (except pools too small for the request)."""
    if policy == "priority":
        return list(pools)
    if policy == "least_outstanding":
        return sorted(pools, key=lambda p: p.bulkhead.in_flight)
    if policy == "lowest_latency":
        # A pool with no measurement yet goes first, so it gets one.
        return sorted(pools, key=lambda p: -1.0 if p.latency.value is None else p.latency.value)
    if policy == "lowest_cost":
        fitting = [p for p in pools if p.config.context >= needed_context]
        return sorted(fitting, key=lambda p: p.config.cost_per_mtok)
    if policy == "weighted":
        remaining = [p for p in pools if p.config.weight > 0]
        ordered: list[PoolState] = []
        while remaining:
            pick = rng.choices(remaining, weights=[p.config.weight for p in remaining])[0]
            ordered.append(pick)
            remaining.remove(pick)
        return ordered
    raise ValueError(f"unknown policy {policy!r}")
