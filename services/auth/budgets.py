"""Whether a tenant is over its hard budget, asked of billing (through Envoy's
mesh listener) and remembered for a few seconds per tenant, so the check costs
no call on most requests. If billing cannot answer, requests are admitted:
a billing outage delays budget enforcement, it does not stop traffic."""

from __future__ import annotations

import time
from typing import Protocol

import grpc
import structlog

from mariana.billing.v1 import billing_pb2, billing_pb2_grpc

log = structlog.get_logger()


class Budgets(Protocol):
    async def over_hard_limit(self, tenant_id: str, key_id: str) -> bool: ...


class BillingBudgets:
    def __init__(self, channel: grpc.aio.Channel, ttl_s: float = 2.0, timeout_s: float = 0.3) -> None:
        self._stub = billing_pb2_grpc.BillingServiceStub(channel)
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._known: dict[tuple[str, str], tuple[bool, float]] = {}

    async def over_hard_limit(self, tenant_id: str, key_id: str) -> bool:
        """The tenant's budget, or the key's own."""
        now = time.monotonic()
        known = self._known.get((tenant_id, key_id))
        if known is not None and known[1] > now:
            return known[0]
        try:
            reply = await self._stub.GetBudgetStatus(
                billing_pb2.GetBudgetStatusRequest(tenant_id=tenant_id, key_id=key_id), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            log.warning("budget unknown; admitting", tenant_id=tenant_id, code=error.code().name)
            return False
        over = bool(reply.status.over_hard_limit)
        self._known[(tenant_id, key_id)] = (over, now + self._ttl_s)
        return over
