"""Auth service entry point: key store -> authorizer -> ext_authz + admin API."""

import secrets
from pathlib import Path

import grpc

from mariana_common.channels import mesh_channel
from mariana_common.logs import start_telemetry
from mariana_common.redis_client import redis_client
from mariana_common.server import allowed_peers, create_server, run, serve
from mariana_common.settings import RedisSettings
from mariana_common.sql import Database, database_url
from mariana_common.tls import ServerSslContext
from services.auth import admin_servicer, ext_authz
from services.auth.authorizer import Authorizer
from services.auth.budgets import BillingBudgets
from services.auth.http_check import CheckServer, decider
from services.auth.jwt_tokens import JwtVerifier
from services.auth.rate_limit import RateLimiter
from services.auth.settings import AuthSettings
from services.auth.store import KeyStore


def load_pepper(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


async def main() -> None:
    settings = AuthSettings()  # type: ignore[call-arg]
    start_telemetry("auth", settings)
    db = Database(database_url(settings.database))
    store = KeyStore(db, load_pepper(settings.pepper_file))
    client = redis_client(RedisSettings().redis_url, timeout_s=0.2)
    billing = mesh_channel(settings.billing_target, settings) if settings.billing_target else None
    authorizer = Authorizer(
        store,
        settings.master_key.get_secret_value() if settings.master_key else None,
        jwt=JwtVerifier(settings.jwt_issuers) if settings.jwt_issuers else None,
        limiter=RateLimiter(client),
        budgets=BillingBudgets(billing) if billing is not None else None,
        fail_open=settings.rate_limit_failure == "open",
        cache_ttl_s=settings.cache_ttl_s,
    )

    authz = ext_authz.ExtAuthz(authorizer)

    def register_all(server: grpc.aio.Server) -> None:
        ext_authz.register(authz)(server)
        admin_servicer.register(store, authorizer)(server)

    server = create_server(settings, register_all, [ext_authz.SERVICE_NAME, admin_servicer.SERVICE_NAME])
    check = CheckServer(decider(authz), allowed_peers(settings))
    if settings.ext_authz_port is not None:
        tls = ServerSslContext(*settings.tls_files()) if settings.tls else None
        await check.start(settings.host, settings.ext_authz_port, tls)

    async def drain_check() -> None:
        check.serving = False

    try:
        await serve(server, settings, before_stop=drain_check)
    finally:
        await client.aclose()
        if billing is not None:
            await billing.close(None)
        db.close()


if __name__ == "__main__":
    run(main)
