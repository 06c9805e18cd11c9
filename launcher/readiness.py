"""Waiting for things to be ready by asking them, never by sleeping a guess."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc

from launcher.processes import ManagedProcess
from mariana_common.healthcheck import serving

POLL_S = 0.1


class StartError(RuntimeError):
    pass


def wait_until(check: Callable[[], bool], what: str, deadline: float, process: ManagedProcess | None = None) -> None:
    while time.monotonic() < deadline:
        if process is not None and process.exited() is not None:
            raise StartError(f"{what}: process exited with {process.exited()}\n{process.log_tail()}")
        if check():
            return
        time.sleep(POLL_S)
    tail = process.log_tail() if process else ""
    raise StartError(f"{what}: not ready in time\n{tail}")


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    return check


def grpc_serving(port: int, credentials: grpc.ChannelCredentials) -> Callable[[], bool]:
    return lambda: serving(f"127.0.0.1:{port}", credentials, timeout_s=1)


def envoy_clusters_healthy(admin_port: int, clusters: list[str]) -> Callable[[], bool]:
    """Envoy's own active health checks have found every host of every cluster healthy."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=1) as reply:
                text = reply.read().decode()
        except (urllib.error.URLError, OSError):
            return False
        flags = [line for line in text.splitlines() if "::health_flags::" in line]
        return all(
            any(line.startswith(f"{c}::") for line in flags)
            and all(line.endswith("::healthy") for line in flags if line.startswith(f"{c}::"))
            for c in clusters
        )

    return check
