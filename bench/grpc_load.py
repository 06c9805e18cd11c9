"""A gRPC load generator, run as its own process so it does not share an event
loop with what it measures. Open loop at a fixed rate (request i is due at
t0 + i/rate and goes out then, whatever is still in flight, so a stalled
server cannot hide its queueing), or closed loop with `--concurrency` callers
(`--rate 0`). A call's latency counts from when it went out, as wrk's do; how
late calls went out against their schedule is reported beside it (timers wake
up to a millisecond late, and a generator starved of CPU falls behind).
With `--warmup S`, the same load runs S seconds first and is not counted:
a platform idle for seconds answers its first requests several times slower
than in steady state. The line `measuring` marks where the counted part
begins. Then one JSON line: sent, ok, errors by status, achieved req/s,
latency percentiles in ms, the 99th percentile of lateness, this process's
CPU seconds over the counted part, and the warm-up's own ok, errors and p99.

    python -m bench.grpc_load --target 127.0.0.1:8080 --call edge-chat --rate 300 --seconds 10 --key sk-...
    python -m bench.grpc_load --target 127.0.0.1:7103 --call direct-complete --tls-dir PKI --rate 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvloop

from mariana.inference.v1 import inference_pb2 as inf
from mariana.inference.v1 import inference_pb2_grpc as inf_grpc
from mariana.llm.v1 import llm_pb2 as llm
from mariana.llm.v1 import llm_pb2_grpc as llm_grpc
from mariana_common.tls import channel_credentials

PROMPT = "Say hello to the benchmark"
MAX_IN_FLIGHT = 1024
# The line that says the warm-up is over and the measured part begins.
MEASURING = "measuring"

Call = Callable[[], Awaitable[object]]


def make_call(kind: str, channel: grpc.aio.Channel, model: str, key: str) -> Call:
    if kind == "direct-generate":
        stub = inf_grpc.InferenceServiceStub(channel)
        request = inf.GenerateRequest(model=model, prompt=PROMPT, sampling=inf.SamplingParams(max_tokens=16))

        async def generate() -> object:
            return [reply async for reply in stub.Generate(request, timeout=10)]

        return generate
    if kind == "direct-complete":
        stub = inf_grpc.InferenceServiceStub(channel)
        request = inf.GenerateRequest(model=model, prompt=PROMPT, sampling=inf.SamplingParams(max_tokens=16))

        async def complete() -> object:
            return await stub.Complete(request, timeout=10)

        return complete
    llm_stub = llm_grpc.LlmServiceStub(channel)
    metadata = (("authorization", f"Bearer {key}"),)
    chat = llm.CreateChatCompletionRequest(model=model, max_tokens=16)
    chat.messages.add(role="user").content.string_value = PROMPT
    if kind == "edge-chat":

        async def unary() -> object:
            return await llm_stub.CreateChatCompletion(chat, timeout=10, metadata=metadata)

        return unary
    if kind == "edge-chat-stream":
        streamed = llm.CreateChatCompletionRequest()
        streamed.CopyFrom(chat)
        streamed.stream = True

        async def stream() -> object:
            return [c async for c in llm_stub.StreamChatCompletion(streamed, timeout=10, metadata=metadata)]

        return stream
    raise SystemExit(f"unknown call {kind!r}")


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e3


async def run(args: argparse.Namespace) -> dict[str, object]:
    if args.tls_dir:
        pki = Path(args.tls_dir)
        credentials = channel_credentials(pki / "operator.pem", pki / "operator.key", pki / "ca.pem")
        channel = grpc.aio.secure_channel(args.target, credentials)
    else:
        channel = grpc.aio.insecure_channel(args.target)
    call = make_call(args.call, channel, args.model, args.key)
    for _ in range(20):  # connection set up, not measured
        await call()
    warm_up, measured = Tally(), Tally()
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
    started = time.perf_counter()
    measuring_from = started + args.warmup
    end = measuring_from + args.seconds

    async def one(due: float) -> None:
        tally = measured if due >= measuring_from else warm_up
        sent_at = time.perf_counter()
        tally.lateness.append(sent_at - due)
        try:
            await call()
            tally.latencies.append(time.perf_counter() - sent_at)
        except grpc.aio.AioRpcError as error:
            tally.errors[error.code().name] += 1
        finally:
            in_flight.release()

    marker = asyncio.create_task(mark_measuring(measuring_from))
    sent = 0
    tasks: set[asyncio.Task[None]] = set()
    if args.rate > 0:
        interval = 1.0 / args.rate
        while True:
            due = started + sent * interval
            if due >= end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await in_flight.acquire()
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
    else:

        async def caller() -> None:
            while time.perf_counter() < end:
                await in_flight.acquire()
                await one(time.perf_counter())

        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    await asyncio.gather(*tasks)
    cpu_from = await marker
    elapsed = time.perf_counter() - measuring_from
    await channel.close()
    ordered = sorted(measured.latencies)
    result: dict[str, object] = {
        "sent": len(measured.lateness),
        "ok": len(ordered),
        "errors": dict(measured.errors),
        "rps": len(ordered) / elapsed,
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "late_p99": percentile(sorted(measured.lateness), 0.99),
        "cpu_s": cpu_seconds() - cpu_from,
    }
    if args.warmup > 0:
        result["warmup"] = warm_up.summary()
    return result


@dataclass
class Tally:
    """What the calls of one part of a run (warm-up or measured) came to."""

    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def summary(self) -> dict[str, object]:
        return {"ok": len(self.latencies), "errors": dict(self.errors), "p99": percentile(sorted(self.latencies), 0.99)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def mark_measuring(at: float) -> float:
    """Says on stdout when the measured part begins (the caller samples the
    platform's CPU then) and returns this process's CPU seconds at that moment."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    print(MEASURING, flush=True)
    return cpu_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument(
        "--call", choices=["direct-generate", "direct-complete", "edge-chat", "edge-chat-stream"], required=True
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--key", default="")
    parser.add_argument("--tls-dir", default="", help="PKI folder with operator.pem/.key and ca.pem (direct calls).")
    parser.add_argument("--rate", type=float, default=0, help="req/s; 0 = closed loop at --concurrency")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--warmup", type=float, default=0, help="seconds of the same load first, not counted (reported apart)"
    )
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
