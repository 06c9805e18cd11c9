"""A container's health check: asks the service in this container, on its
own port, whether it is SERVING (grpc.health.v1), with the service's own
certificate when it serves TLS. Exit 0 when it is, 1 otherwise.

    python -m mariana_common.healthcheck <program>
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings
from mariana_common.tls import channel_credentials


def serving(target: str, credentials: grpc.ChannelCredentials | None, timeout_s: float = 2.0) -> bool:
    """Whether the gRPC server at `target` says SERVING (plaintext without
    credentials). Envoy's and the operator's certificates name localhost."""
    options = (("grpc.ssl_target_name_override", "localhost"),)
    channel = grpc.secure_channel(target, credentials, options) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def check(program: str) -> bool:
    class Settings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix=f"MARIANA_{program.upper()}_", extra="ignore", frozen=True)

    settings = Settings()
    credentials = channel_credentials(*settings.tls_files()) if settings.tls else None
    return serving(f"127.0.0.1:{settings.port}", credentials)


if __name__ == "__main__":
    sys.exit(0 if len(sys.argv) == 2 and check(sys.argv[1]) else 1)
