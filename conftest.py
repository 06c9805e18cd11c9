"""Fixtures every test tier shares: a dev PKI minted into a temp folder and a
real redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from launcher import postgres as launcher_postgres
from mesh.pki import CertFiles, mint_mesh
from mesh.plan import free_port

IDENTITIES = ["envoy", "auth", "router", "inference", "billing", "moderation", "operator", "intruder"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertFiles]:
    return mint_mesh(tmp_path_factory.mktemp("pki"), "mariana.local", IDENTITIES)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make setup` installs it")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


@pytest.fixture
def flush_redis(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushall()
    return redis_url


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """`make model`'s checkpoint; under Bazel, the copy the test's data brings."""
    given = os.environ.get("MARIANA_TEST_MODEL_DIR")  # a file of it (Bazel: its config.json)
    path = Path(given).parent if given else Path(__file__).parent / ".data" / "models" / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        pytest.fail(f"no model at {path}; `make model` prepares it")
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server for the session; yields its base URL."""
    try:
        with launcher_postgres.postgres_server() as url:
            yield url
    except FileNotFoundError as error:
        pytest.fail(str(error))


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's server."""
    import uuid

    return launcher_postgres.create_database(postgres_server, f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on both databases."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return str(request.getfixturevalue("postgres_url"))
