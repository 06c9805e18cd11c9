"""Exactly-once metering under crashes: publishes N usage events, runs the real
billing service against them and kills it with SIGKILL at random moments
(restarting it, sometimes under a new consumer name so another consumer must
reclaim what the dead one held), publishes a slice of the events a second
time, then checks that the ledger holds exactly N entries whose totals equal
the sums computed from the events. Loopback only; bounded in events and time.

    .venv/bin/python -m bench.billing_crash [--events 10000] [--kills 6]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import redis

from launcher.processes import ManagedProcess
from launcher.readiness import port_open, wait_until
from launcher.settings import REPO
from mariana.billing.v1.billing_pb2 import UsageEvent
from mesh.pki import mint_mesh
from mesh.plan import free_port
from services.billing.events import encode
from services.billing.prices import load_prices

STREAM, GROUP = "mariana:usage", "billing"


def events(n: int, rng: random.Random) -> list[UsageEvent]:
    models = ["smollm2-135m-instruct", "all-minilm-l6-v2", "other-model"]
    return [
        UsageEvent(
            request_id=f"req-{i:06d}",
            tenant_id=f"t{i % 7}",
            key_id=f"k{i % 13}",
            model=rng.choice(models),
            prompt_tokens=rng.randint(1, 4000),
            completion_tokens=rng.randint(0, 1000),
            finish_reason="stop",
            completed_at=1_790_000_000 + i,
        )
        for i in range(n)
    ]


def publish(client: redis.Redis, batch: list[UsageEvent]) -> None:
    pipe = client.pipeline(transaction=False)
    for event in batch:
        pipe.xadd(STREAM, encode(event))  # type: ignore[arg-type]
    pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mariana-billing-crash-"))
    processes: list[ManagedProcess] = []
    try:
        redis_port = free_port()
        server = ManagedProcess(
            "redis",
            ["redis-server", "--port", str(redis_port), "--save", "", "--dir", str(work)],
            dict(os.environ),
            work / "redis.log",
            work,
        )
        server.start()
        processes.append(server)
        wait_until(port_open(redis_port), "redis", time.monotonic() + 10, server)
        client = redis.Redis(port=redis_port)
        certs = mint_mesh(work / "pki", "mariana.local", ["billing"])["billing"]
        ledger_path = work / "ledger.db"

        def start_billing(name: str) -> ManagedProcess:
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")]),
                "MARIANA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "MARIANA_BILLING_PORT": str(free_port()),
                "MARIANA_BILLING_TLS_CERT": str(certs.cert),
                "MARIANA_BILLING_TLS_KEY": str(certs.key),
                "MARIANA_BILLING_TLS_CA": str(certs.ca),
                "MARIANA_BILLING_DATABASE": str(ledger_path),
                "MARIANA_BILLING_CONSUMER_NAME": name,
                "MARIANA_BILLING_RECLAIM_IDLE_MS": "500",
                "MARIANA_BILLING_LOG_LEVEL": "warning",
            }
            process = ManagedProcess(name, [sys.executable, "-m", "services.billing"], env, work / f"{name}.log", REPO)
            process.start()
            processes.append(process)
            return process

        all_events = events(args.events, rng)
        duplicates = rng.sample(all_events, k=args.events // 20)
        waves = [all_events[i :: args.kills + 1] for i in range(args.kills + 1)]

        def applied() -> int:
            if not ledger_path.exists():
                return 0
            return int(sqlite3.connect(ledger_path).execute("SELECT COUNT(*) FROM usage_entries").fetchone()[0])

        print(f"publishing {args.events} usage events in {len(waves)} waves ...", flush=True)
        started = time.monotonic()
        billing = start_billing("billing-0")
        for kill, wave in enumerate(waves[:-1], start=1):
            before = applied()
            publish(client, wave)
            # Kill at a random moment while the consumer works through the wave.
            wait_until(lambda floor=before: applied() > floor, billing.name, time.monotonic() + 60, billing)
            time.sleep(rng.uniform(0.0, 0.15))
            at = applied()
            os.kill(billing.pid, signal.SIGKILL)
            billing.popen.wait()  # type: ignore[union-attr]
            if kill == args.kills // 2:
                publish(client, duplicates)  # the same request ids again
            # Every other restart comes back under a new name: the old one's
            # pending entries must be reclaimed by another consumer.
            billing = start_billing(f"billing-{kill if kill % 2 else 0}")
            print(f"  kill {kill}: SIGKILL with {at} entries in the ledger, restarted as {billing.name}", flush=True)
        publish(client, waves[-1])
        deadline = time.monotonic() + 180
        while True:
            groups = client.xinfo_groups(STREAM)
            pending, lag = groups[0]["pending"], groups[0].get("lag", 0)
            if pending == 0 and not lag and applied() >= args.events:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        db = sqlite3.connect(ledger_path)
        count, prompt, completion, cost = db.execute(
            "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_micros) FROM usage_entries"
        ).fetchone()
        prices = load_prices()
        expected = (
            len(all_events),
            sum(e.prompt_tokens for e in all_events),
            sum(e.completion_tokens for e in all_events),
            sum(
                prices.price(e.model, e.completed_at).cost_micros(e.prompt_tokens, e.completion_tokens)
                for e in all_events
            ),
        )
        dead = client.xlen(STREAM + ":dead")
        print(f"events published: {args.events} (+{len(duplicates)} duplicates), SIGKILLs: {args.kills}")
        print(f"ledger entries: {count} (expected {expected[0]}), pending: {pending}, dead-lettered: {dead}")
        print(f"prompt tokens: {prompt} (expected {expected[1]})")
        print(f"completion tokens: {completion} (expected {expected[2]})")
        print(f"cost micro-units: {cost} (expected {expected[3]})")
        print(
            f"lost: {expected[0] - count}, doubled: {max(0, count - expected[0])}, "
            f"{count / elapsed:.0f} events/s end to end including restarts (SQLite)"
        )
        exact = (count, prompt, completion, cost) == expected and pending == 0
        print("EXACT" if exact else "MISMATCH")
        if not exact:
            sys.exit(1)
    finally:
        for process in reversed(processes):
            process.stop(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
