"""The router's domain types and the interfaces of what it calls. Plain
Python: no grpc, no protos."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# Where an answer came from (the public model, the chain's step, the pool), as
# response headers: a stream's initial metadata, a whole answer's trailing
# metadata, which the edge copies into the HTTP response's headers.
ROUTE_HEADERS = ("x-mariana-model", "x-mariana-route", "x-mariana-pool")


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str
    request_id: str
    # Models the caller's key may use; empty means all.
    models: frozenset[str] = frozenset()
    # When the caller stops waiting (time.monotonic()), if it said.
    deadline: float | None = None


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    # (role, text) pairs for chat; None for a plain completion of `prompt`.
    messages: Sequence[tuple[str, str]] | None = None
    prompt: str = ""
    sampling: Sampling = field(default_factory=Sampling)

    def texts(self) -> list[str]:
        if self.messages is None:
            return [self.prompt]
        return [text for _, text in self.messages]


@dataclass(frozen=True)
class Piece:
    """Text generated since the previous piece, and the tokens so far; the
    last piece has the finish reason."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    # Which of the request's n choices this piece belongs to.
    index: int = 0
    # The pieces before this one were from an attempt that failed before it
    # finished (not streamed, so never sent): they are void.
    restarted: bool = False
    # A whole answer in one piece: how long it took after its first token.
    after_first_token_s: float = 0.0


Direction = Literal["input", "output"]


@dataclass(frozen=True)
class ModerationVerdict:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    # What the tenant's policy does: "allow", "flag", "redact" or "block".
    action: str = "allow"
    # The categories (with the kinds found, e.g. "pii (credit_card)") behind the action.
    reasons: tuple[str, ...] = ()
    redacted_text: str = ""


def moderation_reasons(triggered: Iterable[str], findings: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The categories behind an action, each with the kinds found of it
    (`findings`: (category, kind) pairs), e.g. "pii (email, phone)"."""
    kinds: dict[str, set[str]] = {}
    for category, kind in findings:
        kinds.setdefault(category, set()).add(kind)
    return tuple(
        f"{category} ({', '.join(sorted(kinds[category]))})" if category in kinds else category
        for category in triggered
    )


@dataclass(frozen=True)
class ModelEntry:
    id: str
    created: int
    kind: str = "chat"


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    completed_at: float
    # The real cost its reservation settles to (None: nothing was reserved).
    settle_micros: int | None = None
    # The request's span (W3C traceparent), for billing's span to link to.
    traceparent: str = ""


class Inference(Protocol):
    def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        """`stream=False`: the caller wants only the whole answer; the pieces
        may come merged (over gRPC, the whole answer in one piece)."""

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]: ...

    async def models(self) -> list[ModelEntry]: ...


class Moderation(Protocol):
    async def check(
        self,
        texts: Sequence[str],
        request_id: str,
        tenant_id: str = "",
        direction: Direction = "input",
        context: str = "",
        contexts: Sequence[str] = (),
        decision_only: bool = True,
    ) -> list[ModerationVerdict]:
        """`contexts`, when given, is the text before each of `texts` (windows
        of one output). `decision_only`: the verdicts may leave out the
        per-category flags and scores (the request path needs only the action)."""


class UsageSink(Protocol):
    def publish(self, record: UsageRecord) -> None:
        """Must not block the request: delivery happens off the request path."""

    def release(self, request_id: str) -> None:
        """The request generated nothing billable: its reservation goes back whole."""
