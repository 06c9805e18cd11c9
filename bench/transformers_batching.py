"""transformers' own continuous batching (`generate_batch`, paged attention)
on the work bench.inference_engine does at concurrency 16: 16 chat prompts,
exactly --tokens tokens each. Prints its output tokens/s to compare with the
engine's.

    .venv/bin/python -m bench.transformers_batching [--tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from bench.inference_engine import MODEL_DIR, PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for i in range(args.requests)
    ]
    config = GenerationConfig(
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        do_sample=True,
        temperature=0.8,
        eos_token_id=-1,
        pad_token_id=0,
    )
    for attention in ("paged|sdpa", "paged|eager"):
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation=attention)
        model.eval()
        model.generate_batch(inputs=prompts[:2], generation_config=config)  # warm-up
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        elapsed = time.perf_counter() - started
        tokens = sum(len(o.generated_tokens) for o in outputs.values())
        print(f"generate_batch ({attention}): {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s")


if __name__ == "__main__":
    main()
