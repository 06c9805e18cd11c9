"""What auth costs: the ext_authz `Check` call itself (latency at one caller,
checks/s with many), and the latency the edge adds with auth on against the
same platform with ext_authz removed (a measurement-only setting).

    .venv/bin/python -m bench.auth_cost [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
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


async def check_calls(stack: Stack, key: str, requests: int) -> None:
    assert stack.plan is not None
    operator = stack.plan.certs[OPERATOR]
    credentials = channel_credentials(operator.cert, operator.key, operator.ca)
    (port,) = stack.plan.service_ports["auth"]
    http = AttributeContextHttpRequest(headers={"authorization": f"Bearer {key}"}, path="/v1/models", method="GET")
    request = CheckRequest(attributes=AttributeContext(request=AttributeContextRequest(http=http)))
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        check = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=bytes,
            response_deserializer=CheckResponse.parse,
        )
        for _ in range(100):
            await check(request)
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            reply = await check(request)
            samples.append(time.perf_counter() - started)
            assert reply.status.code == 0
        print(f"Check, 1 caller:          {summary(samples)}")
        done = 0
        deadline = time.perf_counter() + 5

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await check(request)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(16)))
        print(f"Check, 16 callers:        {done / (time.perf_counter() - started):7.0f} checks/s")


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
