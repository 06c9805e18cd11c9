"""Auth service entry point: key store -> authorizer -> ext_authz + admin API."""

import secrets
from pathlib import Path

import grpc

from mariana_common.logs import configure_logging
from mariana_common.server import create_server, run, serve
from services.auth import admin_servicer, ext_authz
from services.auth.authorizer import Authorizer
from services.auth.keys import KeyStore
from services.auth.settings import AuthSettings


def load_pepper(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


async def main() -> None:
    settings = AuthSettings()  # type: ignore[call-arg]
    configure_logging("auth", settings.log_level)
    store = KeyStore(settings.db_path, load_pepper(settings.pepper_file))
    master = settings.master_key.get_secret_value() if settings.master_key else None
    authorizer = Authorizer(store, master, settings.cache_ttl_s)

    def register_all(server: grpc.aio.Server) -> None:
        ext_authz.register(ext_authz.ExtAuthz(authorizer))(server)
        admin_servicer.register(store)(server)

    server = create_server(settings, register_all, [ext_authz.SERVICE_NAME, admin_servicer.SERVICE_NAME])
    try:
        await serve(server, settings)
    finally:
        store.close()


if __name__ == "__main__":
    run(main)
