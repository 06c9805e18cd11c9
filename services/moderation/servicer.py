"""gRPC adapter of the Moderator: proto <-> domain, nothing else."""

from __future__ import annotations

import grpc

from mariana.moderation.v1 import moderation_pb2 as pb
from mariana.moderation.v1 import moderation_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument
from mariana_common.server import Context, Registrar
from services.moderation.metrics import count_verdicts
from services.moderation.moderator import Direction, Moderator, Verdict
from services.moderation.policy import Action

SERVICE_NAME = "mariana.moderation.v1.ModerationService"
MAX_TEXTS = 256

ACTIONS = {
    Action.ALLOW: pb.ACTION_ALLOW,
    Action.FLAG: pb.ACTION_FLAG,
    Action.REDACT: pb.ACTION_REDACT,
    Action.BLOCK: pb.ACTION_BLOCK,
}
DIRECTIONS: dict[int, Direction] = {
    pb.DIRECTION_UNSPECIFIED: "input",
    pb.DIRECTION_INPUT: "input",
    pb.DIRECTION_OUTPUT: "output",
}


def verdict_to_proto(verdict: Verdict, decision_only: bool = False) -> pb.TextVerdict:
    message = pb.TextVerdict(
        flagged=verdict.flagged,
        findings=[pb.Finding(category=s.category, kind=s.kind, start=s.start, end=s.end) for s in verdict.findings],
        action=ACTIONS[verdict.action],
        triggered=verdict.triggered,
    )
    if not decision_only:
        message.categories.update(verdict.categories)
        message.category_scores.update(verdict.scores)
    if not decision_only or verdict.action == Action.REDACT:
        message.redacted_text = verdict.redacted_text
    return message


class ModerationServicer(pb_grpc.ModerationServiceServicer):
    def __init__(self, moderator: Moderator) -> None:
        self._moderator = moderator

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        if len(request.texts) > MAX_TEXTS:
            raise InvalidArgument(f"at most {MAX_TEXTS} texts per call")
        direction = DIRECTIONS.get(request.direction)
        if direction is None:
            raise InvalidArgument(f"unknown direction {request.direction}")
        if request.contexts and len(request.contexts) != len(request.texts):
            raise InvalidArgument(f"contexts has {len(request.contexts)} items for {len(request.texts)} texts")
        texts, tenant = list(request.texts), request.tenant_id
        contexts = list(request.contexts) or [request.context] * len(texts)
        verdicts = await self._moderator.check_batch(texts, tenant, direction, contexts)
        count_verdicts(direction, verdicts)
        return pb.CheckResponse(results=[verdict_to_proto(v, request.decision_only) for v in verdicts])


def register(moderator: Moderator) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_ModerationServiceServicer_to_server(ModerationServicer(moderator), server)

    return add
