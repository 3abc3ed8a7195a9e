"""Executors read blobs through the pool (``ExecutorPoolService.FetchBlob``), holding no
credentials for the blob store.

The pool runs against the session's nats-server with a real blob store: an S3 bucket
(moto's server) or a local folder. Blobs are put straight into the store, then read
over gRPC: with the raw stub (the contract), with the Python SDK's ``PoolBlobResolver``,
through a Python Worker's default resolver, and with the TypeScript SDK's resolver in
a Node process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from tests.support.nats_server import new_tenant
from tests.support.s3_server import S3Bucket
from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.executor_pool.server import ExecutorPoolService, build
from tickmesh.runtime import nats as runtime_nats
from tickmesh.runtime.blobs import BlobStore, LocalBlobStore, payload_sha256
from tickmesh.runtime.blobs_s3 import S3BlobStore
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.sdk import (
    NotFoundError,
    PoolBlobResolver,
    TaskContext,
    ValidationError,
    Worker,
    decode_envelope,
    encode_envelope,
    execution_id,
    task,
    uuid7,
)
from tickmesh.v1 import (
    envelope_pb2,
    executor_pool_service_pb2,
    executor_pool_service_pb2_grpc,
    graph_pb2,
    header_pb2,
    payload_pb2,
    result_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
TS_SDK = ROOT / "sdk/typescript/dist/sdk/typescript/src/index.js"
MIB = 1024 * 1024
# Over 2 MiB and not a multiple of the chunk size: three chunks, the last one short.
BIG = random.Random(11).randbytes(2 * MIB + 123_457)
TENANT_KEY = "x-tickmesh-tenant"
S3_PREFIX = "pool/blobs"


@dataclass
class BlobPool:
    """A running pool serving two tenants, its blob store, and ways to reach around it."""

    kind: str
    tenant: str
    other: str
    """A second tenant the pool serves."""
    store: BlobStore
    service: ExecutorPoolService
    channel: grpc.aio.Channel
    uri_for: Callable[[str, str], str]
    """The store's URI of (tenant, sha256)."""
    overwrite: Callable[[str, bytes], Awaitable[None]]
    """Replace the bytes stored at a URI behind the store's back."""
    foreign_uri: Callable[[str], str]
    """A URI of another store, in this store's layout, for a tenant's sha256."""
    nc: NatsClient
    workers: list[Worker] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.service.target

    @property
    def fetches(self) -> int:
        return self.service.pool.stats.blob_fetches

    async def fetch(
        self, uri: str, *, sha256: str = "", tenant: str | None = None
    ) -> tuple[payload_pb2.BlobRef, list[bytes]]:
        """Call FetchBlob with the raw stub: the ref and the chunks as sent."""
        stub = executor_pool_service_pb2_grpc.ExecutorPoolServiceStub(self.channel)
        metadata = () if tenant == "" else ((TENANT_KEY, tenant or self.tenant),)
        call = stub.FetchBlob(
            executor_pool_service_pb2.FetchBlobRequest(uri=uri, sha256=sha256),
            metadata=metadata,
            timeout=30,
        )
        responses = [response async for response in call]
        assert responses, "no ref"
        assert responses[0].WhichOneof("part") == "blob"
        assert all(r.WhichOneof("part") == "chunk" for r in responses[1:])
        return responses[0].blob, [r.chunk for r in responses[1:]]

    async def refused(
        self, uri: str, *, sha256: str = "", tenant: str | None = None
    ) -> tuple[grpc.StatusCode, str]:
        """The status a FetchBlob call fails with."""
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await self.fetch(uri, sha256=sha256, tenant=tenant)
        return failed.value.code(), failed.value.details() or ""


def _local_layout(store: LocalBlobStore) -> tuple[Any, Any, Any]:
    def uri_for(tenant: str, sha256: str) -> str:
        return store.path_for(tenant, sha256).as_uri()

    async def overwrite(uri: str, data: bytes) -> None:
        path = Path(uri.removeprefix("file://"))
        await asyncio.to_thread(path.write_bytes, data)

    def foreign_uri(tenant: str) -> str:
        return f"s3://bucket/{tenant}/ab/{'ab' * 32}"

    return uri_for, overwrite, foreign_uri


def _s3_layout(bucket: S3Bucket, store: S3BlobStore) -> tuple[Any, Any, Any]:
    async def overwrite(uri: str, data: bytes) -> None:
        key = uri.removeprefix(f"s3://{bucket.name}/")
        async with bucket.endpoint.client() as s3:
            await s3.put_object(Bucket=bucket.name, Key=key, Body=data)

    def foreign_uri(tenant: str) -> str:
        return f"file:///{S3_PREFIX}/{tenant}/ab/{'ab' * 32}"

    return store.uri_for, overwrite, foreign_uri


@pytest.fixture(params=["s3", "local"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, S3Bucket | None]:
    """Which store the pool uses; the S3 bucket is only requested (and moto started) for s3."""
    if request.param == "s3":
        return "s3", request.getfixturevalue("s3_bucket")
    return "local", None


@pytest.fixture
async def blob_pool(
    store_kind: tuple[str, S3Bucket | None], nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[BlobPool]:
    kind, bucket = store_kind
    tenant, other = new_tenant(), new_tenant()
    nc = await runtime_nats.connect(nats_server.url, name=f"test:{tenant}")
    js = runtime_nats.jetstream(nc)
    for name in (tenant, other):
        await ensure_tenant(js, name)
    store: BlobStore
    if bucket is not None:
        s3_store = await bucket.store(prefix=S3_PREFIX).open()
        store = s3_store
        uri_for, overwrite, foreign_uri = _s3_layout(bucket, s3_store)
    else:
        local = LocalBlobStore(tmp_path / "blobs", fsync=False)
        store = local
        uri_for, overwrite, foreign_uri = _local_layout(local)
    settings = ExecutorPoolSettings(
        tenants=[tenant, other], grpc_listen="127.0.0.1:0", blob_url=str(tmp_path / "unused")
    )
    service = await build(settings, nc=nc, js=js, blobs=store)
    await service.start()
    channel = grpc.aio.insecure_channel(service.target)
    pool = BlobPool(
        kind,
        tenant,
        other,
        store,
        service,
        channel,
        uri_for,
        overwrite,
        foreign_uri,
        nc,
    )
    try:
        yield pool
    finally:
        for worker in pool.workers:
            await worker.shutdown(grace=1.0)
        await channel.close()
        await service.stop(grace=0.5)
        await store.close()
        await nc.close()


# --- the contract ------------------------------------------------------------------------


async def test_fetch_blob_streams_the_ref_then_chunks_of_at_most_1_mib(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, BIG, "application/x-tar")

    got, chunks = await blob_pool.fetch(ref.uri)

    assert (got.uri, got.sha256, got.size) == (ref.uri, payload_sha256(BIG), len(BIG))
    assert [len(c) for c in chunks] == [MIB, MIB, len(BIG) - 2 * MIB]
    assert b"".join(chunks) == BIG
    # The expected digest, when given, must be the blob's.
    _, again = await blob_pool.fetch(ref.uri, sha256=ref.sha256)
    assert b"".join(again) == BIG
    assert blob_pool.fetches == 2


async def test_fetch_blob_streams_an_empty_blob_as_its_ref_alone(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, b"", "text/plain")

    got, chunks = await blob_pool.fetch(ref.uri)

    assert (got.size, got.sha256, chunks) == (0, payload_sha256(b""), [])


async def test_fetch_blob_refuses_another_tenants_uri(blob_pool: BlobPool) -> None:
    theirs = await blob_pool.store.put(blob_pool.other, b"their secret", "text/plain")

    code, details = await blob_pool.refused(theirs.uri)

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert f"not one of tenant {blob_pool.tenant!r}'s blobs" in details
    # The owner reads it; asking with the other tenant's id needs its credentials.
    _, chunks = await blob_pool.fetch(theirs.uri, tenant=blob_pool.other)
    assert b"".join(chunks) == b"their secret"
    assert blob_pool.fetches == 1


async def test_fetch_blob_refuses_uris_outside_the_tenants_prefix(blob_pool: BlobPool) -> None:
    ours = await blob_pool.store.put(blob_pool.tenant, b"ours", "text/plain")
    digest = ours.sha256
    sneaky = ours.uri.replace(
        f"/{blob_pool.tenant}/", f"/{blob_pool.tenant}/../{blob_pool.other}/", 1
    )
    for uri in (blob_pool.foreign_uri(blob_pool.tenant), sneaky, f"{ours.uri}?x=1", "no uri"):
        code, details = await blob_pool.refused(uri)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (uri, details)
    assert (await blob_pool.refused(""))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert (await blob_pool.refused(ours.uri, sha256="ABC"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert (await blob_pool.refused(ours.uri, sha256=digest.upper()))[
        0
    ] == grpc.StatusCode.INVALID_ARGUMENT
    assert blob_pool.fetches == 0


async def test_fetch_blob_serves_only_the_pools_tenants(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, b"data", "text/plain")

    code, details = await blob_pool.refused(ref.uri, tenant=new_tenant())
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "unknown tenant" in details
    assert (await blob_pool.refused(ref.uri, tenant="Not A Tenant"))[
        0
    ] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = await blob_pool.refused(ref.uri, tenant="")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert TENANT_KEY in details


async def test_fetch_blob_reports_a_missing_blob_as_not_found(blob_pool: BlobPool) -> None:
    digest = payload_sha256(b"never stored")

    code, details = await blob_pool.refused(blob_pool.uri_for(blob_pool.tenant, digest))

    assert code == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in details


async def test_fetch_blob_detects_a_corrupted_object(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, BIG, "application/octet-stream")
    await blob_pool.overwrite(ref.uri, BIG[:-1] + b"\x00")

    code, details = await blob_pool.refused(ref.uri)

    assert code == grpc.StatusCode.DATA_LOSS
    assert "sha256" in details
    assert blob_pool.fetches == 0


async def test_fetch_blob_refuses_a_blob_that_is_not_the_expected_one(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, b"these bytes", "text/plain")

    code, details = await blob_pool.refused(ref.uri, sha256=payload_sha256(b"other bytes"))

    assert code == grpc.StatusCode.DATA_LOSS
    assert "not the expected" in details


# --- the Python SDK ------------------------------------------------------------------------


async def test_pool_blob_resolver_downloads_through_the_pool(
    blob_pool: BlobPool, tmp_path: Path
) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, BIG, "application/octet-stream")
    theirs = await blob_pool.store.put(blob_pool.other, b"theirs", "text/plain")
    missing = blob_pool.uri_for(blob_pool.tenant, payload_sha256(b"never stored"))
    # A local folder's files exist here too: a root elsewhere makes the resolver download them.
    resolver = PoolBlobResolver(blob_pool.target, root=tmp_path / "not-mounted")
    try:
        assert await resolver.resolve(blob_pool.tenant, ref.uri, ref.sha256, ref.size) == BIG
        assert await resolver.resolve(blob_pool.tenant, ref.uri, "", 0) == BIG
        assert blob_pool.fetches == 2

        with pytest.raises(ValidationError, match="PERMISSION_DENIED"):
            await resolver.resolve(blob_pool.tenant, theirs.uri, theirs.sha256, theirs.size)
        with pytest.raises(NotFoundError):
            await resolver.resolve(blob_pool.tenant, missing, "", 0)
        with pytest.raises(ValidationError, match="DATA_LOSS"):
            await resolver.resolve(blob_pool.tenant, ref.uri, payload_sha256(b"x"), 0)
        with pytest.raises(ValidationError, match=f"as {len(BIG)} bytes, not 5"):
            await resolver.resolve(blob_pool.tenant, ref.uri, ref.sha256, 5)
        await blob_pool.overwrite(ref.uri, b"tampered")
        with pytest.raises(ValidationError, match="DATA_LOSS"):
            await resolver.resolve(blob_pool.tenant, ref.uri, ref.sha256, ref.size)
    finally:
        await resolver.close()


@pytest.mark.parametrize("store_kind", ["local"], indirect=True)
async def test_pool_blob_resolver_reads_local_files_without_the_pool(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, BIG, "application/octet-stream")
    resolver = PoolBlobResolver(blob_pool.target)
    try:
        assert await resolver.resolve(blob_pool.tenant, ref.uri, ref.sha256, ref.size) == BIG
        assert blob_pool.fetches == 0
        await blob_pool.overwrite(ref.uri, b"tampered")
        with pytest.raises(ValidationError, match="sha256/size"):
            await resolver.resolve(blob_pool.tenant, ref.uri, ref.sha256, ref.size)
        assert blob_pool.fetches == 0
    finally:
        await resolver.close()


async def test_worker_reads_a_blob_input_through_the_pool_by_default(blob_pool: BlobPool) -> None:
    ref = await blob_pool.store.put(blob_pool.tenant, BIG, "application/octet-stream")

    @task
    async def digest(ctx: TaskContext, data: bytes) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    worker = Worker(blob_pool.target, tenant=blob_pool.tenant, tasks=[digest])
    blob_pool.workers.append(worker)
    await worker.__aenter__()
    async with asyncio.timeout(5):
        await worker.wait_connected()
    names = TenantNames(blob_pool.tenant)
    records = await runtime_nats.jetstream(blob_pool.nc).pull_subscribe(
        names.exec_all, durable="test_records", stream=names.exec_stream
    )
    await _publish_task(
        blob_pool,
        "digest",
        payload_pb2.Payload(
            content_type="application/octet-stream", blob=ref, size=ref.size, sha256=ref.sha256
        ),
    )

    [msg] = await records.fetch(1, timeout=10)
    await msg.ack()
    result = decode_envelope(msg.data, expected_kind="task_execution").task_execution.result
    assert result.status == result_pb2.TASK_STATUS_SUCCEEDED, result.error.message
    assert json.loads(result.output.inline) == {"sha256": ref.sha256, "size": len(BIG)}
    # The S3 store's blobs can only have come from the pool; local files were read directly.
    assert blob_pool.fetches == (1 if blob_pool.kind == "s3" else 0)


async def _publish_task(pool: BlobPool, handler: str, payload: payload_pb2.Payload) -> None:
    lifetime_id = uuid7()
    exec_id = execution_id(pool.tenant, lifetime_id, [], "step", 1)
    envelope = envelope_pb2.ExecutionEnvelope(
        header=header_pb2.EnvelopeHeader(
            envelope_id=uuid7(),
            tenant_id=pool.tenant,
            lifetime_id=lifetime_id,
            execution_id=exec_id,
            attempt=1,
            iteration=1,
            node=header_pb2.NodeRef(id="step", kind=graph_pb2.NODE_KIND_TASK, handler=handler),
            idempotency_key=f"req:{exec_id}",
        )
    )
    envelope.header.created_at.GetCurrentTime()
    envelope.task_request.input.CopyFrom(payload)
    await runtime_nats.jetstream(pool.nc).publish(
        TenantNames(pool.tenant).work("task", handler),
        encode_envelope(envelope),
        headers={HDR_MSG_ID: f"req:{exec_id}", HDR_TYPE: "task_request", HDR_TENANT: pool.tenant},
    )


# --- the TypeScript SDK --------------------------------------------------------------------

_NODE_SCRIPT = """
import { createHash } from "node:crypto";
const [sdk, target, tenant, uri, sha256, size, theirs] = process.argv.slice(1);
const { PoolBlobResolver } = await import(sdk);
const resolver = new PoolBlobResolver(target);
const data = await resolver.resolve(tenant, uri, sha256, Number(size));
let refused = "";
try {
  await resolver.resolve(tenant, theirs, "", 0);
} catch (err) {
  refused = `${err.name}: ${err.message}`;
}
resolver.close();
const digest = createHash("sha256").update(data).digest("hex");
console.log(JSON.stringify({ sha256: digest, size: data.length, refused }));
"""


# The S3 store is the one executors cannot read themselves.
@pytest.mark.parametrize("store_kind", ["s3"], indirect=True)
async def test_typescript_pool_blob_resolver_downloads_through_the_pool(
    blob_pool: BlobPool,
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: this test needs Node.js >= 20", pytrace=False)
    if not TS_SDK.exists():
        pytest.fail(
            f"{TS_SDK.relative_to(ROOT)} is missing: build the TypeScript SDK first "
            "(npm ci && npm run build, or make test-node)",
            pytrace=False,
        )
    ref = await blob_pool.store.put(blob_pool.tenant, BIG, "application/octet-stream")
    theirs = await blob_pool.store.put(blob_pool.other, b"theirs", "text/plain")

    process = await asyncio.create_subprocess_exec(
        node,
        "--input-type=module",
        "-e",
        _NODE_SCRIPT,
        TS_SDK.as_uri(),
        blob_pool.target,
        blob_pool.tenant,
        ref.uri,
        ref.sha256,
        str(ref.size),
        theirs.uri,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()

    answer = json.loads(stdout)
    assert (answer["sha256"], answer["size"]) == (ref.sha256, len(BIG))
    assert answer["refused"].startswith("ValidationError: ")
    assert "PERMISSION_DENIED" in answer["refused"]
    assert blob_pool.fetches == 1
