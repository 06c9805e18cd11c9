"""What auth costs: the check call itself, on both of auth's check servers
(the gRPC `Authorization/Check` and the HTTP check the edge uses by default;
latency at one caller, checks/s with many), and the latency the edge adds with
auth on against the same platform with ext_authz removed (a measurement-only
setting).

    .venv/bin/python -m bench.auth_cost [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import ssl
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextRequest,
    CheckRequest,
    CheckResponse,
)
from pydantic import SecretStr

from bench.common import MODEL_DIR, issue_key
from launcher.settings import LauncherSettings
from launcher.stack import OPERATOR, Stack
from mariana_common.tls import channel_credentials
from mesh.plan import free_port


def summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e3:6.3f} ms  p99 {p99 * 1e3:6.3f} ms"


def settings(data: Path, master: str, edge_auth: bool) -> LauncherSettings:
    return LauncherSettings(
        data_dir=data,
        edge_port=free_port(),
        any_ports=True,
        master_key=SecretStr(master),
        model_dir=MODEL_DIR,
        edge_auth=edge_auth,
    )


def edge_latency(edge: str, key: str, requests: int) -> list[float]:
    samples = []
    with httpx.Client(base_url=f"http://{edge}", headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(50):
            client.get("/v1/models")
        for _ in range(requests):
            started = time.perf_counter()
            reply = client.get("/v1/models")
            samples.append(time.perf_counter() - started)
            assert reply.status_code == 200, reply.text
    return samples


Call = Callable[[], Awaitable[None]]


async def measure(label: str, connect: Callable[[], Awaitable[Call]], requests: int) -> None:
    """One caller's latency, then checks/s with 16 callers (each its own connection)."""
    check = await connect()
    for _ in range(100):
        await check()
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await check()
        samples.append(time.perf_counter() - started)
    print(f"{label}, 1 caller:   {summary(samples)}", flush=True)
    callers = [await connect() for _ in range(16)]
    done = 0
    deadline = time.perf_counter() + 5

    async def caller(call: Call) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(call) for call in callers))
    print(f"{label}, 16 callers: {done / (time.perf_counter() - started):7.0f} checks/s", flush=True)


async def check_calls(stack: Stack, key: str, requests: int) -> None:
    """auth's two check servers, as Envoy calls them, with the operator's certificate."""
    assert stack.plan is not None
    operator = stack.plan.certs[OPERATOR]
    credentials = channel_credentials(operator.cert, operator.key, operator.ca)
    (port,) = stack.plan.service_ports["auth"]
    (http_port,) = stack.plan.ext_authz_ports
    http = AttributeContextHttpRequest(headers={"authorization": f"Bearer {key}"}, path="/v1/models", method="GET")
    request = CheckRequest(attributes=AttributeContext(request=AttributeContextRequest(http=http)))
    channels = []

    async def grpc_check() -> Call:
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)
        channels.append(channel)
        check = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=bytes,
            response_deserializer=CheckResponse.parse,
        )

        async def call() -> None:
            reply = await check(request)
            assert reply.status.code == 0

        return call

    tls = ssl.create_default_context(cafile=str(operator.ca))
    tls.load_cert_chain(str(operator.cert), str(operator.key))
    head = f"GET /check/v1/models HTTP/1.1\r\nhost: auth\r\nauthorization: Bearer {key}\r\n\r\n".encode()

    async def http_check() -> Call:
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port, ssl=tls, server_hostname="localhost")

        async def call() -> None:
            writer.write(head)
            reply = await reader.readuntil(b"\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ") and b"content-length: 0\r\n" in reply

        return call

    await measure("gRPC Check", grpc_check, requests)
    await measure("HTTP check", http_check, requests)
    for channel in channels:
        await channel.close(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    master = "sk-bench-" + secrets.token_urlsafe(12)
    latencies = {}
    for edge_auth in (True, False):
        with tempfile.TemporaryDirectory() as data:
            label = "on" if edge_auth else "off"
            print(f"starting the platform with auth {label} ...", flush=True)
            with Stack(settings(Path(data), master, edge_auth)) as stack:
                assert stack.plan is not None
                edge = f"127.0.0.1:{stack.plan.edge_port}"
                key = issue_key(edge, master) if edge_auth else "unused"
                if edge_auth:
                    asyncio.run(check_calls(stack, key, args.requests))
                latencies[label] = edge_latency(edge, key, args.requests)
                print(f"GET /v1/models, auth {label}: {summary(latencies[label])}", flush=True)
    added = statistics.median(latencies["on"]) - statistics.median(latencies["off"])
    print(f"auth adds {added * 1e3:.3f} ms at p50 to a request through the edge")


if __name__ == "__main__":
    main()
