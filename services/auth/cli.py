"""Administer tenants and keys from a shell, through the edge, with an admin key.

    python -m services.auth.cli create-key --tenant acme [--models m1,m2] [--rpm 60] [--expires-in 3600]
    python -m services.auth.cli list-keys --tenant t_0123456789ab
    python -m services.auth.cli revoke --key-id 0123456789ab
    python -m services.auth.cli rotate --key-id 0123456789ab [--grace 60]

The admin key comes from --admin-key or MARIANA_MASTER_KEY, the edge from
--edge or MARIANA_EDGE (default 127.0.0.1:8080).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from mariana.auth.v1 import auth_pb2, auth_pb2_grpc


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _describe(key: auth_pb2.Key) -> str:
    state = "revoked" if key.revoked_at else "active"
    scopes = f"role={key.role} models={','.join(key.models) or '*'} endpoints={','.join(key.endpoints) or '*'}"
    return f"{key.prefix}  {state:7s}  {scopes}  rpm={key.rpm or '-'} tpm={key.tpm or '-'}  {key.name}"


def run(args: argparse.Namespace, stub: auth_pb2_grpc.AuthAdminServiceStub, metadata: tuple[tuple[str, str]]) -> str:
    if args.command == "create-key":
        reply = stub.CreateKey(
            auth_pb2.CreateKeyRequest(
                tenant=args.tenant,
                name=args.name,
                role=args.role,
                models=_csv(args.models),
                endpoints=_csv(args.endpoints),
                rpm=args.rpm,
                tpm=args.tpm,
                expires_in_seconds=args.expires_in,
            ),
            metadata=metadata,
            timeout=10,
        )
        return f"tenant:  {reply.tenant_id}\nkey id:  {reply.key_id}\nsecret:  {reply.secret}  (shown once)"
    if args.command == "list-keys":
        reply = stub.ListKeys(auth_pb2.ListKeysRequest(tenant_id=args.tenant), metadata=metadata, timeout=10)
        return "\n".join(_describe(k) for k in reply.keys) or "(no keys)"
    if args.command == "revoke":
        reply = stub.RevokeKey(auth_pb2.RevokeKeyRequest(key_id=args.key_id), metadata=metadata, timeout=10)
        return f"revoked: {_describe(reply.key)}"
    reply = stub.RotateKey(
        auth_pb2.RotateKeyRequest(key_id=args.key_id, grace_seconds=args.grace), metadata=metadata, timeout=10
    )
    return f"key id:  {reply.key.key_id}\nsecret:  {reply.secret}  (shown once)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.auth.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--edge", default=os.environ.get("MARIANA_EDGE", "127.0.0.1:8080"))
    parser.add_argument("--admin-key", default=os.environ.get("MARIANA_MASTER_KEY"))
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="issue an API key for a tenant (created if new)")
    create.add_argument("--tenant", required=True, help="tenant id or name")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--role", default="user", choices=["user", "admin"])
    create.add_argument("--models", default="", help="comma-separated models the key may use (default: all)")
    create.add_argument("--endpoints", default="", help="comma-separated endpoints (default: all)")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (default: no limit)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute (default: no limit)")
    create.add_argument("--expires-in", type=int, default=0, help="lifetime in seconds (default: no expiry)")
    listing = commands.add_parser("list-keys", help="list a tenant's keys")
    listing.add_argument("--tenant", required=True, help="tenant id")
    revoke = commands.add_parser("revoke", help="revoke a key")
    revoke.add_argument("--key-id", required=True)
    rotate = commands.add_parser("rotate", help="replace a key's secret")
    rotate.add_argument("--key-id", required=True)
    rotate.add_argument("--grace", type=int, default=0, help="seconds the old secret keeps working")
    args = parser.parse_args(argv)
    if not args.admin_key:
        parser.error("an admin key is needed: --admin-key or MARIANA_MASTER_KEY")
    with grpc.insecure_channel(args.edge) as channel:
        stub = auth_pb2_grpc.AuthAdminServiceStub(channel)
        try:
            print(run(args, stub, (("authorization", f"Bearer {args.admin_key}"),)))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
