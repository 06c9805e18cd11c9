"""Moderation quality and cost: precision and recall per category on the
labelled set in tests/moderation/, then latency of one check in-process and
over the real gRPC service with mTLS (what the router pays per call).

    .venv/bin/python -m bench.moderation_eval [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from mariana.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from mariana_common.server import create_server
from mariana_common.settings import ServiceSettings
from mariana_common.tls import channel_credentials
from mesh.pki import mint_mesh
from services.moderation import servicer
from services.moderation.evaluation import evaluate, load_examples
from services.moderation.moderator import Moderator
from services.moderation.policy import load_policy
from services.moderation.toxicity import ToxicityModel

EVAL_SET = Path(__file__).parents[1] / "tests" / "moderation" / "eval_set.jsonl"
PROMPT = "Can you summarise the main causes of the French revolution in three short paragraphs, please?"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms"


def quality(moderator: Moderator) -> None:
    examples = load_examples(EVAL_SET)
    scores, mistakes = evaluate(moderator, examples)
    print(f"labelled set: {len(examples)} examples, {len({e.lang for e in examples})} locales")
    print(f"{'category':18s} {'precision':>9s} {'recall':>7s} {'support':>8s}")
    for category, s in scores.items():
        support = s.true_positives + s.false_negatives
        if support:
            print(f"{category:18s} {s.precision:9.3f} {s.recall:7.3f} {support:8d}")
    print(f"examples with any wrong category: {len(mistakes)}")


def in_process(moderator: Moderator, calls: int) -> None:
    texts = [e.text for e in load_examples(EVAL_SET)]
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        moderator.check(texts[i % len(texts)])
        samples.append(time.perf_counter() - started)
    print(f"in-process check, one text:        {percentiles(samples)}")


async def over_grpc(moderator: Moderator, calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        certs = mint_mesh(Path(tmp), "mariana.local", ["moderation", "router"])
        own = certs["moderation"]
        settings = ServiceSettings(tls_cert=own.cert, tls_key=own.key, tls_ca=own.ca, port=0)
        server = create_server(settings, servicer.register(moderator), [servicer.SERVICE_NAME])
        await server.start()
        client = certs["router"]
        credentials = channel_credentials(client.cert, client.key, client.ca)
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            stub = moderation_pb2_grpc.ModerationServiceStub(channel)
            for batch in (1, 16):
                request = moderation_pb2.CheckRequest(texts=[PROMPT] * batch)
                for _ in range(50):
                    await stub.Check(request)
                samples = []
                for _ in range(calls):
                    started = time.perf_counter()
                    await stub.Check(request)
                    samples.append(time.perf_counter() - started)
                print(f"gRPC Check over mTLS, {batch:2d} text(s): {percentiles(samples)}")
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    policy = load_policy()
    moderator = Moderator(ToxicityModel.load(), lambda: policy)
    quality(moderator)
    in_process(moderator, args.calls)
    asyncio.run(over_grpc(moderator, args.calls))


if __name__ == "__main__":
    main()
