"""Administer keys from a shell, through the edge, with an admin key.

python -m services.auth.cli create-key --tenant acme
(reads the admin key from MARIANA_MASTER_KEY, the edge from MARIANA_EDGE)
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from mariana.auth.v1 import auth_pb2, auth_pb2_grpc


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
    args = parser.parse_args(argv)
    if not args.admin_key:
        parser.error("an admin key is needed: --admin-key or MARIANA_MASTER_KEY")

    with grpc.insecure_channel(args.edge) as channel:
        stub = auth_pb2_grpc.AuthAdminServiceStub(channel)
        metadata = (("authorization", f"Bearer {args.admin_key}"),)
        try:
            reply = stub.CreateKey(
                auth_pb2.CreateKeyRequest(tenant=args.tenant, name=args.name), metadata=metadata, timeout=10
            )
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"tenant:  {reply.tenant_id}\nkey id:  {reply.key_id}\nsecret:  {reply.secret}  (shown once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
