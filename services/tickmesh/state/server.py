"""Assembles the state service: store, blobs, per-tenant consumers, gRPC."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.blobs import BlobStore, LocalBlobStore
from tickmesh.runtime.grpc_server import GrpcServer, create_server
from tickmesh.runtime.lifecycle import serve_until_stopped, version
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.sdk import ConfigError, NotFoundError
from tickmesh.v1 import header_pb2, state_service_pb2_grpc

from .config import StateSettings
from .consumer import RecordConsumer
from .servicer import StateServicer
from .store import SQLiteStateStore, StateStore

logger = logging.getLogger(__name__)
SERVICE_NAME = "tickmesh.v1.StateService"


@dataclass
class StateService:
    settings: StateSettings
    nc: NatsClient
    js: JetStreamContext
    store: StateStore
    blobs: BlobStore
    grpc: GrpcServer
    consumers: dict[str, RecordConsumer] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.grpc.target

    def consumer(self, tenant: str) -> RecordConsumer:
        try:
            return self.consumers[tenant]
        except KeyError:
            raise NotFoundError(f"unknown tenant {tenant!r}") from None

    async def start(self) -> None:
        for tenant in self.settings.tenants:
            await self.add_tenant(tenant)
        await self.grpc.server.start()
        await self.grpc.set_serving(SERVICE_NAME, True)
        logger.info("state serving on %s", self.target)

    async def add_tenant(self, tenant: str) -> None:
        if tenant in self.consumers:
            return
        names = await ensure_tenant(self.js, tenant)
        producer = header_pb2.Producer(
            service="state", version=version(), instance=self.settings.instance
        )
        consumer = RecordConsumer(
            self.nc,
            self.js,
            self.store,
            names,
            producer,
            max_batch=self.settings.max_batch,
            ack_wait_s=self.settings.ack_wait_s,
        )
        await consumer.start()
        self.consumers[tenant] = consumer

    async def stop(self) -> None:
        await self.grpc.set_serving(SERVICE_NAME, False)
        for consumer in self.consumers.values():
            await consumer.stop()
        await self.grpc.stop(self.settings.shutdown_grace_s)
        await self.store.close()
        await self.blobs.close()


async def open_store(settings: StateSettings) -> StateStore:
    url = settings.store_url
    if url.startswith("sqlite:///"):
        return await SQLiteStateStore.open(
            url.removeprefix("sqlite:///"),
            synchronous=settings.sqlite_synchronous,
        )
    raise ConfigError(f"unsupported store_url {url!r}: expected sqlite:///<path>")


async def build(
    settings: StateSettings, *, nc: NatsClient, store: StateStore, blobs: BlobStore
) -> StateService:
    js = tm_nats.jetstream(nc)
    grpc_server = await create_server(
        settings.grpc_listen, max_message_bytes=settings.max_message_bytes
    )
    service = StateService(settings, nc, js, store, blobs, grpc_server)
    servicer = StateServicer(store, blobs, service.consumer, tenants=settings.tenants)
    state_service_pb2_grpc.add_StateServiceServicer_to_server(servicer, grpc_server.server)
    return service


async def serve(settings: StateSettings) -> None:
    async def make(nc: NatsClient) -> StateService:
        store = await open_store(settings)
        return await build(settings, nc=nc, store=store, blobs=LocalBlobStore(settings.blob_root))

    await serve_until_stopped(settings, "state", make)
