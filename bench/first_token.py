"""Time to first token and tokens/s of chat requests through the edge, with
the official `openai` client, streaming. Starts its own platform (and reports
how long that took) unless --edge names a running one.

    .venv/bin/python -m bench.first_token [--requests 5] [--max-tokens 64]
    .venv/bin/python -m bench.first_token --edge 127.0.0.1:8080 --key <api key>
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import openai
from pydantic import SecretStr

from launcher.settings import REPO, LauncherSettings
from launcher.stack import Stack
from mesh.plan import free_port

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def one_request(client: openai.OpenAI, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first content, tokens/s after it, completion tokens)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    ended = time.perf_counter()
    assert first is not None, "no content arrived"
    return first - started, (tokens - 1) / (ended - first) if ended > first else 0.0, tokens


def run(edge: str, key: str, requests: int, max_tokens: int) -> None:
    client = openai.OpenAI(base_url=f"http://{edge}/v1", api_key=key, max_retries=0)
    one_request(client, 4)  # warm the connection pools
    ttfts, rates = [], []
    for i in range(requests):
        ttft, rate, tokens = one_request(client, max_tokens)
        ttfts.append(ttft)
        rates.append(rate)
        print(f"  request {i + 1}/{requests}: ttft {ttft * 1000:7.1f} ms   {rate:6.1f} tokens/s   ({tokens} tokens)")
    print(
        f"time to first token: p50 {statistics.median(ttfts) * 1000:.1f} ms, max {max(ttfts) * 1000:.1f} ms\n"
        f"decode tokens/s:     p50 {statistics.median(rates):.1f}, min {min(rates):.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge")
    parser.add_argument("--key")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.edge:
        run(args.edge, args.key, args.requests, args.max_tokens)
        return
    master = "sk-bench-" + secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory() as data:
        settings = LauncherSettings(
            data_dir=Path(data),
            edge_port=free_port(),
            any_ports=True,
            master_key=SecretStr(master),
            model_dir=REPO / ".data" / "models" / MODEL,
        )
        print("starting the platform ...", flush=True)
        started = time.perf_counter()
        with Stack(settings) as stack:
            assert stack.plan is not None
            print(f"platform ready in {time.perf_counter() - started:.1f} s (warm start: venv and model present)")
            run(f"127.0.0.1:{stack.plan.edge_port}", master, args.requests, args.max_tokens)


if __name__ == "__main__":
    main()
