"""gRPC adapter of the KeyStore's administration: proto <-> domain only."""

from __future__ import annotations

import asyncio

import grpc

from mariana.auth.v1 import auth_pb2 as pb
from mariana.auth.v1 import auth_pb2_grpc as pb_grpc
from mariana_common.server import Context, Registrar
from services.auth.keys import KeyStore

SERVICE_NAME = "mariana.auth.v1.AuthAdminService"


class AuthAdminServicer(pb_grpc.AuthAdminServiceServicer):
    def __init__(self, store: KeyStore) -> None:
        self._store = store

    async def CreateTenant(self, request: pb.CreateTenantRequest, context: Context) -> pb.CreateTenantResponse:
        tenant = await asyncio.to_thread(self._store.create_tenant, request.name)
        return pb.CreateTenantResponse(tenant=pb.Tenant(id=tenant.id, name=tenant.name))

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        tenant = await asyncio.to_thread(self._store.find_tenant, request.tenant)
        if tenant is None:
            tenant = await asyncio.to_thread(self._store.create_tenant, request.tenant)
        issued = await asyncio.to_thread(self._store.create_key, tenant.id, request.name)
        return pb.CreateKeyResponse(key_id=issued.key_id, tenant_id=issued.tenant_id, secret=issued.secret)


def register(store: KeyStore) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_AuthAdminServiceServicer_to_server(AuthAdminServicer(store), server)

    return add
