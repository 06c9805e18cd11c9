"""Killing model replicas under load, to show the router's fallback chain:
primary pool (2 replicas) -> fallback model (1 replica) -> cached answer -> 503.

The platform runs with a topology of its own (inference x2 for the primary
model, `inference-small` x1 for the fallback model) and a catalog that chains
them. A steady open-loop load goes through the edge over gRPC: non-streaming
chats (80% sampled, 20% deterministic from a few prompts, so some are cached)
and streaming chats. Phases: steady; one primary replica killed (-9); all
primary replicas killed; the primaries restarted; everything killed (only the
cache can answer). Prints, per phase: requests, how they were served, what
failed and with which status, p50/p99; and when the primary pool's breaker
opened and closed again.

    .venv/bin/python -m bench.router_chaos [--rate 40] [--backend echo|torch]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import secrets
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import yaml
from pydantic import SecretStr

from bench.common import MODEL, MODEL_DIR, issue_key
from launcher.settings import REPO, LauncherSettings
from launcher.stack import Stack
from mariana.llm.v1 import llm_pb2, llm_pb2_grpc
from mesh.plan import free_port

FALLBACK_MODEL = "smollm2-135m-fallback"
PRIMARY_POOL = "primary"
DETERMINISTIC_PROMPTS = [f"Give me fact number {i} about the sea." for i in range(5)]


def chaos_topology(directory: Path) -> Path:
    raw = yaml.safe_load((REPO / "mesh" / "topology.yaml").read_text())
    raw["services"]["inference"]["replicas"] = 2
    raw["services"]["inference-small"] = {
        **raw["services"]["inference"],
        "program": "inference",
        "replicas": 1,
        "port": 0,
        "mesh_port": 0,
        "settings": {"MODEL_ID": FALLBACK_MODEL},
    }
    path = directory / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def chaos_catalog(directory: Path) -> Path:
    catalog = {
        "pools": {
            PRIMARY_POOL: {"upstream": "inference", "model": MODEL, "max_concurrency": 64},
            "fallback": {"upstream": "inference-small", "model": FALLBACK_MODEL, "max_concurrency": 64},
        },
        "models": {
            MODEL: {"aliases": ["default"], "pools": [PRIMARY_POOL], "fallbacks": ["fallback-model"]},
            "fallback-model": {"pools": ["fallback"]},
        },
        "cache": {"ttl_s": 2, "stale_s": 600},
        "breaker": {"consecutive_failures": 3, "error_rate": 0.5, "window_s": 5, "min_requests": 10, "open_s": 2},
        "retry": {"retries": 1, "base_s": 0.02, "cap_s": 0.2},
    }
    path = directory / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


@dataclass
class Outcome:
    phase: str
    streaming: bool
    route: str
    status: str
    latency_s: float


@dataclass
class Load:
    stub: llm_pb2_grpc.LlmServiceStub
    key: str
    rng: random.Random
    phase: str = "steady"
    outcomes: list[Outcome] = field(default_factory=list)

    def request(self) -> tuple[llm_pb2.CreateChatCompletionRequest, bool]:
        roll = self.rng.random()
        chat = llm_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=16)
        if roll < 0.2:
            chat.temperature = 0
            text = self.rng.choice(DETERMINISTIC_PROMPTS)
        else:
            chat.temperature = 1.0
            text = f"Tell me something new, please ({self.rng.random():.6f})."
        chat.messages.add(role="user").content.string_value = text
        streaming = roll > 0.9
        chat.stream = streaming
        return chat, streaming

    async def one(self) -> None:
        chat, streaming = self.request()
        phase, started = self.phase, time.perf_counter()
        metadata = (("authorization", f"Bearer {self.key}"),)
        route, status = "", "OK"
        try:
            if streaming:
                call = self.stub.StreamChatCompletion(chat, timeout=10, metadata=metadata)
                async for chunk in call:
                    if chunk.HasField("error"):
                        status = "error event"
                route = dict(await call.initial_metadata()).get("x-mariana-route", "")
            else:
                unary = self.stub.CreateChatCompletion(chat, timeout=10, metadata=metadata)
                await unary
                route = dict(await unary.trailing_metadata()).get("x-mariana-route", "")
        except grpc.aio.AioRpcError as error:
            status = error.code().name
        self.outcomes.append(Outcome(phase, streaming, str(route), status, time.perf_counter() - started))

    async def run(self, rate: float, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()
        interval, next_at = 1 / rate, time.perf_counter()
        while not stop.is_set():
            task = asyncio.create_task(self.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await asyncio.gather(*tasks)


def breaker_events(log: Path) -> list[tuple[float, str, str]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if "circuit breaker changed" not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        at = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
        events.append((at, record["pool"], record["state"]))
    return events


def report(outcomes: list[Outcome], phases: list[str]) -> None:
    print("\n| phase | requests | ok | primary | fallback | cache | stale cache | failed (status) | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase in phases:
        mine = [o for o in outcomes if o.phase == phase]
        ok = [o for o in mine if o.status == "OK"]
        routes = collections.Counter(o.route for o in ok)
        failed = collections.Counter(f"{'stream ' if o.streaming else ''}{o.status}" for o in mine if o.status != "OK")
        latencies = sorted(o.latency_s * 1e3 for o in ok) or [float("nan")]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        failures = ", ".join(f"{k} {v}" for k, v in failed.items()) or "0"
        print(
            f"| {phase} | {len(mine)} | {len(ok)} | {routes['primary']} | {routes['fallback']} | {routes['cache']} | "
            f"{routes['stale_cache']} | {failures} | {statistics.median(latencies):.1f} | {p99:.1f} |"
        )


async def chaos(stack: Stack, key: str, rate: float, seconds: dict[str, float]) -> None:
    assert stack.plan is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.plan.edge_port}")
    load = Load(llm_pb2_grpc.LlmServiceStub(channel), key, random.Random(7))
    stop = asyncio.Event()
    runner = asyncio.create_task(load.run(rate, stop))
    marks: dict[str, float] = {}

    async def phase(name: str, action: str = "") -> None:
        load.phase = name
        marks[name] = time.time()
        print(f"{name}: {action or 'load only'} ({seconds[name]:.0f} s)", flush=True)
        await asyncio.sleep(seconds[name])

    primaries = [p for p in stack.processes if p.name.startswith("inference-") and p.name[-1].isdigit()]
    fallback = stack.process("inference-small")
    await phase("steady")
    primaries[0].signal(signal.SIGKILL)
    await phase("one primary killed", f"kill -9 {primaries[0].name}")
    for process in primaries[1:]:
        process.signal(signal.SIGKILL)
    await phase("all primaries killed", "kill -9 every primary replica")
    for process in primaries:
        process.start()
    await phase("primaries restarted", "primary replicas started again")
    for process in [*primaries, fallback]:
        process.signal(signal.SIGKILL)
    await phase("nothing can serve", "kill -9 every replica of both models")
    stop.set()
    await runner
    await channel.close()
    report(load.outcomes, list(seconds))
    events = breaker_events(stack.logs / "router.log")
    killed, restarted = marks["all primaries killed"], marks["primaries restarted"]
    primary = [(at, state) for at, pool, state in events if pool == PRIMARY_POOL]
    opened = [at for at, state in primary if state == "open" and at >= killed]
    closed = [at for at, state in primary if state == "closed" and at >= restarted]
    if opened:
        print(f"\nprimary breaker opened {opened[0] - killed:.2f} s after every primary replica was killed")
    if closed:
        print(f"primary breaker closed {closed[0] - restarted:.2f} s after the primary replicas were started again")
    print("breaker transitions:", ", ".join(f"{pool} {state}" for _, pool, state in events) or "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--backend", default="echo", choices=["echo", "torch", "torch-int8"])
    parser.add_argument("--phase-seconds", type=float, default=8.0)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (logs), instead of a temporary one")
    args = parser.parse_args()
    seconds = {
        "steady": args.phase_seconds,
        "one primary killed": args.phase_seconds,
        "all primaries killed": args.phase_seconds,
        # A restarted replica loads its models, then Envoy's health check and
        # outlier ejection let it back in; the breaker's probe closes it then.
        "primaries restarted": args.phase_seconds * 4,
        "nothing can serve": args.phase_seconds / 2,
    }
    master = "sk-bench-" + secrets.token_urlsafe(12)
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        settings = LauncherSettings(
            data_dir=directory,
            edge_port=free_port(),
            any_ports=True,
            master_key=SecretStr(master),
            model_dir=MODEL_DIR,
            inference_backend=args.backend,
            topology_file=chaos_topology(directory),
            router_catalog=chaos_catalog(directory),
        )
        print(f"starting the platform ({args.backend} backend; primary x2, fallback x1) ...", flush=True)
        with Stack(settings) as stack:
            assert stack.plan is not None
            key = issue_key(f"127.0.0.1:{stack.plan.edge_port}", master)
            asyncio.run(chaos(stack, key, args.rate, seconds))


if __name__ == "__main__":
    main()
