"""gRPC adapter of tenant and key administration: proto <-> domain only."""

from __future__ import annotations

import asyncio
import time

import grpc

from mariana.auth.v1 import auth_pb2 as pb
from mariana.auth.v1 import auth_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument
from mariana_common.server import Context, Registrar
from services.auth.authorizer import Authorizer
from services.auth.store import KeyRecord, KeyStore, Scopes, Tenant

SERVICE_NAME = "mariana.auth.v1.AuthAdminService"


def tenant_to_proto(t: Tenant) -> pb.Tenant:
    return pb.Tenant(id=t.id, name=t.name, rpm=t.rpm or 0, tpm=t.tpm or 0)


def key_to_proto(k: KeyRecord) -> pb.Key:
    return pb.Key(
        key_id=k.id,
        tenant_id=k.tenant_id,
        name=k.name,
        prefix=k.prefix,
        role=k.scopes.role,
        models=sorted(k.scopes.models),
        endpoints=sorted(k.scopes.endpoints),
        rpm=k.rpm or 0,
        tpm=k.tpm or 0,
        created_at=k.created_at,
        expires_at=k.expires_at or 0,
        revoked_at=k.revoked_at or 0,
    )


class AuthAdminServicer(pb_grpc.AuthAdminServiceServicer):
    def __init__(self, store: KeyStore, authorizer: Authorizer) -> None:
        self._store = store
        self._authorizer = authorizer

    async def CreateTenant(self, request: pb.CreateTenantRequest, context: Context) -> pb.CreateTenantResponse:
        tenant = await asyncio.to_thread(
            self._store.create_tenant, request.name, request.rpm or None, request.tpm or None
        )
        return pb.CreateTenantResponse(tenant=tenant_to_proto(tenant))

    async def ListTenants(self, request: pb.ListTenantsRequest, context: Context) -> pb.ListTenantsResponse:
        tenants = await asyncio.to_thread(self._store.list_tenants)
        return pb.ListTenantsResponse(tenants=[tenant_to_proto(t) for t in tenants])

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        if not request.tenant:
            raise InvalidArgument("tenant is required")
        tenant = await asyncio.to_thread(self._store.find_tenant, request.tenant)
        if tenant is None:
            tenant = await asyncio.to_thread(self._store.create_tenant, request.tenant)
        scopes = Scopes(request.role or "user", frozenset(request.models), frozenset(request.endpoints))
        expires_at = time.time() + request.expires_in_seconds if request.expires_in_seconds else None
        issued = await asyncio.to_thread(
            self._store.create_key,
            tenant.id,
            request.name,
            scopes,
            request.rpm or None,
            request.tpm or None,
            expires_at,
        )
        return pb.CreateKeyResponse(
            key_id=issued.record.id, tenant_id=tenant.id, secret=issued.secret, key=key_to_proto(issued.record)
        )

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        keys = await asyncio.to_thread(self._store.list_keys, request.tenant_id)
        return pb.ListKeysResponse(keys=[key_to_proto(k) for k in keys])

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.RevokeKeyResponse:
        record = await asyncio.to_thread(self._store.revoke, request.key_id)
        self._authorizer.invalidate()
        return pb.RevokeKeyResponse(key=key_to_proto(record))

    async def RotateKey(self, request: pb.RotateKeyRequest, context: Context) -> pb.RotateKeyResponse:
        issued = await asyncio.to_thread(self._store.rotate, request.key_id, float(request.grace_seconds))
        self._authorizer.invalidate()
        return pb.RotateKeyResponse(secret=issued.secret, key=key_to_proto(issued.record))


def register(store: KeyStore, authorizer: Authorizer) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_AuthAdminServiceServicer_to_server(AuthAdminServicer(store, authorizer), server)

    return add
