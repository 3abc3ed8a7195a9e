"""Large payloads travel through the blob store, intact, end to end."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest

from tests.support.audit import record_of
from tests.support.mesh import MeshFactory
from tickmesh.runtime.blobs import DEFAULT_INLINE_LIMIT
from tickmesh.sdk import (
    Client,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    ValidationError,
    complete,
    plan,
    task,
)

SIZE = 5 * 1024 * 1024


async def test_a_5_mib_output_goes_through_the_blob_store_intact(start_mesh: MeshFactory) -> None:
    h = await start_mesh()
    data = random.Random(5).randbytes(SIZE)
    digest = hashlib.sha256(data).hexdigest()

    @task
    async def produce(ctx: TaskContext, value: Any) -> bytes:
        return data

    @plan
    async def check(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        received = inputs[0].output
        assert isinstance(received, bytes)
        return complete({"size": len(received), "sha256": hashlib.sha256(received).hexdigest()})

    await h.worker([produce, check])
    graph = await h.register(
        GraphBuilder("big")
        .task("produce")
        .plan("check")
        .edge("produce", "check")
        .final("check")
        .build()
    )

    handle = await h.start(graph, {})
    output = await handle.result(within=10)

    assert output == {"size": SIZE, "sha256": digest}
    report = await h.audit(handle.id)
    [stored] = report.of_node("produce")
    payload = stored.task_execution.result.output
    assert payload.WhichOneof("data") == "blob"
    assert payload.content_type == "application/octet-stream"
    assert payload.blob.size == SIZE
    assert payload.blob.sha256 == digest
    # The store's own URI: a file in the embedded profile, an S3 object in the cloud one
    # (which the Worker, holding no S3 credentials, read through the pool's FetchBlob).
    assert payload.blob.uri.startswith("s3://" if h.mesh.config.blob_url else "file://")
    assert (payload.size, payload.sha256) == (SIZE, digest)
    # The record itself stays small: the bytes are not inline anywhere in it.
    assert stored.ByteSize() < DEFAULT_INLINE_LIMIT
    # The plan's record (its decision carries the digest, not the bytes) is small too.
    [decided] = report.of_node("check")
    assert record_of(decided).ByteSize() < DEFAULT_INLINE_LIMIT


async def test_a_large_lifetime_output_is_read_by_a_client_given_the_pool(
    start_mesh: MeshFactory,
) -> None:
    h = await start_mesh()
    data = random.Random(7).randbytes(2 * DEFAULT_INLINE_LIMIT)

    @plan
    async def finish(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return complete(data)

    await h.worker([finish])
    graph = await h.register(GraphBuilder("big-output").plan("finish").final("finish").build())
    handle = await h.start(graph, {})
    if not h.mesh.config.blob_url:  # the embedded profile's file:// blobs are read directly
        assert await handle.result(within=10) == data

    async with await Client.connect(
        h.mesh.router_target, tenant=h.tenant, pool=h.mesh.pool_target
    ) as client:
        output = await client.handle(handle.id).result(within=10)
    assert output == data
    info = await handle.describe()
    assert info.raw.output.WhichOneof("data") == "blob"
    if h.mesh.config.blob_url:
        # Without the pool, an S3 blob is not readable here, and the error says what to do.
        with pytest.raises(ValidationError, match="pool="):
            await handle.result(within=10)
