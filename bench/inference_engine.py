"""The inference engine against sequential `model.generate` on the same model:
output tokens/s and time to first token (p50/p99) at several concurrencies,
and peak RSS. Each level sends one wave of `concurrency` chat requests at
once; every request generates exactly --tokens tokens (EOS ignored on both
sides), so the two are compared on equal work.

    .venv/bin/python -m bench.inference_engine [--backend torch] [--tokens 32] [--levels 1,4,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import threading
import time
from dataclasses import replace
from typing import Any

import torch

from bench.common import MODEL_DIR
from services.inference.engine import Engine, GenerationInput, Sampling
from services.inference.loader import load_model
from services.inference.scheduler import Limits

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "Describe a walk through a busy market.",
    "What are the benefits of learning a second language?",
    "Give me advice for a first marathon.",
    "Summarise the plot of a heist movie you invent.",
    "Describe the water cycle to a child.",
    "Write a letter to a future self.",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def engine_level(engine: Engine, concurrency: int, tokens: int) -> tuple[float, list[float]]:
    async def one(i: int) -> tuple[float, int]:
        sampling = Sampling(max_tokens=tokens, temperature=0.8, seed=i)
        request = GenerationInput(engine.model_id, messages=[("user", PROMPTS[i % len(PROMPTS)])], sampling=sampling)
        started, first, count = time.perf_counter(), None, 0
        async for event in engine.generate(request):
            if first is None:
                first = time.perf_counter() - started
            count = event.completion_tokens
        assert first is not None
        return first, count

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    return sum(c for _, c in results) / wall, [f for f, _ in results]


class FirstToken:
    """A generate() streamer that notes when the first new token appears."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.at is None:  # the first call carries the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def baseline_level(model: Any, tokenizer: Any, concurrency: int, tokens: int) -> tuple[float, list[float]]:
    """All requests arrive at once; one `generate` at a time, first come first served."""
    started = time.perf_counter()
    ttfts, generated = [], 0
    lock = threading.Lock()
    for i in range(concurrency):
        chat = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        streamer = FirstToken()
        torch.manual_seed(i)
        with lock, torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=0.8, streamer=streamer
            )
        generated += out.shape[1] - ids["input_ids"].shape[1]
        assert streamer.at is not None
        ttfts.append(streamer.at - started)
    return generated / (time.perf_counter() - started), ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch", choices=["torch", "deepspeed", "torch-int8"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--max-batch", type=int, default=64)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    print(f"loading {MODEL_DIR.name} ({args.backend}) ...", flush=True)
    loaded = load_model(MODEL_DIR, args.backend)
    engine = Engine("bench", loaded, args.tokens, Limits(max_batch=args.max_batch, max_waiting=1024))
    # Benchmark-only: make every request generate exactly --tokens tokens.
    original = engine._params

    def exact(request: GenerationInput, prompt_tokens: int) -> Any:
        return replace(original(request, prompt_tokens), ignore_eos=True)

    engine._params = exact  # type: ignore[method-assign]
    asyncio.run(engine_level(engine, 2, 4))  # warm-up

    print(
        f"{'conc':>4} | {'engine tok/s':>12} {'TTFT p50':>9} {'p99':>7} | {'generate tok/s':>14} {'TTFT p50':>9} "
        f"{'p99':>7} | {'ratio':>5}"
    )
    for concurrency in levels:
        rate, ttft = asyncio.run(engine_level(engine, concurrency, args.tokens))
        base_rate, base_ttft = baseline_level(loaded.model, loaded.tokenizer, concurrency, args.tokens)
        print(
            f"{concurrency:4d} | {rate:12.1f} {statistics.median(ttft):8.2f}s {pct(ttft, 0.99):6.2f}s | "
            f"{base_rate:14.1f} {statistics.median(base_ttft):8.2f}s {pct(base_ttft, 0.99):6.2f}s | "
            f"{rate / base_rate:5.1f}x",
            flush=True,
        )
    engine.close()
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
