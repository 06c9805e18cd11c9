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
AUTH = "auth"  # the service Envoy's ext_authz asks


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
    # one per Envoy
    edge_ports: list[int]
    admin_ports: list[int]
    redis_port: int
    # service -> one port per replica
    service_ports: dict[str, list[int]]
    # service -> each Envoy's mesh listener port, for services called inside the mesh
    mesh_ports: dict[str, list[int]]
    descriptor_set: Path
    # auth replica i's port for Envoy's HTTP ext_authz check
    ext_authz_ports: list[int] = field(default_factory=list)
    # service -> one port per replica where it serves gRPC over HTTP/1.1 to Envoy
    http1_ports: dict[str, list[int]] = field(default_factory=dict)
    certs: dict[str, CertFiles] = field(default_factory=dict)
    # host:port of an OTLP/gRPC trace collector; empty: Envoy does not trace.
    otlp_endpoint: str = ""
    # On Kubernetes: services are `<name>.<service_dns>` (a sidecar does mTLS),
    # the edge listens on all addresses and reads the descriptor set from a mount.
    service_dns: str = ""
    listen_host: str = "127.0.0.1"
    descriptor_mount: str = ""

    @property
    def edge_port(self) -> int:
        return self.edge_ports[0]

    @property
    def admin_port(self) -> int:
        return self.admin_ports[0]

    @property
    def envoys(self) -> int:
        return len(self.edge_ports)

    def identities(self) -> list[str]:
        return [ENVOY_IDENTITY, *self.topology.services]

    def upstream_ports(self, service: str) -> list[int]:
        """Where Envoy reaches each replica: its HTTP/1.1 port if it has one, else its gRPC port."""
        return self.http1_ports.get(service) or self.service_ports[service]

    def mesh_target(self, service: str) -> str:
        """A gRPC target naming every Envoy's mesh listener for `service`."""
        ports = self.mesh_ports[service]
        if len(ports) == 1:
            return f"127.0.0.1:{ports[0]}"
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)


# With fixed ports, replica i of a service listens on port + 10 * i and Envoy i
# on port + 100 * i (7101, 7111 for two auths; 8080, 8180 for two edges).
SERVICE_STRIDE = 10
ENVOY_STRIDE = 100


def _replica_ports(port: int, replicas: int, any_ports: bool, stride: int = SERVICE_STRIDE) -> list[int]:
    if any_ports or not port:
        return [free_port() for _ in range(replicas)]
    return [port + stride * i for i in range(replicas)]


def make_plan(
    topology: Topology, descriptor_set: Path, *, any_ports: bool = False, edge_port: int | None = None
) -> Plan:
    """`any_ports` ignores the topology's ports and picks free ones (tests)."""

    envoys = topology.edge.replicas

    def per_envoy(port: int) -> list[int]:
        return _replica_ports(port, envoys, any_ports, ENVOY_STRIDE)

    edge_ports = per_envoy(topology.edge.port)
    auth = topology.services.get(AUTH)
    if edge_port is not None:
        edge_ports[0] = edge_port
    return Plan(
        topology=topology,
        edge_ports=edge_ports,
        admin_ports=per_envoy(topology.edge.admin_port),
        redis_port=_replica_ports(topology.redis.port, 1, any_ports)[0],
        service_ports={name: _replica_ports(s.port, s.replicas, any_ports) for name, s in topology.services.items()},
        mesh_ports={name: per_envoy(s.mesh_port) for name, s in topology.services.items() if s.mesh_port is not None},
        descriptor_set=descriptor_set,
        ext_authz_ports=_replica_ports(topology.edge.ext_authz_port, auth.replicas if auth else 0, any_ports),
        http1_ports={
            name: _replica_ports(s.http1_port, s.replicas, any_ports)
            for name, s in topology.services.items()
            if s.http1_port is not None
        },
    )
