"""A topology made concrete for one run: every port resolved (0 becomes a free
port) and the certificate files of every identity."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

from mesh.pki import CertFiles
from mesh.topology import Topology

ENVOY_IDENTITY = "envoy"


_LOWEST_PORT = 10_000
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port that is free now and that the kernel will not hand to an outgoing
    connection meanwhile: it is picked below the ephemeral range (a port from
    `bind(0)` is an ephemeral one, and any client socket may take it before the
    process it was meant for binds it)."""
    low, _ = _ephemeral_range()
    highest = low - 1 if low - 1 > _LOWEST_PORT else 65535
    for _ in range(1000):
        port = random.randint(_LOWEST_PORT, highest)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


@dataclass(frozen=True)
class Plan:
    topology: Topology
    edge_port: int
    admin_port: int
    redis_port: int
    # service -> one port per replica
    service_ports: dict[str, list[int]]
    # service -> Envoy's mesh listener port, for services called inside the mesh
    mesh_ports: dict[str, int]
    descriptor_set: Path
    certs: dict[str, CertFiles] = field(default_factory=dict)
    # host:port of an OTLP/gRPC trace collector; empty: Envoy does not trace.
    otlp_endpoint: str = ""

    def identities(self) -> list[str]:
        return [ENVOY_IDENTITY, *self.topology.services]

    def mesh_target(self, service: str) -> str:
        return f"127.0.0.1:{self.mesh_ports[service]}"


def _replica_ports(port: int, replicas: int, any_ports: bool) -> list[int]:
    if any_ports or not port:
        return [free_port() for _ in range(replicas)]
    return [port + i for i in range(replicas)]


def make_plan(
    topology: Topology, descriptor_set: Path, *, any_ports: bool = False, edge_port: int | None = None
) -> Plan:
    """`any_ports` ignores the topology's ports and picks free ones (tests)."""

    def pick(port: int) -> int:
        return free_port() if any_ports or not port else port

    return Plan(
        topology=topology,
        edge_port=edge_port if edge_port is not None else pick(topology.edge.port),
        admin_port=pick(topology.edge.admin_port),
        redis_port=pick(topology.redis.port),
        service_ports={name: _replica_ports(s.port, s.replicas, any_ports) for name, s in topology.services.items()},
        mesh_ports={name: pick(s.mesh_port) for name, s in topology.services.items() if s.mesh_port is not None},
        descriptor_set=descriptor_set,
    )
