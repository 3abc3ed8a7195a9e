"""Large payloads travel through the blob store, intact, end to end."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest

from tests.support.audit import record_of
from tests.support.graphs import plan_task_loop
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
    dispatch,
    plan,
    step,
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


def _fill(index: int, size: int) -> bytes:
    """``size`` bytes that differ from one branch to the next."""
    return bytes([65 + index]) * size


async def test_a_wide_join_of_large_outputs_gathers_every_output_intact(
    start_mesh: MeshFactory,
) -> None:
    """Five branches each return 250 KB (each under the pool's 256 KiB inline limit): the
    join's inputs, kept in the lifetime's state and carried by the plan's request, would
    be 1.25 MB inline, over what one message holds. Steps dispatched together share one
    output budget, so these outputs go to the blob store and the plan reads every one
    intact; small outputs of a fan-out stay inline. Replay reproduces the lifetime."""
    h = await start_mesh()
    seen: list[list[tuple[str, int, str]]] = []

    @plan(name="gather")
    async def gather(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if inputs:
            got = [(i.status, len(i.output), hashlib.sha256(i.output).hexdigest()) for i in inputs]
            seen.append(got)
            return complete(sorted(got))
        return dispatch(
            *(step("write", {"i": i, "size": goal["size"]}) for i in range(goal["branches"]))
        )

    @task(name="write")
    async def write(ctx: TaskContext, ask: dict[str, int]) -> bytes:
        return _fill(ask["i"], ask["size"])

    await h.worker([gather, write])
    graph = await h.register(plan_task_loop("joined", "gather", "write", max_iterations=20))
    for branches, size, where in ((5, 250_000, "blob"), (5, 10_000, "inline")):
        handle = await h.start(graph, {"branches": branches, "size": size})
        output = await handle.result(within=30)
        expected = sorted(
            ["succeeded", size, hashlib.sha256(_fill(i, size)).hexdigest()] for i in range(branches)
        )
        assert output == expected, (branches, size)
        report = await h.audit(handle.id)
        written = report.of_node("write")
        assert len(written) == branches
        assert {s.task_execution.result.output.WhichOneof("data") for s in written} == {where}
        replayed = await handle.replay(handlers=[gather, write])
        assert replayed.reproduced, replayed.divergences


async def test_a_wide_fan_out_of_large_inputs_runs(start_mesh: MeshFactory) -> None:
    """A plan dispatching three steps of 262 KB inputs each (each just under the inline
    limit, 786 KB in all: one record's worth) in a lifetime whose goal is 262 KB too: the
    requests wait in the lifetime's state until they are published, beside the goal,
    which made the state too large to write.
    The inputs dispatched together travel inline up to one budget in all, the rest by
    reference."""
    h = await start_mesh()

    @plan(name="spread")
    async def spread(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        if inputs:
            return complete(sorted(i.output for i in inputs))
        return dispatch(*(step("measure", _fill(i, goal["size"])) for i in range(3)))

    @task(name="measure")
    async def measure(ctx: TaskContext, data: bytes) -> list[Any]:
        return [len(data), hashlib.sha256(data).hexdigest()]

    await h.worker([spread, measure])
    graph = await h.register(plan_task_loop("spread", "spread", "measure", max_iterations=20))
    size = 262_000
    handle = await h.start(graph, {"size": size, "notes": "n" * size})
    output = await handle.result(within=30)
    assert output == sorted([size, hashlib.sha256(_fill(i, size)).hexdigest()] for i in range(3))
    report = await h.audit(handle.id)
    [decided, _] = report.of_node("spread")
    steps = decided.plan_execution.result.dispatch.steps
    inline = sum(len(s.input.inline) for s in steps if s.input.WhichOneof("data") == "inline")
    assert inline <= DEFAULT_INLINE_LIMIT
    replayed = await handle.replay(handlers=[spread, measure])
    assert replayed.reproduced, replayed.divergences
