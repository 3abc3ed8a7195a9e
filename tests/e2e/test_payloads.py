"""Large payloads travel through the blob store, intact, end to end."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from tests.support.audit import record_of
from tests.support.mesh import MeshFactory
from tickmesh.runtime.blobs import DEFAULT_INLINE_LIMIT
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
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
