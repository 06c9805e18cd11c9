"""The mesh without a single point of failure: two Envoys, two replicas of
router, auth and inference (echo backend, so the load is the platform's), a
per-tenant backstop low enough to reach. Under steady load through the edge,
a replica of each service (and one Envoy) is killed, and the certificates of
every workload are rotated: no request fails."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from pydantic import SecretStr

from launcher.settings import LauncherSettings
from launcher.stack import Stack
from mariana.auth.v1 import auth_pb2, auth_pb2_grpc
from mariana.llm.v1 import llm_pb2, llm_pb2_grpc
from mesh.plan import free_port
from mesh.topology import DEFAULT_FILE as DEFAULT_TOPOLOGY
from tests.e2e.conftest import MODEL
from tests.tls_probe import serial_in_file, served_serial

pytestmark = pytest.mark.e2e

REPLICAS = {"edge": 2, "router": 2, "auth": 2, "inference": 2}
TENANT_RPS = 40  # the backstop; each load tenant stays well under it
LOAD_TENANTS = 4
LOAD_RPS = 48


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[Stack, str]]:
    data_dir = tmp_path_factory.mktemp("mesh")
    raw = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    raw["edge"]["tenant_rate_limit"] = {"requests_per_second": TENANT_RPS, "burst": TENANT_RPS}
    topology = data_dir / "topology.yaml"
    topology.write_text(yaml.safe_dump(raw))
    master = "sk-mesh-" + secrets.token_urlsafe(12)
    settings = LauncherSettings(
        data_dir=data_dir,
        edge_port=free_port(),
        any_ports=True,
        master_key=SecretStr(master),
        model_dir=model_dir,
        inference_backend="echo",
        topology_file=topology,
        replicas=REPLICAS,
    )
    stack = Stack(settings)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    yield stack, master
    stack.stop()


def edge(stack: Stack, index: int) -> str:
    assert stack.plan is not None
    return f"127.0.0.1:{stack.plan.edge_ports[index]}"


def issue_key(stack: Stack, master: str, tenant: str, via: int = 0) -> str:
    """No per-key limits: what limits these tenants is Envoy's backstop."""
    with grpc.insecure_channel(edge(stack, via)) as channel:
        reply = auth_pb2_grpc.AuthAdminServiceStub(channel).CreateKey(
            auth_pb2.CreateKeyRequest(tenant=tenant, rpm=1_000_000, tpm=1_000_000_000),
            metadata=(("authorization", f"Bearer {master}"),),
            timeout=10,
        )
    return str(reply.secret)


def chat() -> llm_pb2.CreateChatCompletionRequest:
    request = llm_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=8)
    request.messages.add(role="user").content.string_value = "hello there"
    return request


class Load:
    """An open loop of `rate` requests a second (chat completions and model
    lists, each tenant in turn) through one edge, on a thread of its own,
    until stopped; every outcome is kept."""

    def __init__(self, target: str, keys: list[str], rate: float) -> None:
        self.target = target
        self.keys = keys
        self.rate = rate
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _call(self, stub: llm_pb2_grpc.LlmServiceStub, n: int) -> None:
        metadata = (("authorization", f"Bearer {self.keys[n % len(self.keys)]}"),)
        kind = "chat" if n % 2 else "models"
        try:
            if kind == "chat":
                reply = await stub.CreateChatCompletion(chat(), metadata=metadata, timeout=20)
                assert reply.choices[0].message.content
            else:
                models = await stub.ListModels(llm_pb2.ListModelsRequest(), metadata=metadata, timeout=20)
                assert models.data
            self.outcomes[(kind, "OK")] += 1
        except grpc.aio.AioRpcError as error:
            self.outcomes[(kind, f"{error.code().name}: {error.details()}")] += 1

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            calls: set[asyncio.Task[None]] = set()
            started, n = time.monotonic(), 0
            while not self._stop.is_set():
                task = asyncio.create_task(self._call(stub, n))
                calls.add(task)
                task.add_done_callback(calls.discard)
                n += 1
                await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            await asyncio.gather(*calls)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def failures(self) -> dict[tuple[str, str], int]:
        return {outcome: count for outcome, count in self.outcomes.items() if outcome[1] != "OK"}

    def total(self) -> int:
        return sum(self.outcomes.values())


def run_for(seconds: float, load: Load) -> None:
    """Lets the load run; the loop is bounded by time, and the load by rate."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        assert load._thread.is_alive()


@pytest.fixture(scope="module")
def load_keys(mesh: tuple[Stack, str]) -> list[str]:
    stack, master = mesh
    return [issue_key(stack, master, f"load-{i}") for i in range(LOAD_TENANTS)]


def test_both_edges_serve(mesh: tuple[Stack, str], load_keys: list[str]) -> None:
    stack, _ = mesh
    for index in range(2):
        reply = httpx.get(
            f"http://{edge(stack, index)}/v1/models", headers={"Authorization": f"Bearer {load_keys[0]}"}, timeout=30
        )
        assert reply.status_code == 200, reply.text


def serial_served_at(port: int, stack: Stack) -> int:
    """Asked with the operator's certificate."""
    pki = stack.data_dir / "pki"
    return served_serial(port, pki / "operator.pem", pki / "operator.key", pki / "ca.pem")


def test_rotating_every_certificate_under_load_fails_no_request(mesh: tuple[Stack, str], load_keys: list[str]) -> None:
    stack, _ = mesh
    assert stack.plan is not None
    plan = stack.plan
    # Envoy's mesh listener, the router's gRPC port, its gRPC-over-HTTP/1.1 port and auth's HTTP check
    # port (the last two Python's ssl)
    ports = (
        plan.mesh_ports["inference"][0],
        plan.service_ports["router"][0],
        plan.http1_ports["router"][0],
        plan.ext_authz_ports[0],
    )
    before = [serial_served_at(port, stack) for port in ports]
    with Load(edge(stack, 0), load_keys, LOAD_RPS) as load:
        run_for(2, load)
        stack.rotate_certificates()
        rotated = [serial_in_file(plan.certs[name].cert) for name in ("envoy", "router", "router", "auth")]
        deadline = time.monotonic() + 15
        while [serial_served_at(port, stack) for port in ports] != rotated:
            assert time.monotonic() < deadline, "the rotated certificates were not taken up"
            time.sleep(0.2)
        run_for(3, load)  # new connections on the new certificates, old ones draining
    assert all(new != old for new, old in zip(rotated, before, strict=True))
    assert load.total() >= 4 * LOAD_RPS
    assert load.failures() == {}
    # Nothing was restarted, and the router's own client certificate was taken up too.
    assert stack.check_alive() is None
    router_log = (stack.logs / "router-0.log").read_text()
    assert "mesh channel reopened with the rotated certificate" in router_log


def test_killing_one_replica_of_each_service_and_one_envoy_fails_no_request(
    mesh: tuple[Stack, str], load_keys: list[str]
) -> None:
    stack, _ = mesh
    victims = ["inference-0", "auth-0", "router-0", "envoy-0"]
    with Load(edge(stack, 1), load_keys, LOAD_RPS) as load:
        run_for(1.5, load)
        for name in victims:
            stack.process(name).signal(signal.SIGKILL)
            run_for(1.5, load)
        run_for(2, load)
    assert load.total() >= 6 * LOAD_RPS
    # If one fails, the surviving edge's own account of it says where.
    failed_at_edge = [
        line
        for line in (stack.logs / "envoy-1.log").read_text().splitlines()
        if '"listener":"edge"' in line and '"grpc_status":"OK"' not in line
    ]
    assert load.failures() == {}, failed_at_edge[-10:]
    assert all(stack.process(name).exited() is not None for name in victims)
    # Envoy-1 has taken the dead replicas out of rotation by now.
    assert stack.plan is not None
    clusters = urllib.request.urlopen(f"http://127.0.0.1:{stack.plan.admin_ports[1]}/clusters", timeout=5).read()
    # the ports that carried their traffic (auth's: where Envoy's ext_authz asks)
    plan = stack.plan
    http_check = plan.topology.edge.ext_authz_api == "http"
    auth_port = plan.ext_authz_ports[0] if http_check else plan.service_ports["auth"][0]
    dead_ports = {plan.upstream_ports("inference")[0], auth_port, plan.upstream_ports("router")[0]}
    unhealthy = {
        int(line.split("::")[1].rsplit(":", 1)[1])
        for line in clusters.decode().splitlines()
        if "::health_flags::" in line and not line.endswith("::healthy")
    }
    assert dead_ports <= unhealthy


def test_a_tenant_over_the_backstop_gets_429_and_other_tenants_do_not(
    mesh: tuple[Stack, str], load_keys: list[str]
) -> None:
    stack, master = mesh
    greedy = issue_key(stack, master, "greedy", via=1)  # envoy-0 was killed above
    target = f"http://{edge(stack, 1)}/v1/models"

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            calls = [client.get(target, headers={"Authorization": f"Bearer {greedy}"}) for _ in range(3 * TENANT_RPS)]
            return await asyncio.gather(*calls)

    replies = asyncio.run(burst())
    codes = Counter(reply.status_code for reply in replies)
    assert codes[429] > 0 and codes[200] >= TENANT_RPS // 2, codes
    refused = next(reply for reply in replies if reply.status_code == 429)
    assert json.loads(refused.text)["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1"
    # another tenant's bucket is its own
    other = httpx.get(target, headers={"Authorization": f"Bearer {load_keys[0]}"}, timeout=30)
    assert other.status_code == 200
    # gRPC callers get RESOURCE_EXHAUSTED
    with grpc.insecure_channel(edge(stack, 1)) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        metadata = (("authorization", f"Bearer {greedy}"),)
        codes_grpc: Counter[str] = Counter()
        for _ in range(3 * TENANT_RPS):
            try:
                stub.ListModels(llm_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
                codes_grpc["OK"] += 1
            except grpc.RpcError as error:
                codes_grpc[error.code().name] += 1  # type: ignore[attr-defined]
    assert set(codes_grpc) <= {"OK", "RESOURCE_EXHAUSTED"} and codes_grpc["RESOURCE_EXHAUSTED"] > 0, codes_grpc


def test_an_unanswered_check_fails_closed_for_grpc_and_rest_callers(
    mesh: tuple[Stack, str], load_keys: list[str]
) -> None:
    """Every live auth replica frozen: Envoy's own reply to the check (a
    timeout) must refuse the request, never let it through to the router
    without an identity. (Last in the module: auth is frozen for a while.)"""
    stack, _ = mesh
    frozen = [name for name in ("auth-0", "auth-1") if stack.process(name).exited() is None]
    assert frozen
    metadata = (("authorization", f"Bearer {load_keys[0]}"),)
    for name in frozen:
        stack.process(name).signal(signal.SIGSTOP)
    try:
        with grpc.insecure_channel(edge(stack, 1)) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                llm_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(chat(), metadata=metadata, timeout=10)
        rest = httpx.get(f"http://{edge(stack, 1)}/v1/models", headers=dict(metadata), timeout=10)
    finally:
        for name in frozen:
            stack.process(name).signal(signal.SIGCONT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()  # type: ignore[attr-defined]
    assert rest.status_code == 503
