"""Reading billing's ledger the way an operator does: the admin gRPC API
through the edge, with the admin key."""

from __future__ import annotations

import time

import grpc

from mariana.billing.v1 import billing_pb2, billing_pb2_grpc
from tests.e2e.conftest import Platform


def ledger_entries(platform: Platform, tenant_id: str) -> list[billing_pb2.LedgerEntry]:
    with grpc.insecure_channel(platform.edge) as channel:
        reply = billing_pb2_grpc.BillingServiceStub(channel).GetUsage(
            billing_pb2.GetUsageRequest(tenant_id=tenant_id),
            metadata=(("authorization", f"Bearer {platform.master_key}"),),
            timeout=10,
        )
    return list(reply.entries)


def wait_for_ledger(
    platform: Platform, tenant_id: str, request_ids: list[str], timeout_s: float = 20
) -> list[billing_pb2.LedgerEntry]:
    """Usage is applied asynchronously (router -> Redis Stream -> billing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {e.request_id: e for e in ledger_entries(platform, tenant_id) if e.request_id in request_ids}
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return [found[r] for r in request_ids if r in found]
        time.sleep(0.1)
