"""`make run`: start the whole platform in the foreground; Ctrl-C or SIGTERM
stops every process it started."""

from __future__ import annotations

import signal
import sys
import threading
import time

from launcher.readiness import StartError
from launcher.settings import LauncherSettings
from launcher.stack import Stack


def main() -> int:
    settings = LauncherSettings()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stack = Stack(settings)
    print("[mariana] starting redis, moderation, billing, auth, inference, router, envoy ...", flush=True)
    try:
        plan = stack.start()
    except StartError as error:
        print(f"[mariana] start-up failed: {error}", file=sys.stderr, flush=True)
        stack.stop()
        return 1
    edge = f"127.0.0.1:{plan.edge_port}"
    edges = "  ".join(f"http://127.0.0.1:{port}/v1" for port in plan.edge_ports)
    cli = f".venv/bin/python -m services.auth.cli --edge {edge} create-key --tenant demo"
    print(
        f"[mariana] ready.\n"
        f"  edge (REST + gRPC): {edges}   (OpenAI base_url; gRPC stubs use {edge})\n"
        f"  Envoy admin:        http://127.0.0.1:{plan.admin_port}/\n"
        f"  logs:               {stack.logs}/\n"
        f"  metrics:            .venv/bin/python -m launcher.top   (live summary; Prometheus targets in "
        f"{stack.data_dir}/observability/targets.json)\n"
        f"  get an API key:     MARIANA_MASTER_KEY=<admin key> {cli}",
        flush=True,
    )
    if settings.master_key is None:
        print("  (no MARIANA_MASTER_KEY was set, so no admin key exists: restart with one to issue keys)", flush=True)
    print("[mariana] Ctrl-C stops everything.", flush=True)
    next_rotation = time.monotonic() + settings.cert_rotation_interval_s
    while not stop.wait(0.5):
        if time.monotonic() >= next_rotation:
            stack.rotate_certificates()
            next_rotation = time.monotonic() + settings.cert_rotation_interval_s
            print("[mariana] workload certificates rotated (no restart).", flush=True)
        dead = stack.check_alive()
        if dead is not None:
            print(
                f"[mariana] {dead.name} exited with {dead.exited()}; stopping.\n{dead.log_tail()}",
                file=sys.stderr,
                flush=True,
            )
            stack.stop()
            return 1
    print("[mariana] stopping ...", flush=True)
    stack.stop()
    print("[mariana] stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
