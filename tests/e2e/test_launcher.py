"""`make run`'s process: it prints how to reach the platform once ready, and
SIGTERM (or Ctrl-C) leaves no process behind; neither does SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from launcher.settings import REPO, LauncherSettings
from launcher.stack import BACKGROUND_NICENESS, Stack
from mesh.plan import free_port

pytestmark = pytest.mark.e2e


def start_launcher(tmp_path: Path, model_dir: Path) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    env = {
        **os.environ,
        "MARIANA_DATA_DIR": str(tmp_path),
        "MARIANA_EDGE_PORT": str(free_port()),
        "MARIANA_ANY_PORTS": "true",
        "MARIANA_MODEL_DIR": str(model_dir),
        "MARIANA_MASTER_KEY": "sk-launcher-test-key",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        return process, started_children(process)
    except BaseException:
        process.terminate()  # a failed check must not leave a platform running
        process.wait(timeout=60)
        raise


def started_children(process: subprocess.Popen[str]) -> list[psutil.Process]:
    """Reads the launcher's output to its ready line; checks what it started."""
    assert process.stdout is not None
    output = []
    for line in process.stdout:
        output.append(line)
        if "Ctrl-C stops everything" in line:
            break
    assert process.poll() is None, "".join(output)
    text = "".join(output)
    assert "[mariana] ready." in text and "/v1" in text and "create-key" in text
    children = psutil.Process(process.pid).children(recursive=True)
    names = " ".join(" ".join(c.cmdline()) for c in children)
    for part in ("redis-server", "services.auth", "services.router", "services.inference", "envoy"):
        assert part in names
    # billing is `background` in the topology: it yields the CPU to the request path
    niceness = {c.cmdline()[-1]: c.nice() for c in children if "services." in " ".join(c.cmdline())}
    assert niceness == {
        "services.billing": BACKGROUND_NICENESS,
        "services.auth": 0,
        "services.router": 0,
        "services.inference": 0,
        "services.moderation": 0,
    }
    return children


def assert_all_gone(children: list[psutil.Process], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"still running: {[c.cmdline() for c in alive]}")


def test_sigterm_stops_every_process(tmp_path: Path, model_dir: Path) -> None:
    process, children = start_launcher(tmp_path, model_dir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert_all_gone(children)


def test_sigkill_of_the_launcher_leaves_no_orphans(tmp_path: Path, model_dir: Path) -> None:
    process, children = start_launcher(tmp_path, model_dir)
    process.kill()
    process.wait(timeout=10)
    assert_all_gone(children)


def test_each_replica_gets_its_own_ports_whatever_the_other_services_replicas(tmp_path: Path, model_dir: Path) -> None:
    """Two inference replicas and one auth replica (the router chaos
    benchmark's shape): each process's settings, without starting any."""
    topology = tmp_path / "topology.yaml"
    raw = yaml.safe_load((REPO / "mesh" / "topology.yaml").read_text())
    raw["services"]["inference"]["replicas"] = 2
    topology.write_text(yaml.safe_dump(raw))
    settings = LauncherSettings(data_dir=tmp_path, any_ports=True, model_dir=model_dir, topology_file=topology)
    stack = Stack(settings)
    stack.plan = plan = stack._prepare()
    first, second = (stack._service_env("inference", port) for port in plan.service_ports["inference"])
    assert [first["MARIANA_INFERENCE_PORT"], second["MARIANA_INFERENCE_PORT"]] == [
        str(port) for port in plan.service_ports["inference"]
    ]
    (auth_port,) = plan.service_ports["auth"]
    assert stack._service_env("auth", auth_port)["MARIANA_AUTH_EXT_AUTHZ_PORT"] == str(plan.ext_authz_ports[0])
