"""The whole platform, started once for the end-to-end tests: Redis, the five
services and a real Envoy, on free ports in a temporary data folder."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import openai
import pytest
from pydantic import SecretStr

from launcher.settings import REPO, LauncherSettings
from launcher.stack import Stack
from mesh.plan import Plan, free_port
from services.router.catalog import DEFAULT_FILE as DEFAULT_CATALOG

MODEL = "smollm2-135m-instruct"
Refusal = TypeVar("Refusal", bound=BaseException)
EMBEDDER = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Platform:
    stack: Stack
    plan: Plan
    master_key: str

    @property
    def catalog(self) -> Path:
        assert self.stack.settings.router_catalog is not None
        return self.stack.settings.router_catalog

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.plan.edge_port}"

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.edge}/v1", api_key=key, max_retries=0, timeout=60)


@dataclass(frozen=True)
class TenantKey:
    tenant_id: str
    key_id: str
    secret: str


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Platform]:
    master = "sk-e2e-" + secrets.token_urlsafe(16)
    data_dir = tmp_path_factory.mktemp("platform")
    catalog = data_dir / "catalog.yaml"  # the operator's copy: tests edit it while the platform runs
    catalog.write_text(DEFAULT_CATALOG.read_text())
    settings = LauncherSettings(
        data_dir=data_dir,
        edge_port=free_port(),
        any_ports=True,
        master_key=SecretStr(master),
        model_dir=model_dir,
        router_catalog=catalog,
    )
    stack = Stack(settings)
    try:
        plan = stack.start()
    except BaseException:
        stack.stop()
        raise
    yield Platform(stack, plan, master)
    stack.stop()


def create_key_with_cli(platform: Platform, tenant: str) -> TenantKey:
    """Issues a key the way an operator does: the CLI, through the edge."""
    result = subprocess.run(
        [sys.executable, "-m", "services.auth.cli", "--edge", platform.edge, "create-key", "--tenant", tenant],
        env={**os.environ, "MARIANA_MASTER_KEY": platform.master_key},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    fields = dict(re.findall(r"^([a-z ]+):\s+(\S+)", result.stdout, re.MULTILINE))
    return TenantKey(fields["tenant"], fields["key id"], fields["secret"])


@pytest.fixture(scope="session")
def tenant_key(platform: Platform) -> TenantKey:
    return create_key_with_cli(platform, "acme")


@pytest.fixture(scope="session")
def client(platform: Platform, tenant_key: TenantKey) -> openai.OpenAI:
    return platform.openai(tenant_key.secret)


def first_refusal(call: Callable[[], object], refusal: type[Refusal], what: str, timeout_s: float) -> Refusal:
    """Repeats `call` until it raises `refusal`, for state that changes off the
    request path (usage charged asynchronously, expiry): returns the refusal."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
        except refusal as refused:
            return refused
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
