"""A topology made concrete for one run: every port resolved (0 becomes a free
port) and the certificate files of every identity."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from mesh.pki import CertFiles
from mesh.topology import Topology

ENVOY_IDENTITY = "envoy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
