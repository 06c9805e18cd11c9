"""What the benchmarks share: the default model's place and a key issued
through the edge's admin API."""

from __future__ import annotations

import grpc

from launcher.settings import REPO
from mariana.auth.v1 import auth_pb2, auth_pb2_grpc

MODEL = "smollm2-135m-instruct"
MODEL_DIR = REPO / ".data" / "models" / MODEL
UNLIMITED = 4_000_000_000


def issue_key(edge: str, master: str, tenant: str = "bench") -> str:
    """A key with limits high enough that the benchmark measures the platform."""
    with grpc.insecure_channel(edge) as channel:
        reply = auth_pb2_grpc.AuthAdminServiceStub(channel).CreateKey(
            auth_pb2.CreateKeyRequest(tenant=tenant, rpm=UNLIMITED, tpm=UNLIMITED),
            metadata=(("authorization", f"Bearer {master}"),),
            timeout=10,
        )
    return str(reply.secret)
