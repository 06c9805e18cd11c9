"""A throwaway PostgreSQL server in a temporary folder on a free port, for
tests and benchmarks. PostgreSQL refuses to run as root, so as root it runs as
the `postgres` system user (which the server package creates)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mesh.plan import free_port


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed; `make setup` installs it")
    return str(candidates[-1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the server's base URL (append /<database>)."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    # Not under a private temp folder: the server may run as another user.
    root = Path(tempfile.mkdtemp(prefix="mariana-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*argv: str, check: bool = True) -> None:
        subprocess.run([*prefix, *argv], check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        # The server's output goes to its log file: a captured pipe would stay
        # open in the server, and pg_ctl's caller would wait for it forever.
        log = str(sockets / "server.log")
        run(pg_ctl, "-D", str(data), "-l", log, "-o", options, "-w", "-t", "30", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
