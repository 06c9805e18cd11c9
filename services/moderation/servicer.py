"""gRPC adapter of the Moderator: proto <-> domain, nothing else."""

from __future__ import annotations

import grpc

from mariana.moderation.v1 import moderation_pb2 as pb
from mariana.moderation.v1 import moderation_pb2_grpc as pb_grpc
from mariana_common.server import Context, Registrar
from services.moderation.moderator import Moderator, Verdict

SERVICE_NAME = "mariana.moderation.v1.ModerationService"


def verdict_to_proto(verdict: Verdict) -> pb.TextVerdict:
    return pb.TextVerdict(
        flagged=verdict.flagged,
        categories=verdict.categories,
        category_scores=verdict.scores,
        findings=[pb.Finding(category=s.category, start=s.start, end=s.end) for s in verdict.findings],
    )


class ModerationServicer(pb_grpc.ModerationServiceServicer):
    def __init__(self, moderator: Moderator) -> None:
        self._moderator = moderator

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        verdicts = self._moderator.check_all(request.texts)
        return pb.CheckResponse(results=[verdict_to_proto(v) for v in verdicts])


def register(moderator: Moderator) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_ModerationServiceServicer_to_server(ModerationServicer(moderator), server)

    return add
