"""Choosing the next token of one sequence from its logits: penalties, then
greedy or temperature + top-k + top-p sampling with the sequence's own seeded
generator; optionally the log-probabilities OpenAI's `logprobs` reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # Benchmarks only (never set from a request): generate exactly max_tokens.
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_penalties(logits: torch.Tensor, counts: dict[int, int], params: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    if not counts or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    tokens = torch.tensor(list(counts.keys()))
    times = torch.tensor(list(counts.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[tokens] -= params.presence_penalty + params.frequency_penalty * times
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """`logits` is one row over the vocabulary, penalties already applied."""
    return next_tokens(logits.unsqueeze(0), [params], [generator])[0]


def logprob_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, indices = torch.topk(logprobs, top)
        best = tuple((int(i), float(v)) for i, v in zip(indices, values, strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)


def _filtered(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row of probabilities with top-k and top-p applied (unnormalised)."""
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = probs.masked_fill(probs < kth, 0)
    if 0 < params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[cumulative - sorted_probs > params.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """`next_token` for a batch (penalties already applied): argmax and softmax
    run once over all rows; only the draws are per row, each with its own
    generator, so a seeded sequence samples the same whatever it is batched with."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    sampled = [row for row, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return [int(t) for t in tokens]
    index = torch.tensor(sampled)
    temperatures = torch.tensor([params[row].temperature for row in sampled], dtype=torch.float32).unsqueeze(1)
    probs = torch.softmax(logits[index].float() / temperatures, dim=-1)
    for i, row in enumerate(sampled):
        row_probs = _filtered(probs[i], params[row])
        tokens[row] = int(torch.multinomial(row_probs, 1, generator=generators[row]).item())
    return [int(t) for t in tokens]
