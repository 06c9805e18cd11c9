"""gRPC adapter of the Ledger: proto <-> domain, nothing else."""

from __future__ import annotations

import asyncio

import grpc

from mariana.billing.v1 import billing_pb2 as pb
from mariana.billing.v1 import billing_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument
from mariana_common.server import Context, Registrar
from services.billing.invoices import make_invoice, to_csv
from services.billing.ledger import BudgetStatus, Entry, Ledger, UsageLine
from services.billing.reservations import Reservations

SERVICE_NAME = "mariana.billing.v1.BillingService"


def entry_to_proto(e: Entry) -> pb.LedgerEntry:
    return pb.LedgerEntry(
        request_id=e.request_id,
        tenant_id=e.tenant_id,
        key_id=e.key_id,
        model=e.model,
        prompt_tokens=e.prompt_tokens,
        completion_tokens=e.completion_tokens,
        finish_reason=e.finish_reason,
        completed_at=e.completed_at,
        cost_micros=e.cost_micros,
    )


def budget_to_proto(b: BudgetStatus) -> pb.BudgetStatus:
    return pb.BudgetStatus(
        tenant_id=b.tenant_id,
        spent_micros=b.tenant.spent_micros,
        hard_limit_micros=b.tenant.hard_limit_micros,
        soft_limit_micros=b.tenant.soft_limit_micros,
        over_hard_limit=b.over_hard,
        over_soft_limit=b.tenant.over_soft or b.key.over_soft,
        key_id=b.key_id,
        key_spent_micros=b.key.spent_micros,
        key_hard_limit_micros=b.key.hard_limit_micros,
        key_soft_limit_micros=b.key.soft_limit_micros,
        balance_micros=b.balance_micros,
    )


class BillingServicer(pb_grpc.BillingServiceServicer):
    def __init__(self, ledger: Ledger, reservations: Reservations | None = None) -> None:
        self._ledger = ledger
        self._reservations = reservations

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is required")
        entries = await asyncio.to_thread(self._ledger.entries, request.tenant_id, request.request_id)
        return pb.GetUsageResponse(
            entries=[entry_to_proto(e) for e in entries],
            prompt_tokens=sum(e.prompt_tokens for e in entries),
            completion_tokens=sum(e.completion_tokens for e in entries),
            cost_micros=sum(e.cost_micros for e in entries),
        )

    async def SetBudget(self, request: pb.SetBudgetRequest, context: Context) -> pb.SetBudgetResponse:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is required")
        hard, soft = request.hard_limit_micros, request.soft_limit_micros
        if soft and hard and soft > hard:
            raise InvalidArgument("the soft limit must not exceed the hard limit")
        status = await asyncio.to_thread(self._ledger.set_budget, request.tenant_id, hard, soft, request.key_id)
        if self._reservations is not None:  # the routers admit against it from now on
            await self._reservations.set_hard_limit(request.tenant_id, request.key_id, hard)
        return pb.SetBudgetResponse(status=budget_to_proto(status))

    async def GetBudgetStatus(self, request: pb.GetBudgetStatusRequest, context: Context) -> pb.GetBudgetStatusResponse:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is required")
        status = await asyncio.to_thread(self._ledger.budget_status, request.tenant_id, request.key_id)
        return pb.GetBudgetStatusResponse(status=budget_to_proto(status))

    async def AddCredit(self, request: pb.AddCreditRequest, context: Context) -> pb.AddCreditResponse:
        applied = await asyncio.to_thread(
            self._ledger.add_credit,
            request.credit_id,
            request.tenant_id,
            request.amount_micros,
            request.kind or "credit",
            request.note,
            request.key_id,
        )
        status = await asyncio.to_thread(self._ledger.budget_status, request.tenant_id)
        return pb.AddCreditResponse(applied=applied, status=budget_to_proto(status))

    async def GetUsageReport(self, request: pb.GetUsageReportRequest, context: Context) -> pb.GetUsageReportResponse:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is required")
        lines = await asyncio.to_thread(
            self._ledger.usage_report, request.tenant_id, request.start, request.end, request.group_by or "day"
        )
        return pb.GetUsageReportResponse(lines=[line_to_proto(line) for line in lines])

    async def GetInvoice(self, request: pb.GetInvoiceRequest, context: Context) -> pb.GetInvoiceResponse:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is required")
        invoice = await asyncio.to_thread(make_invoice, self._ledger, request.tenant_id, request.start, request.end)
        return pb.GetInvoiceResponse(
            tenant_id=invoice.tenant_id,
            start=invoice.start,
            end=invoice.end,
            lines=[line_to_proto(line) for line in invoice.lines],
            total_micros=invoice.total_micros,
            csv=to_csv(invoice),
        )


def line_to_proto(line: UsageLine) -> pb.UsageLine:
    return pb.UsageLine(
        group=line.group,
        requests=line.requests,
        prompt_tokens=line.prompt_tokens,
        completion_tokens=line.completion_tokens,
        cost_micros=line.cost_micros,
    )


def register(ledger: Ledger, reservations: Reservations | None = None) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_BillingServiceServicer_to_server(BillingServicer(ledger, reservations), server)

    return add
