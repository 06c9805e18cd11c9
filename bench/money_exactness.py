"""Money and limits under concurrency, cancellation and failure. Prints one
table; every figure is counted from the ledger (billing's admin API) and from
what the clients saw, never estimated.

1. Budget race: a hard budget B, 2 router and 2 auth replicas, 200 concurrent
   requests each able to cost about B/20: admitted, refused, spend, overshoot.
2. Token limit across replicas: a tokens-per-minute limit L, a burst spread
   over both routers: worst-case tokens admitted in the window against L.
3. Cancel storm (the real model, torch backend): 100 streams through the edge
   with the openai SDK, each closed at a random point: ledger rows, billed
   completion tokens against what inference says it sent, free batch slots.
4. An inference replica killed mid-stream under load: hung clients, ledger
   rows that differ from what the clients received.
5. Billing killed for 30 s, then Redis stopped for 10 s, under load: usage
   published (answered requests), applied, lost, doubled.

Scenarios 1, 2, 4 and 5 use the echo backend, paced (one token per chunk, a
chunk every 20 ms), so streams last long enough to be cut.

    .venv/bin/python -m bench.money_exactness [--skip-cancel-storm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import yaml
from pydantic import SecretStr

from bench.common import MODEL, MODEL_DIR
from launcher.settings import REPO, LauncherSettings
from launcher.stack import OPERATOR, Stack
from launcher.top import scrape, total
from mariana.auth.v1 import auth_pb2, auth_pb2_grpc
from mariana.billing.v1 import billing_pb2, billing_pb2_grpc
from mariana.inference.v1 import inference_pb2, inference_pb2_grpc
from mariana.llm.v1 import llm_pb2, llm_pb2_grpc
from mariana_common.tls import channel_credentials
from mesh.plan import free_port

ECHO_TOKENS = 64


@dataclass
class Table:
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, scenario: str, figure: str, value: object) -> None:
        self.rows.append((scenario, figure, str(value)))
        print(f"  {figure}: {value}", flush=True)

    def print(self) -> None:
        print("\n| scenario | figure | value |\n|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def topology(directory: Path, replicas: int, paced_echo: bool) -> Path:
    raw = yaml.safe_load((REPO / "mesh" / "topology.yaml").read_text())
    for name in ("router", "auth", "inference"):
        raw["services"][name]["replicas"] = replicas
    if paced_echo:
        raw["services"]["inference"]["settings"] = {
            "ECHO_COMPLETION_TOKENS": str(ECHO_TOKENS),
            "ECHO_CHUNK_TOKENS": "1",
            "ECHO_CHUNK_INTERVAL_S": "0.02",
        }
    path = directory / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Platform:
    def __init__(self, stack: Stack, master: str) -> None:
        assert stack.plan is not None
        self.stack = stack
        self.edge = f"127.0.0.1:{stack.plan.edge_port}"
        self.admin = (("authorization", f"Bearer {master}"),)
        self.last_error = ""

    def key(self, tenant: str, tpm: int = 0) -> tuple[str, str]:
        with grpc.insecure_channel(self.edge) as channel:
            reply = auth_pb2_grpc.AuthAdminServiceStub(channel).CreateKey(
                auth_pb2.CreateKeyRequest(tenant=tenant, rpm=1_000_000, tpm=tpm), metadata=self.admin, timeout=10
            )
        return str(reply.secret), str(reply.tenant_id)

    def cancelled_by_refusal(self) -> float:
        """Inference calls the routers started beside a reservation that was
        then refused (and so cancelled), so far."""
        routers = {label: url for label, (name, url) in self.stack.metrics.items() if name == "router"}
        return total(scrape(routers), "mariana_router_reservations_overlapped_total", result="refused")

    def billing(self, channel: grpc.Channel) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(channel)

    def set_budget(self, tenant_id: str, hard: int) -> None:
        with grpc.insecure_channel(self.edge) as channel:
            request = billing_pb2.SetBudgetRequest(tenant_id=tenant_id, hard_limit_micros=hard)
            self.billing(channel).SetBudget(request, metadata=self.admin, timeout=10)

    def ledger(self, tenant_id: str) -> list[billing_pb2.LedgerEntry]:
        with grpc.insecure_channel(self.edge) as channel:
            request = billing_pb2.GetUsageRequest(tenant_id=tenant_id)
            return list(self.billing(channel).GetUsage(request, metadata=self.admin, timeout=30).entries)

    def wait_for_ledger(self, tenant_id: str, ids: set[str], timeout_s: float = 90) -> list[billing_pb2.LedgerEntry]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                entries = self.ledger(tenant_id)
            except grpc.RpcError as error:
                self.last_error = f"GetUsage: {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
                entries = []
            if ids <= {e.request_id for e in entries} or time.monotonic() > deadline:
                return entries
            time.sleep(0.5)


def chat(text: str, max_tokens: int, stream: bool = False) -> llm_pb2.CreateChatCompletionRequest:
    request = llm_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=max_tokens, stream=stream)
    request.messages.add(role="user").content.string_value = text
    return request


async def unary_burst(edge: str, key: str, count: int, max_tokens: int) -> tuple[list[str], Counter[str]]:
    """`count` concurrent chats; the request ids answered and the refusals by code."""
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)

        async def one(i: int) -> str:
            try:
                reply = await stub.CreateChatCompletion(chat(f"Say hi {i}.", max_tokens), metadata=metadata, timeout=60)
                return str(reply.id).removeprefix("chatcmpl-")
            except grpc.aio.AioRpcError as error:
                return "!" + error.code().name

        results = await asyncio.gather(*(one(i) for i in range(count)))
    return [r for r in results if not r.startswith("!")], Counter(r[1:] for r in results if r.startswith("!"))


def budget_race(platform: Platform, table: Table) -> None:
    print("1. budget race", flush=True)
    key, tenant = platform.key("race")
    # The worst case of one request (prompt bound ~42 tokens + 32 output) is ~10 micro-units.
    budget = 20 * 10
    platform.set_budget(tenant, budget)
    time.sleep(0.5)
    cancelled = platform.cancelled_by_refusal()
    ids, refused = asyncio.run(unary_burst(platform.edge, key, 200, max_tokens=32))
    entries = platform.wait_for_ledger(tenant, set(ids))
    spend = sum(e.cost_micros for e in entries)
    table.add("1 budget race", "hard budget B (micro-units)", budget)
    table.add("1 budget race", "admitted / refused", f"{len(ids)} / {sum(refused.values())} ({dict(refused)})")
    table.add("1 budget race", CANCELLED_BY_REFUSAL, cancelled_since(platform, cancelled))
    table.add("1 budget race", "final spend (ledger)", spend)
    table.add("1 budget race", "overshoot (target 0)", max(0, spend - budget))


def token_limit(platform: Platform, table: Table) -> None:
    print("2. token limit across replicas", flush=True)
    limit = 3000
    key, tenant = platform.key("tpm", tpm=limit)
    started = time.monotonic()
    cancelled = platform.cancelled_by_refusal()
    ids, refused = asyncio.run(unary_burst(platform.edge, key, 120, max_tokens=32))
    window_s = time.monotonic() - started
    entries = platform.wait_for_ledger(tenant, set(ids))
    used = sum(e.prompt_tokens + e.completion_tokens for e in entries)
    worst = len(ids) * (42 + 32)  # each admitted request reserved its worst case
    refill = limit * window_s / 60
    table.add("2 token limit", "limit L (tokens/min)", limit)
    table.add("2 token limit", "admitted / refused", f"{len(ids)} / {sum(refused.values())}")
    table.add("2 token limit", "worst-case tokens admitted (~)", worst)
    table.add("2 token limit", f"L + refill during the {window_s:.1f} s burst", f"{limit + refill:.0f}")
    table.add("2 token limit", "tokens really used (ledger)", used)
    table.add("2 token limit", CANCELLED_BY_REFUSAL, cancelled_since(platform, cancelled))


CANCELLED_BY_REFUSAL = "inference calls started beside a reservation, then cancelled by its refusal"


def cancelled_since(platform: Platform, before: float) -> int:
    return int(platform.cancelled_by_refusal() - before)


async def streams_with_kill(platform: Platform, key: str, kill: Stack) -> dict[str, object]:
    """60 streams started over 1.5 s; inference-0 is killed 1 s in."""
    results: list[tuple[str, str, int]] = []  # (request id, outcome, tokens received)
    async with grpc.aio.insecure_channel(platform.edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.025)
            request_id, outcome, tokens = "", "complete", 0
            try:
                call = stub.StreamChatCompletion(chat(f"Stream {i}.", ECHO_TOKENS, True), metadata=metadata, timeout=15)
                async for chunk in call:
                    request_id = str(chunk.id).removeprefix("chatcmpl-")
                    if chunk.HasField("error"):
                        outcome = "error event"
                    # Moderation releases text in windows, so chunks are not
                    # tokens; the echo backend's tokens are words.
                    tokens += sum(c.delta.content.count("echo") for c in chunk.choices)
            except grpc.aio.AioRpcError as error:
                outcome = "hung" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else error.code().name
            results.append((request_id, outcome, tokens))

        async def killer() -> None:
            await asyncio.sleep(1.0)
            kill.process("inference-0").signal(signal.SIGKILL)

        await asyncio.gather(killer(), *(one(i) for i in range(60)))
    return {"results": results}


def replica_killed(platform: Platform, table: Table) -> None:
    print("4. replica killed mid-stream", flush=True)
    key, tenant = platform.key("killed")
    results: list[tuple[str, str, int]] = asyncio.run(streams_with_kill(platform, key, platform.stack))["results"]  # type: ignore[assignment]
    platform.stack.process("inference-0").start()
    outcomes = Counter(outcome for _, outcome, _ in results)
    received = {rid: tokens for rid, _, tokens in results if rid}
    entries = {e.request_id: e for e in platform.wait_for_ledger(tenant, {r for r, t in received.items() if t})}
    differences = [rid for rid, tokens in received.items() if tokens and entries.get(rid) is None]
    differences += [rid for rid, e in entries.items() if e.completion_tokens != received.get(rid, 0)]
    table.add("4 replica killed", "streams: outcomes", dict(outcomes))
    table.add("4 replica killed", "hung clients (target 0)", outcomes.get("hung", 0))
    table.add("4 replica killed", "ledger rows that differ from what clients got (target 0)", len(differences))


def phase_at(seconds: float) -> str:
    for end, name in ((2, "before"), (32, "billing down"), (38, "billing back"), (48, "redis stopped")):
        if seconds < end:
            return name
    return "after"


async def steady_load(edge: str, key: str, rate: float, seconds: float) -> tuple[list[tuple[str, int]], Counter[str]]:
    answered: list[tuple[str, int]] = []
    failed: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)

        started = time.monotonic()

        async def one(i: int) -> None:
            at = time.monotonic() - started
            try:
                reply = await stub.CreateChatCompletion(chat(f"Outage {i}.", 8), metadata=metadata, timeout=30)
                answered.append((str(reply.id).removeprefix("chatcmpl-"), reply.usage.completion_tokens))
            except grpc.aio.AioRpcError as error:
                failed[f"{error.code().name} ({phase_at(at)})"] += 1

        tasks = []
        for i in range(int(rate * seconds)):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return answered, failed


def outages(platform: Platform, table: Table) -> None:
    print("5. billing killed for 30 s, then Redis stopped for 10 s, under load", flush=True)
    key, tenant = platform.key("outages")
    stack = platform.stack

    async def run() -> tuple[list[tuple[str, int]], Counter[str]]:
        async def chaos() -> None:
            await asyncio.sleep(2)
            stack.process("billing").signal(signal.SIGKILL)
            await asyncio.sleep(30)
            stack.process("billing").start()
            await asyncio.sleep(6)
            stack.process("redis").signal(signal.SIGSTOP)
            await asyncio.sleep(10)
            stack.process("redis").signal(signal.SIGCONT)

        load = asyncio.create_task(steady_load(platform.edge, key, 10, 55))
        await chaos()
        return await load

    answered, failed = asyncio.run(run())
    entries = platform.wait_for_ledger(tenant, {rid for rid, _ in answered}, timeout_s=120)
    applied = {e.request_id: e for e in entries}
    lost = [rid for rid, _ in answered if rid not in applied]
    wrong = [rid for rid, tokens in answered if rid in applied and applied[rid].completion_tokens != tokens]
    doubled = len(entries) - len(applied)
    table.add("5 outages", "requests answered (usage published)", len(answered))
    table.add("5 outages", "requests refused or failed", dict(failed) or 0)
    table.add("5 outages", "applied to the ledger", len(applied))
    table.add("5 outages", "lost (target 0)", len(lost))
    if lost:  # say why, from what the platform itself reports
        billing = stack.process("billing")
        print(f"  billing exited: {billing.exited()}; last ledger query error: {platform.last_error}")
        print("  billing log tail:\n" + billing.log_tail(15))
    table.add("5 outages", "doubled (target 0)", doubled)
    table.add("5 outages", "applied with other token counts (target 0)", len(wrong))
    depths = [
        json.loads(line).get("depth", 0)
        for log in stack.logs.glob("router*.log")
        for line in log.read_text(errors="replace").splitlines()
        if "usage spooled to disk" in line
    ]
    table.add("5 outages", "router usage spool depth at most", max(depths, default=0))


async def cancel_streams(edge: str, key: str, rng: random.Random) -> list[tuple[str, int]]:
    client = openai.AsyncOpenAI(base_url=f"http://{edge}/v1", api_key=key, max_retries=0, timeout=120)
    seen: list[tuple[str, int]] = []
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            stop_after = rng.randint(1, 8)  # chunks: moderation windows of ~32 characters
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Write a long story about the sea, number {i}."}],
                max_tokens=64,
                stream=True,
            )
            chunks, request_id = 0, ""
            async for chunk in stream:
                request_id = chunk.id.removeprefix("chatcmpl-")
                chunks += 1
                if chunks >= stop_after:
                    break
            await stream.close()  # the SDK closes the HTTP response: the edge cancels upstream
            seen.append((request_id, chunks))

    await asyncio.gather(*(one(i) for i in range(100)))
    await client.close()
    return seen


def cancel_storm(directory: Path, master: str, table: Table) -> None:
    print("3. cancel storm (torch backend) ...", flush=True)
    settings = LauncherSettings(
        data_dir=directory / "torch",
        edge_port=free_port(),
        any_ports=True,
        master_key=SecretStr(master),
        model_dir=MODEL_DIR,
        inference_backend="torch",
    )
    with Stack(settings) as stack:
        platform = Platform(stack, master)
        key, tenant = platform.key("cancel")
        seen = asyncio.run(cancel_streams(platform.edge, key, random.Random(3)))
        ids = {rid for rid, _ in seen}
        entries = platform.wait_for_ledger(tenant, ids)
        sent: dict[str, int] = {}
        for line in (stack.logs / "inference.log").read_text(errors="replace").splitlines():
            if "generation stopped early" in line:
                record = json.loads(line)
                sent[record["request_id"]] = record["completion_tokens_sent"]
        billed = sum(e.completion_tokens for e in entries)
        reported = sum(sent.get(e.request_id, e.completion_tokens) for e in entries)
        assert stack.plan is not None
        operator = stack.plan.certs[OPERATOR]
        (port,) = stack.plan.service_ports["inference"]
        credentials = channel_credentials(operator.cert, operator.key, operator.ca)
        time.sleep(1)
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            stats = inference_pb2_grpc.InferenceServiceStub(channel).GetStats(
                inference_pb2.GetStatsRequest(), timeout=10
            )
        engine = stats.engines[0]
        table.add("3 cancel storm", "streams closed early by the client", f"{sum(1 for r in sent if r in ids)} of 100")
        table.add("3 cancel storm", "ledger rows (target 100)", len(entries))
        table.add(
            "3 cancel storm", "billed completion tokens / inference sent (target equal)", f"{billed} / {reported}"
        )
        table.add(
            "3 cancel storm",
            "batch after: free slots, running, waiting",
            f"{engine.free_slots}, {engine.running}, {engine.waiting}",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-cancel-storm", action="store_true", help="skip scenario 3 (loads the real model)")
    parser.add_argument("--only", default="1,2,3,4,5", help="scenarios to run, e.g. 4,5")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (logs), instead of a temporary one")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    master = "sk-bench-" + secrets.token_urlsafe(12)
    table = Table()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        echo = directory / "echo"
        echo.mkdir(exist_ok=True)
        settings = LauncherSettings(
            data_dir=echo,
            edge_port=free_port(),
            any_ports=True,
            master_key=SecretStr(master),
            model_dir=MODEL_DIR,
            inference_backend="echo",
            topology_file=topology(echo, replicas=2, paced_echo=True),
        )
        print("starting the platform (echo, paced; router, auth and inference x2) ...", flush=True)
        with Stack(settings) as stack:
            platform = Platform(stack, master)
            for number, scenario in (("1", budget_race), ("2", token_limit), ("4", replica_killed), ("5", outages)):
                if number in only:
                    scenario(platform, table)
        if "3" in only and not args.skip_cancel_storm:
            cancel_storm(directory, master, table)
    table.print()


if __name__ == "__main__":
    main()
