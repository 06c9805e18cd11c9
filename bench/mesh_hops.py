"""What one Envoy hop adds inside the mesh: the same gRPC call made directly
to a service's port (mTLS, a client certificate) and through Envoy's mesh
listener (mTLS to Envoy, RBAC on the caller's identity, mTLS again to the
service), one after the other on one channel each, then with concurrent
callers. The echo inference backend answers, so the service's own work is
small and the same both ways.

    .venv/bin/python -m bench.mesh_hops [--requests 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from pydantic import SecretStr

from bench.common import MODEL_DIR
from launcher.settings import LauncherSettings
from launcher.stack import OPERATOR, Stack
from mariana.inference.v1 import inference_pb2, inference_pb2_grpc
from mariana.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from mariana_common.tls import channel_credentials
from mesh.plan import Plan, free_port

Call = Callable[[grpc.aio.Channel], Awaitable[object]]


def moderation_check(channel: grpc.aio.Channel) -> Awaitable[object]:
    stub = moderation_pb2_grpc.ModerationServiceStub(channel)
    return stub.Check(moderation_pb2.CheckRequest(texts=["a short, harmless sentence"]), timeout=10)


def inference_models(channel: grpc.aio.Channel) -> Awaitable[object]:
    return inference_pb2_grpc.InferenceServiceStub(channel).ListModels(inference_pb2.ListModelsRequest(), timeout=10)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return pick(0.5), pick(0.9), pick(0.99)


async def sequential(target: str, credentials: grpc.ChannelCredentials, call: Call, requests: int) -> list[float]:
    options = (("grpc.ssl_target_name_override", "localhost"),)
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        for _ in range(50):  # connections up, caches warm
            await call(channel)
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            await call(channel)
            samples.append(time.perf_counter() - started)
    return samples


async def concurrent(
    target: str, credentials: grpc.ChannelCredentials, call: Call, requests: int, callers: int
) -> tuple[float, list[float]]:
    options = (("grpc.ssl_target_name_override", "localhost"),)
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        for _ in range(50):
            await call(channel)
        samples: list[float] = []

        async def caller(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await call(channel)
                samples.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller(requests // callers) for _ in range(callers)))
        return len(samples) / (time.perf_counter() - started), samples


def row(label: str, samples: list[float], rate: float | None = None) -> str:
    return line(label, percentiles(samples), rate)


def line(label: str, quantiles: tuple[float, float, float], rate: float | None = None) -> str:
    p50, p90, p99 = quantiles
    rate_text = f"{rate:8.0f}" if rate is not None else "       -"
    return f"| {label:<42} | {p50:6.3f} | {p90:6.3f} | {p99:6.3f} | {rate_text} |"


async def measure(plan: Plan, requests: int, callers: int) -> None:
    operator = plan.certs[OPERATOR]
    direct_credentials = channel_credentials(operator.cert, operator.key, operator.ca)
    router = plan.certs["router"]  # the identity allowed to call inference and moderation through Envoy
    mesh_credentials = channel_credentials(router.cert, router.key, router.ca)
    print("| call (ms) | p50 | p90 | p99 | calls/s |")
    print("|---|---|---|---|---|")
    for service, call in (("moderation", moderation_check), ("inference", inference_models)):
        direct_target = f"127.0.0.1:{plan.service_ports[service][0]}"
        mesh_target = plan.mesh_target(service)
        direct = await sequential(direct_target, direct_credentials, call, requests)
        through = await sequential(mesh_target, mesh_credentials, call, requests)
        print(row(f"{service} direct, one at a time", direct))
        print(row(f"{service} through Envoy, one at a time", through))
        p50, p90, p99 = (t - d for t, d in zip(percentiles(through), percentiles(direct), strict=True))
        print(line(f"{service}: added by the Envoy hop", (p50, p90, p99)))
        rate_direct, direct_c = await concurrent(direct_target, direct_credentials, call, requests, callers)
        rate_mesh, mesh_c = await concurrent(mesh_target, mesh_credentials, call, requests, callers)
        print(row(f"{service} direct, {callers} callers", direct_c, rate_direct))
        print(row(f"{service} through Envoy, {callers} callers", mesh_c, rate_mesh))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        settings = LauncherSettings(
            data_dir=Path(directory),
            edge_port=free_port(),
            any_ports=True,
            master_key=SecretStr("sk-bench-" + secrets.token_urlsafe(8)),
            model_dir=MODEL_DIR,
            inference_backend="echo",
            log_level="warning",
        )
        print("[bench] starting the platform (echo backend) ...", flush=True)
        with Stack(settings) as stack:
            assert stack.plan is not None
            print(f"[bench] {args.requests} calls per row; one Envoy (--concurrency 1), mTLS on both legs", flush=True)
            asyncio.run(measure(stack.plan, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
