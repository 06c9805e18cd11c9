"""Iteration-level (continuous) batching on one worker thread.

Every iteration does at most one prefill chunk for a sequence that is joining,
then one decode step for every running sequence together. A sequence joins the
running batch as soon as its prompt is prefilled (its first token comes from
the prefill) and leaves the moment it finishes or its caller goes away, so
slots and KV memory are reused at the next step. Long prompts are prefilled in
chunks, so one long prompt delays each decode step by one chunk, not by the
whole prompt. Admission is bounded: a waiting queue and a KV budget in tokens
(prompt + max_tokens of everything admitted)."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from mariana_common.errors import ResourceExhausted, Unavailable
from services.inference.detokenizer import IncrementalDetokenizer
from services.inference.kv_cache import keep_rows, new_cache, stack
from services.inference.sampling import (
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    logprob_of,
    next_token,
    next_tokens,
)
from services.inference.text_stops import scan_for_stops

log = structlog.get_logger()


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32
    max_waiting: int = 128
    kv_budget_tokens: int = 65_536
    prefill_chunk: int = 512
    # When work arrives at an idle engine, wait this long for more of the burst,
    # so requests sent together are prefilled together.
    coalesce_s: float = 0.005


@dataclass(frozen=True)
class Event:
    """Text since the previous event and the tokens so far; the last event has
    the finish reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Event | BaseException], None]
    tokenizer: Any
    generator: torch.Generator = field(init=False)
    detok: IncrementalDetokenizer = field(init=False)
    counts: dict[int, int] = field(default_factory=dict)
    generated: int = 0
    text: str = ""
    sent: int = 0
    prefilled: int = 0
    cache: Any = None
    cancelled: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.detok = IncrementalDetokenizer(self.tokenizer)

    @property
    def kv_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass(frozen=True)
class Stats:
    running: int
    prefilling: int
    waiting: int
    kv_tokens_reserved: int
    free_slots: int


class Scheduler:
    def __init__(self, model: Any, tokenizer: Any, eos_ids: frozenset[int], num_layers: int, limits: Limits) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos = eos_ids
        self._num_layers = num_layers
        self.limits = limits
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._reserved = 0
        self._accepting = True
        self._stopping = False
        # The running batch: its cache, attention mask [B, T], next positions and last tokens.
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    # -- called from the event loop ------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if not self._accepting:
                raise Unavailable("this replica is draining; retry on another")
            if len(self._waiting) >= self.limits.max_waiting:
                raise ResourceExhausted("the request queue is full; retry shortly", retry_after_s=1)
            if self._reserved + seq.kv_tokens > self.limits.kv_budget_tokens:
                raise ResourceExhausted(
                    f"the KV cache budget ({self.limits.kv_budget_tokens} tokens) is taken; retry shortly",
                    retry_after_s=2,
                )
            self._reserved += seq.kv_tokens
            self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        with self._cv:
            seq.cancelled = True
            self._cv.notify()

    def stats(self) -> Stats:
        with self._cv:
            busy = len(self._running) + len(self._prefilling)
            return Stats(
                len(self._running),
                len(self._prefilling),
                len(self._waiting),
                self._reserved,
                self.limits.max_batch - busy,
            )

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def idle(self) -> bool:
        with self._cv:
            return not (self._waiting or self._prefilling or self._running)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- the worker thread ---------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                idle = not (self._prefilling or self._running)
                while not (self._stopping or self._waiting or self._prefilling or self._running):
                    self._cv.wait()
            if idle and self.limits.coalesce_s:
                time.sleep(self.limits.coalesce_s)
            with self._cv:
                if self._stopping:
                    for seq in [*self._waiting, *self._prefilling, *self._running]:
                        seq.deliver(Unavailable("the inference service is shutting down"))
                    return
                self._drop_cancelled()
                while self._waiting and len(self._running) + len(self._prefilling) < self.limits.max_batch:
                    self._prefilling.append(self._waiting.popleft())
            try:
                with torch.inference_mode():
                    # Prefill joining sequences up to a token budget, then decode
                    # every running sequence once.
                    if self._prefilling:
                        self._prefill()
                    if self._running:
                        self._decode_step()
            except Exception as error:
                log.exception("model step failed; failing the sequences in it")
                with self._cv:
                    for seq in [*self._prefilling, *self._running]:
                        self._release(seq)
                        seq.deliver(Unavailable(f"model step failed: {error}"))
                    self._prefilling.clear()
                    self._running.clear()
                    self._cache = self._mask = self._positions = self._last = None

    def _release(self, seq: Sequence) -> None:
        if not seq.done:
            seq.done = True
            self._reserved -= seq.kv_tokens

    def _drop_cancelled(self) -> None:
        """Under the lock: forget sequences whose callers went away."""
        for queue in (self._waiting, self._prefilling):
            for seq in [s for s in queue if s.cancelled]:
                queue.remove(seq)
                self._release(seq)
        gone = [i for i, seq in enumerate(self._running) if seq.cancelled]
        if gone:
            for i in gone:
                self._release(self._running[i])
            self._retire(set(gone))

    def _prefill(self) -> None:
        """Short prompts that fit the budget together are prefilled in one
        left-padded forward pass; a long one is prefilled alone, a chunk per
        iteration."""
        budget = self.limits.prefill_chunk
        group: list[Sequence] = []
        for seq in self._prefilling:
            width = max([len(s.prompt_ids) for s in group] + [len(seq.prompt_ids)])
            if seq.prefilled or width * (len(group) + 1) > budget:
                break
            group.append(seq)
        if group:
            self._prefill_group(group)
        else:
            self._prefill_chunk(self._prefilling[0], budget)

    def _prefill_group(self, group: list[Sequence]) -> None:
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        cache = new_cache(self._num_layers)
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        with self._cv:
            for seq in group:
                self._prefilling.remove(seq)
        joining, tokens = [], []
        for row, seq in enumerate(group):
            seq.prefilled = len(seq.prompt_ids)
            token = self._choose(seq, out.logits[row, -1])
            if not self._accept(seq, token, out.logits[row, -1]):
                joining.append(row)
                tokens.append(token)
        if not joining:
            return
        if len(joining) < len(group):
            keep_rows(cache, torch.tensor(joining), 0)
            mask = mask[joining]
        self._join([group[row] for row in joining], cache, mask, tokens)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Prefills up to `budget` prompt tokens of `seq`; returns how many."""
        start = seq.prefilled
        chunk = seq.prompt_ids[start : start + budget]
        if seq.cache is None:
            seq.cache = new_cache(self._num_layers)
        out = self._model(
            input_ids=torch.tensor([chunk]),
            position_ids=torch.arange(start, start + len(chunk)).unsqueeze(0),
            past_key_values=seq.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        seq.prefilled += len(chunk)
        if seq.prefilled < len(seq.prompt_ids):
            return len(chunk)
        with self._cv:
            self._prefilling.remove(seq)
        token = self._choose(seq, out.logits[0, -1])
        if not self._accept(seq, token, out.logits[0, -1]):
            self._join([seq], seq.cache, torch.ones((1, len(seq.prompt_ids)), dtype=torch.long), [token])
        seq.cache = None
        return len(chunk)

    def _join(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor, tokens: list[int]) -> None:
        """Adds prefilled sequences (their cache rows, left-padded per `mask`) to the batch."""
        positions = torch.tensor([len(s.prompt_ids) for s in seqs])
        if self._cache is None or self._mask is None or self._positions is None or self._last is None:
            self._cache, self._mask, self._positions, self._last = cache, mask, positions, torch.tensor(tokens)
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            stack(self._cache, cache)
            pad = torch.nn.functional.pad
            self._mask = torch.cat(
                [pad(self._mask, (width - self._mask.shape[1], 0)), pad(mask, (width - mask.shape[1], 0))]
            )
            self._positions = torch.cat([self._positions, positions])
            self._last = torch.cat([self._last, torch.tensor(tokens)])
        with self._cv:
            self._running.extend(seqs)

    def _decode_step(self) -> None:
        assert self._mask is not None and self._positions is not None and self._last is not None
        self._mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)
        out = self._model(
            input_ids=self._last.unsqueeze(1),
            attention_mask=self._mask,
            position_ids=self._positions.unsqueeze(1),
            past_key_values=self._cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
        self._positions = self._positions + 1
        running = self._running
        penalised = logits
        for row, seq in enumerate(running):
            if seq.params.presence_penalty or seq.params.frequency_penalty:
                penalised = penalised.clone() if penalised is logits else penalised
                penalised[row] = apply_penalties(logits[row], seq.counts, seq.params)
        tokens = next_tokens(penalised, [s.params for s in running], [s.generator for s in running])
        finished = set()
        for row, (seq, token) in enumerate(zip(running, tokens, strict=True)):
            self._last[row] = token
            if self._accept(seq, token, logits[row]):
                finished.add(row)
        if finished:
            with self._cv:
                self._retire(finished)

    def _retire(self, rows: set[int]) -> None:
        """Under the lock: drops rows from the batch and the padding no row needs."""
        assert self._mask is not None and self._positions is not None and self._last is not None
        keep = [i for i in range(len(self._running)) if i not in rows]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._positions = self._last = None
            return
        index = torch.tensor(keep)
        mask = self._mask[index]
        used = (mask.sum(dim=0) > 0).nonzero()
        drop_left = int(used[0]) if len(used) else 0
        keep_rows(self._cache, index, drop_left)
        self._mask = mask[:, drop_left:]
        self._positions = self._positions[index]
        self._last = self._last[index]

    # -- one sequence's token ------------------------------------------------

    def _choose(self, seq: Sequence, logits: torch.Tensor) -> int:
        return next_token(apply_penalties(logits, seq.counts, seq.params), seq.params, seq.generator)

    def _accept(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Records the token and tells the caller; True when the sequence is finished."""
        params = seq.params
        logprobs = (logprob_of(logits, token, params.top_logprobs),) if params.logprobs else ()
        if token in self._eos and not params.ignore_eos:  # not part of the text, nor of logprobs
            return self._finish(seq, "stop", seq.detok.flush(), ())
        seq.generated += 1
        seq.counts[token] = seq.counts.get(token, 0) + 1
        seq.text += seq.detok.add(token)
        scan = scan_for_stops(seq.text, params.stop)
        if scan.stopped:
            return self._finish(seq, "stop", seq.text[seq.sent : scan.safe_end], logprobs, final_text=True)
        if seq.generated >= params.max_tokens:
            seq.text += seq.detok.flush()
            return self._finish(seq, "length", seq.text[seq.sent :], logprobs, final_text=True)
        if scan.safe_end > seq.sent or logprobs:
            piece = seq.text[seq.sent : scan.safe_end]
            seq.sent = scan.safe_end
            seq.deliver(Event(piece, len(seq.prompt_ids), seq.generated, None, logprobs))
        return False

    def _finish(
        self, seq: Sequence, reason: str, text: str, logprobs: tuple[TokenLogprob, ...], final_text: bool = False
    ) -> bool:
        if not final_text:  # `text` is what the detokenizer still held: add what stop scanning held
            text = (seq.text + text)[seq.sent :]
        seq.deliver(Event(text, len(seq.prompt_ids), seq.generated, reason, logprobs))
        with self._cv:
            self._release(seq)
        return True


def deliverer(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Event | BaseException]
) -> Callable[[Event | BaseException], None]:
    """Hands events from the worker thread to a caller on the event loop."""

    def deliver(item: Event | BaseException) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    return deliver
