"""Executor pool pieces that need no sockets: hello checks, frame merging, publishing,
what a record carries inline."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.executor_pool.pool import (
    MAX_HANDLERS,
    ExecutorPool,
    Lease,
    check_hello,
    merge_frames,
)
from tickmesh.runtime.blobs import DEFAULT_INLINE_LIMIT, BlobStore, LocalBlobStore, resolve_payload
from tickmesh.runtime.nats import Outgoing
from tickmesh.runtime.tenant_links import TenantLinks
from tickmesh.sdk import ValidationError
from tickmesh.v1 import executor_pool_service_pb2 as pb
from tickmesh.v1 import graph_pb2, payload_pb2, result_pb2


def hello(**overrides: object) -> pb.ExecutorHello:
    fields: dict[str, object] = {
        "executor_id": "x",
        "concurrency": 4,
        "handlers": [
            pb.HandlerSpec(name="fetch", kind=graph_pb2.NODE_KIND_TASK, code_digest="d1"),
            pb.HandlerSpec(name="decide", kind=graph_pb2.NODE_KIND_PLAN, code_digest="d2"),
        ],
    }
    fields.update(overrides)
    return pb.ExecutorHello(**fields)  # type: ignore[arg-type]


def test_a_valid_hello_lists_its_handlers() -> None:
    assert check_hello(hello()) == {("task", "fetch"): "d1", ("plan", "decide"): "d2"}
    most = [pb.HandlerSpec(name=f"h{n}", kind=graph_pb2.NODE_KIND_TASK) for n in range(1000)]
    assert len(check_hello(hello(handlers=most))) == MAX_HANDLERS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"handlers": []}, "at least one handler"),
        ({"concurrency": 0}, "concurrency"),
        ({"protocol_version": 2}, "protocol version"),
        ({"handlers": [pb.HandlerSpec(name="a.b", kind=graph_pb2.NODE_KIND_TASK)]}, "handler"),
        ({"handlers": [pb.HandlerSpec(name="a")]}, "TASK or PLAN"),
        (
            {
                "handlers": [
                    pb.HandlerSpec(name=f"h{n}", kind=graph_pb2.NODE_KIND_TASK)
                    for n in range(MAX_HANDLERS + 1)
                ]
            },
            "hello announces 1,001 handlers; one executor may serve at most 1,000",
        ),
    ],
)
def test_a_bad_hello_is_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        check_hello(hello(**overrides))


def assign(*ids: str) -> pb.ConnectResponse:
    return pb.ConnectResponse(
        assignments=pb.Assignments(items=[pb.Assignment(assignment_id=i) for i in ids])
    )


def cancel(*ids: str) -> pb.ConnectResponse:
    return pb.ConnectResponse(
        cancellations=pb.Cancellations(items=[pb.Cancellation(assignment_id=i) for i in ids])
    )


def summary(frames: list[pb.ConnectResponse]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for frame in frames:
        kind = frame.WhichOneof("message")
        assert kind is not None
        items = getattr(frame, kind).items if kind in ("assignments", "cancellations") else []
        out.append((kind, [i.assignment_id for i in items]))
    return out


def test_queued_frames_of_one_kind_merge_into_one() -> None:
    frames, ended, error = merge_frames([assign("a"), assign("b", "c"), cancel("x"), cancel("y")])
    assert summary(frames) == [("assignments", ["a", "b", "c"]), ("cancellations", ["x", "y"])]
    assert (ended, error) == (False, None)


def test_merging_keeps_cancellations_and_assignments_in_order() -> None:
    frames, _, _ = merge_frames([assign("a"), cancel("a"), assign("b")])
    assert summary(frames) == [
        ("assignments", ["a"]),
        ("cancellations", ["a"]),
        ("assignments", ["b"]),
    ]


def test_merging_stops_at_the_end_marker() -> None:
    drain = pb.ConnectResponse(drain=pb.Drain(reason="bye"))
    error = ValidationError("bad frame")
    frames, ended, raised = merge_frames([assign("a"), drain, error, assign("late")])
    assert summary(frames) == [("assignments", ["a"]), ("drain", [])]
    assert ended
    assert raised is error
    assert merge_frames([None])[1:] == (True, None)


def _pool(blobs: BlobStore | None = None) -> ExecutorPool:
    return ExecutorPool(
        ExecutorPoolSettings(),
        links=cast(TenantLinks, None),
        blobs=cast(BlobStore, blobs),
    )


def _publish(tenant: str) -> tuple[Lease, list[Outgoing]]:
    lease = cast(Lease, SimpleNamespace(group=SimpleNamespace(tenant=tenant)))
    return lease, [Outgoing(f"tm.{tenant}.exec.l", b"", {})]


async def test_one_tenants_records_are_published_from_the_settling_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A task per tenant would put a loop hop before the publish (latency at M = 1).
    pool = _pool()
    ran: list[tuple[str, asyncio.Task[Any] | None]] = []

    async def publish_and_ack_tenant(tenant: str, items: object) -> None:
        ran.append((tenant, asyncio.current_task()))

    monkeypatch.setattr(pool, "_publish_and_ack_tenant", publish_and_ack_tenant)
    await pool._publish_and_ack([_publish("acme"), _publish("acme")])
    assert ran == [("acme", asyncio.current_task())]


async def test_several_tenants_are_published_concurrently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = _pool()
    ran: list[tuple[str, int]] = []

    async def publish_and_ack_tenant(tenant: str, items: list[object]) -> None:
        ran.append((tenant, len(items)))
        await asyncio.sleep(0)

    monkeypatch.setattr(pool, "_publish_and_ack_tenant", publish_and_ack_tenant)
    await pool._publish_and_ack([_publish("acme"), _publish("beta"), _publish("acme")])
    assert sorted(ran) == [("acme", 2), ("beta", 1)]


def _bytes(fill: int, size: int) -> payload_pb2.Payload:
    return payload_pb2.Payload(content_type="application/octet-stream", inline=bytes([fill]) * size)


@pytest.mark.parametrize(
    ("share", "where"), [(0, "inline"), (52_428, "blob"), (65_536, "inline"), (10, "blob")]
)
async def test_a_task_output_over_its_share_of_a_fan_out_goes_to_a_blob(
    tmp_path: Path, share: int, where: str
) -> None:
    """The request's ``output_inline_limit`` (set on the steps of a fan-out) caps the
    output inline below the pool's own limit; an output of 1 KiB or less stays inline
    under any share."""
    blobs = LocalBlobStore(tmp_path)
    result = result_pb2.TaskResult(output=_bytes(7, 60_000))
    await _pool(blobs)._offload("acme", result, DEFAULT_INLINE_LIMIT, share)
    assert result.output.WhichOneof("data") == where
    assert await resolve_payload(blobs, "acme", result.output) == bytes([7]) * 60_000
    small = result_pb2.TaskResult(output=_bytes(8, 900))
    await _pool(blobs)._offload("acme", small, DEFAULT_INLINE_LIMIT, 1)
    assert small.output.WhichOneof("data") == "inline"


async def test_the_inputs_a_plan_dispatches_share_the_inline_limit(tmp_path: Path) -> None:
    """Each input under the limit, 750 KB together: the largest go to blobs until what
    stays inline is within the limit in all (the requests wait in the state together)."""
    blobs = LocalBlobStore(tmp_path)
    sizes = [250_000, 250_000, 250_000, 500]
    result = result_pb2.PlanResult(
        dispatch=result_pb2.DispatchDecision(
            steps=[
                result_pb2.NextStep(node_id="work", input=_bytes(i, n)) for i, n in enumerate(sizes)
            ]
        )
    )
    await _pool(blobs)._offload("acme", result, DEFAULT_INLINE_LIMIT, 0)
    inputs = [step.input for step in result.dispatch.steps]
    assert [p.WhichOneof("data") for p in inputs].count("blob") == 2
    assert sum(len(p.inline) for p in inputs) <= DEFAULT_INLINE_LIMIT
    assert inputs[-1].WhichOneof("data") == "inline"
    for i, (payload, size) in enumerate(zip(inputs, sizes, strict=True)):
        assert await resolve_payload(blobs, "acme", payload) == bytes([i]) * size
