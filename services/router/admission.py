"""Admission by worst-case cost: before inference, a request reserves what it
could cost at most — its prompt tokens (counted with the model's tokenizer,
plus the chat template's tokens) and `max_tokens` for each choice, priced at
the highest price of any model it may be served by — against the hard budgets
and tokens-per-minute buckets every replica shares (one Redis script). The
reservation is settled to the real usage when the request ends.

Where a refusal is unlikely, the reservation's round trip runs side by side with
the inference call instead of before it: Redis says what the key has left after
each reservation, and while that (less what has been started since) is at least
twice the request's worst case, the request goes to inference at once and its
first piece waits for the reservation. Refused then (other replicas or keys
spent the rest meanwhile), inference is cancelled and nothing was delivered or
billed; the key's next request waits for its reservation again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from redis.exceptions import RedisError
from tokenizers import Tokenizer

from mariana_common.errors import ResourceExhausted, Unavailable
from mariana_common.outage import OutageGate
from services.auth.rate_limit import token_buckets
from services.billing.prices import PriceCatalog
from services.billing.reservations import Headroom, Refusal, Reservations
from services.router.domain import Caller, GenerationRequest
from services.router.metrics import RESERVATIONS, RESERVATIONS_OVERLAPPED

log = structlog.get_logger()

# A chat template wraps each message in role markers and may add a default
# system prompt: SmolLM2's adds at most 6 tokens per message and 32 in all
# (measured with its template; an empty user message is 30 tokens).
TEMPLATE_TOKENS_PER_MESSAGE = 6
TEMPLATE_TOKENS_FIXED = 32


class PromptCounter:
    """An upper bound on a request's prompt tokens: exact content tokens with
    the model's tokenizer, or UTF-8 bytes (a byte-level BPE never makes more
    tokens than bytes) when there is none, plus the template's tokens."""

    def __init__(self, tokenizer_dir: Path | None) -> None:
        path = tokenizer_dir / "tokenizer.json" if tokenizer_dir else None
        self._tokenizer = Tokenizer.from_file(str(path)) if path and path.exists() else None

    def count(self, texts: Sequence[str]) -> int:
        if self._tokenizer is None:
            content = sum(len(t.encode()) for t in texts)
        else:
            content = sum(len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False))
        return content + TEMPLATE_TOKENS_PER_MESSAGE * len(texts) + TEMPLATE_TOKENS_FIXED


@dataclass(frozen=True)
class WorstCase:
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# How long what Redis said a key has left is trusted for overlapping, and how
# many keys are remembered before the stale ones are dropped.
HEADROOM_TTL_S = 5.0
HEADROOM_KEYS = 10_000
# At most this many of a key's reservations under way beside inference at once
# (per router): a burst past the key's limits, while other replicas spend the
# same headroom, starts at most this many inference calls that are then
# cancelled. Steady traffic has a fraction of one under way (a Redis round trip).
OVERLAPPED_PER_KEY = 4


@dataclass
class KnownHeadroom:
    money_micros: int | None
    tokens: int | None
    at: float

    def fits_twice(self, worst: WorstCase) -> bool:
        money_ok = self.money_micros is None or 2 * worst.cost_micros <= self.money_micros
        return money_ok and (self.tokens is None or 2 * worst.tokens <= self.tokens)

    def take(self, worst: WorstCase) -> None:
        if self.money_micros is not None:
            self.money_micros -= worst.cost_micros
        if self.tokens is not None:
            self.tokens -= worst.tokens


class Ticket:
    """A request's reservation: made already, or under way beside inference.
    `confirm` waits for it (raising the refusal); nothing may reach the caller
    before it returns."""

    def __init__(self, outcome: asyncio.Future[bool]) -> None:
        self._outcome = outcome

    @classmethod
    def made(cls, reserved: bool) -> Ticket:
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        outcome.set_result(reserved)
        return cls(outcome)

    async def confirm(self) -> bool:
        # shielded: a caller that goes away must not cancel a reservation Redis
        # may have made already; it is released when it comes back
        return await asyncio.shield(self._outcome)

    @property
    def reserved(self) -> bool:
        """Whether there is a reservation to settle or release."""
        done = self._outcome.done() and not self._outcome.cancelled()
        return done and self._outcome.exception() is None and self._outcome.result()

    def release_if_reserved(self, release: Callable[[], None]) -> None:
        """For a request that ends unbilled: `release` now if reserved, or when
        a reservation still under way is made."""

        def after(outcome: asyncio.Future[bool]) -> None:
            if self.reserved:
                release()

        if self._outcome.done():
            after(self._outcome)
        else:
            self._outcome.add_done_callback(after)


class Admission:
    def __init__(
        self,
        reservations: Reservations,
        prices: PriceCatalog,
        counter: PromptCounter,
        lease_s: float,
        fail_open: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._reservations = reservations
        self._fail_open = fail_open
        self._redis_gate = OutageGate(hold_s=1.0)
        self._prices = prices
        self._counter = counter
        self._lease_s = lease_s
        self._clock = clock
        self._headroom: dict[tuple[str, str], KnownHeadroom] = {}
        self._overlapping: dict[tuple[str, str], int] = {}

    def worst_case(self, request: GenerationRequest, n: int, max_tokens: int, models: Sequence[str]) -> WorstCase:
        prompt = self._counter.count(request.texts())
        completion = n * max_tokens
        now = self._clock()
        # The price in force now, or one that starts before the lease ends.
        prices = [self._prices.price(m, at) for m in models for at in (now, now + self._lease_s)]
        cost = max(p.cost_micros(prompt, completion) for p in prices)
        return WorstCase(prompt, completion, cost)

    def actual_cost(self, model: str, prompt_tokens: int, completion_tokens: int, at: float) -> int:
        """As billing will price it (the same catalog and rounding)."""
        return self._prices.price(model, at).cost_micros(prompt_tokens, completion_tokens)

    async def admit(self, caller: Caller, worst: WorstCase) -> Ticket:
        """The request's reservation: made before this returns, or, when the
        key's known headroom fits the worst case twice, started beside it."""
        if not self._may_overlap(caller, worst):
            return Ticket.made(await self.reserve(caller, worst))
        key = (caller.tenant_id, caller.key_id)
        self._overlapping[key] = self._overlapping.get(key, 0) + 1
        outcome = asyncio.ensure_future(self.reserve(caller, worst))

        def done(outcome: asyncio.Future[bool]) -> None:
            left = self._overlapping.pop(key) - 1
            if left:
                self._overlapping[key] = left
            error = None if outcome.cancelled() else outcome.exception()
            if outcome.cancelled() or error is not None:
                result = "refused" if isinstance(error, ResourceExhausted) else "failed"
            else:
                result = "reserved" if outcome.result() else "unreserved"
            RESERVATIONS_OVERLAPPED.labels(result).inc()

        outcome.add_done_callback(done)
        return Ticket(outcome)

    def _may_overlap(self, caller: Caller, worst: WorstCase) -> bool:
        key = (caller.tenant_id, caller.key_id)
        known = self._headroom.get(key)
        if known is None or time.monotonic() - known.at > HEADROOM_TTL_S or not known.fits_twice(worst):
            return False
        if self._overlapping.get(key, 0) >= OVERLAPPED_PER_KEY:
            return False
        known.take(worst)  # until Redis says again
        return True

    def _remember(self, caller: Caller, outcome: Headroom | None) -> None:
        key = (caller.tenant_id, caller.key_id)
        if outcome is None:
            self._headroom.pop(key, None)
            return
        now = time.monotonic()
        if len(self._headroom) >= HEADROOM_KEYS and key not in self._headroom:
            self._headroom = {k: v for k, v in self._headroom.items() if now - v.at <= HEADROOM_TTL_S}
            if len(self._headroom) >= HEADROOM_KEYS:
                return
        self._headroom[key] = KnownHeadroom(outcome.money_micros, outcome.tokens, now)

    async def reserve(self, caller: Caller, worst: WorstCase) -> bool:
        """True when reserved; False when Redis is away and the router fails
        open (budgets then rest on auth's check against the ledger). Raises
        ResourceExhausted (insufficient_quota or rate_limit_exceeded) when
        refused, Unavailable when Redis is away and it fails closed."""
        lease_ms = int(self._lease_s * 1000)
        if caller.deadline is not None:
            lease_ms = int(max(1.0, caller.deadline - time.monotonic()) * 1000) + 60_000
        try:
            if self._redis_gate.is_down():  # failed a moment ago: do not wait for another timeout
                raise RedisError("redis failed less than a second ago")
            outcome = await self._reservations.admit(
                caller.request_id,
                caller.tenant_id,
                caller.key_id,
                worst.cost_micros,
                worst.tokens,
                lease_ms,
                token_buckets(caller.key_id, caller.tenant_id),
            )
        except (RedisError, OSError) as error:
            self._remember(caller, None)
            if not self._redis_gate.is_down():
                log.error("reservation unavailable", fail_open=self._fail_open, error=str(error))
                self._redis_gate.failed()
            if not self._fail_open:
                raise Unavailable("admission is unavailable; retry shortly", retry_after_s=1) from error
            RESERVATIONS.labels("unreserved").inc()
            return False
        self._redis_gate.succeeded()
        if not isinstance(outcome, Refusal):
            if outcome is not None:  # None: a retry of a request reserved already
                self._remember(caller, outcome)
            RESERVATIONS.labels("reserved").inc()
            return True
        self._remember(caller, None)
        refusal = outcome
        RESERVATIONS.labels("refused_budget" if refusal.reason in ("tenant", "key") else "refused_tokens").inc()
        if refusal.reason in ("tenant", "key"):
            whose = "tenant" if refusal.reason == "tenant" else "key"
            raise ResourceExhausted(
                f"You exceeded your current quota: this request could cost up to {worst.cost_micros} micro-units, "
                f"more than is left of the {whose}'s hard budget.",
                reason="insufficient_quota",
            )
        if refusal.reason == "too_large":
            raise ResourceExhausted(
                f"Request too large: up to {worst.tokens} tokens is more than the tokens-per-minute limit.",
                reason="rate_limit_exceeded",
            )
        raise ResourceExhausted(
            f"Rate limit reached for tokens per minute: this request needs up to {worst.tokens} tokens.",
            retry_after_s=max(1.0, refusal.retry_after_ms / 1000),
            reason="rate_limit_exceeded",
        )
