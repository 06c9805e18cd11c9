"""Which service calls which, as each program's settings: the same for the
local run (targets are Envoy's mesh listeners) and for Kubernetes (targets
are the services' DNS names, reached through the Istio sidecar)."""

from __future__ import annotations

import json
from collections.abc import Callable

from mesh.topology import Topology


def upstream_settings(topology: Topology, name: str, target: Callable[[str], str]) -> dict[str, str]:
    """Settings (environment names without the program's prefix) that tell
    deployment `name` where its upstreams are; `target(service)` is how to
    reach a service from it."""
    program = topology.services[name].program_of(name)
    if program == "auth" and "auth" in topology.services["billing"].callers:
        return {"BILLING_TARGET": target("billing")}
    if program == "router":
        pools = {
            pool: target(pool)
            for pool, service in topology.services.items()
            if service.program_of(pool) == "inference" and name in service.callers
        }
        return {"UPSTREAMS": json.dumps(pools), "MODERATION_TARGET": target("moderation")}
    return {}


def shared_engine_settings(topology: Topology, program: str) -> dict[str, str]:
    """Whole environment names: the router runs the moderation engine in
    process (its default), so it reads the moderation service's own settings."""
    if program != "router":
        return {}
    return {"MARIANA_MODERATION_" + key: value for key, value in topology.services["moderation"].settings.items()}
