"""One trace per request: a chat with a known `traceparent` through a
platform that exports spans to an OTLP receiver run by the test. Every hop
(Envoy at the edge and in the mesh, auth, router, moderation, inference)
leaves a span in that trace with its parent in the trace, and billing's span
that applies the usage links to it across the stream."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from launcher.settings import LauncherSettings
from launcher.stack import Stack
from mariana.auth.v1 import auth_pb2, auth_pb2_grpc
from mariana.llm.v1 import llm_pb2, llm_pb2_grpc
from mesh.plan import free_port
from services.router import moderation_in_process
from tests.e2e.conftest import MODEL
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e
INTERNAL = 1  # OTLP SpanKind INTERNAL
SERVER = 2  # OTLP SpanKind SERVER
CLIENT = 3  # OTLP SpanKind CLIENT


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[tuple[Stack, OtlpReceiver, str]]:
    # Started after the platform: forking children while this process runs a
    # gRPC server would break gRPC in them. Until then exports simply retry.
    receiver = OtlpReceiver(port=free_port())
    master = "sk-trace-" + secrets.token_urlsafe(12)
    settings = LauncherSettings(
        data_dir=tmp_path_factory.mktemp("traced"),
        edge_port=free_port(),
        any_ports=True,
        master_key=SecretStr(master),
        model_dir=model_dir,
        inference_backend="echo",
        otlp_endpoint=f"127.0.0.1:{receiver.port}",
    )
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # services export every 0.2 s (inherited)
    stack = Stack(settings)
    try:
        stack.start()
        receiver.start()
        yield stack, receiver, master
    finally:
        stack.stop()
        receiver.stop()
        os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)


def complete(spans: list[ReceivedSpan], trace_id: str, client_span: str, services: set[str]) -> bool:
    """Every named service and a mesh hop have reported, and no span's parent is missing
    (exporters flush on their own schedules: Envoy every few seconds)."""
    in_trace = [s for s in spans if s.trace_id == trace_id]
    ids = {s.span_id for s in in_trace} | {client_span}
    names = {s.service for s in spans}
    return (
        services <= names
        and any(s.service.startswith("envoy-mesh-") for s in in_trace)
        and all(s.parent_span_id in ids for s in in_trace)
    )


def wait_for_trace(receiver: OtlpReceiver, trace_id: str, client_span: str, services: set[str]) -> list[ReceivedSpan]:
    deadline = time.monotonic() + 30
    while True:
        spans = receiver.of_trace(trace_id)
        if complete(spans, trace_id, client_span, services) or time.monotonic() > deadline:
            return spans
        time.sleep(0.25)


def test_one_trace_crosses_every_hop(traced: tuple[Stack, OtlpReceiver, str]) -> None:
    stack, receiver, master = traced
    assert stack.plan is not None
    edge = f"127.0.0.1:{stack.plan.edge_port}"
    with grpc.insecure_channel(edge) as channel:
        key = auth_pb2_grpc.AuthAdminServiceStub(channel).CreateKey(
            auth_pb2.CreateKeyRequest(tenant="traced"), metadata=(("authorization", f"Bearer {master}"),), timeout=10
        )
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        chat = llm_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=8)
        chat.messages.add(role="user").content.string_value = "Trace me."
        metadata = (("authorization", f"Bearer {key.secret}"), ("traceparent", f"00-{trace_id}-{client_span}-01"))
        llm_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(chat, metadata=metadata, timeout=30)

    # Moderation runs inside the router (its default): its checks are the router's internal spans.
    python_services = {"auth", "router", "inference"}
    spans = wait_for_trace(receiver, trace_id, client_span, python_services | {"envoy-edge", "billing"})
    in_trace = [s for s in spans if s.trace_id == trace_id]
    services = {s.service for s in in_trace}
    assert python_services | {"envoy-edge"} <= services, services
    envoy = sorted((s.service, s.name, s.kind) for s in in_trace if s.service.startswith("envoy"))
    assert any(s.service.startswith("envoy-mesh-") for s in in_trace), envoy
    # Parent links: every span's parent is the client's span or another span of the trace.
    ids = {s.span_id for s in in_trace} | {client_span}
    orphans = [f"{s.service} {s.name}" for s in in_trace if s.parent_span_id not in ids]
    assert not orphans, orphans
    # Each Python service served its call in a server span.
    for service in python_services:
        assert any(s.service == service and s.kind == SERVER for s in in_trace), service
    # auth answered the edge's check (gRPC, or HTTP with edge.ext_authz_api: http), a child of Envoy's span
    (check,) = [s for s in in_trace if s.service == "auth" and s.kind == SERVER]
    if stack.plan.topology.edge.ext_authz_api == "http":
        assert check.name == "POST /check" and check.attributes["http.target"].endswith("CreateChatCompletion")
    else:
        assert check.name == "/envoy.service.auth.v3.Authorization/Check"
    router = next(s for s in in_trace if s.service == "router" and s.name.endswith("CreateChatCompletion"))
    checks = [s for s in in_trace if s.service == "router" and s.name == moderation_in_process.SPAN]
    assert sorted(s.attributes["mariana.direction"] for s in checks) == ["input", "output"]
    assert all(s.kind == INTERNAL and s.attributes["mariana.actions"] for s in checks)
    assert router.attributes["mariana.model"] == MODEL and router.attributes["mariana.route"] == "primary"
    # The router's call to inference (unary, so over the mesh's HTTP/1.1 bridge) is a client span of its
    # own, and inference's server span descends from it through the mesh hop's Envoy spans.
    (complete,) = [s for s in in_trace if s.service == "router" and s.kind == CLIENT]
    assert complete.name == "/mariana.inference.v1.InferenceService/Complete"
    by_id = {s.span_id: s for s in in_trace}
    served = next(s for s in in_trace if s.service == "inference" and s.kind == SERVER)
    between = []
    parent = by_id.get(served.parent_span_id)
    while parent is not None and parent is not complete:
        between.append(parent.service)
        parent = by_id.get(parent.parent_span_id)
    assert parent is complete and between and all(s.startswith("envoy-mesh-") for s in between), between
    assert router.attributes["mariana.tenant"] and "mariana.completion_tokens" in router.attributes
    assert not any("mk_" in str(v) for s in in_trace for v in s.attributes.values())  # never the key
    # Across the usage stream: billing's span links to the request's trace.
    assert any(s.service == "billing" and trace_id in s.linked_trace_ids for s in spans)
