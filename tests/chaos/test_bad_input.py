"""★ 11, 13, 14. Bad input on the bus: malformed records, unknown fields, oversized results
(RELIABILITY.md §4.2).

What is already covered elsewhere, and not repeated here:

* tests/unit/sdk/test_convert.py: the decoder refuses each malformed shape on its own
  (Struct 33 deep, invalid UTF-8, wrong body, empty), keeps unknown fields, and refuses an
  envelope over ``max_bytes`` with advice;
* tests/e2e/test_bus.py: random bytes, a wrong body and a missing type header on the record
  subject are dead-lettered by the in-process state service, with one error event each;
* tests/unit/state/test_store_contract.py: the store keeps unknown fields byte for byte;
* tests/e2e/test_payloads.py: a 5 MiB output travels through the blob store, intact.

Added here, against the state service and the pool running as processes:

* 11: every malformed shape on the record subject, at once (random bytes, a truncated
  envelope, protobuf of another type, invalid UTF-8, a Struct 33 deep, NaN in a Struct, an
  empty payload, a missing and an unknown type header, and two records that decode but
  that the store would refuse: headers naming different executions, a lifetime id that is
  no subject token): each dead-lettered with its reason, ``+TERM``ed (a MSG_TERMINATED
  advisory with the reason), one error event each for the lifetime its header names, no
  row stored, the service still SERVING, and its
  ``tickmesh_dead_letters_total{kind="exec"}`` up by exactly the number of cases;
* 13: a record with field numbers no version uses, published by a "newer producer": stored,
  and the stored bytes are the published bytes;
* 14: a result over the inline limit is offloaded by the pool (URI + sha256 in a small
  record); an envelope over NATS ``max_payload`` fails locally with a clear error and never
  reaches the stream. Figures: record size, blob size, upload time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message as pb_message
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError
from prometheus_client.parser import text_string_to_metric_families

from tests.chaos import report
from tests.chaos.auditor import audit_lifetime
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import Cluster, figure
from tests.support.ports import free_port
from tests.support.records import UNKNOWN_FIELD_NUMBER, execution_record, unknown_field
from tickmesh.runtime.blobs import DEFAULT_INLINE_LIMIT
from tickmesh.runtime.subjects import (
    HDR_EXECUTION,
    HDR_LIFETIME,
    HDR_MSG_ID,
    HDR_REASON,
    HDR_TYPE,
)
from tickmesh.sdk import (
    MAX_ENVELOPE_BYTES,
    MAX_STRUCT_DEPTH,
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    ValidationError,
    complete,
    decode_envelope,
    encode_envelope,
    plan,
    task,
    uuid7,
)
from tickmesh.v1 import envelope_pb2, lifetime_pb2

HDR_CASE = "Chaos-Case"
"""Names the malformed case; the dead-letter copy keeps the message's headers."""

WAIT_S = 10.0


# --- helpers -----------------------------------------------------------------------------


async def until(check: Callable[[], bool], *, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.02)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text: str = reply.read().decode()
    return text


async def dead_letters(url: str, tenant: str, kind: str) -> float:
    """``tickmesh_dead_letters_total{tenant, kind}`` as the service serves it (0 if unset)."""
    text = await asyncio.to_thread(_scrape, url)
    for family in text_string_to_metric_families(text):
        if family.name != "tickmesh_dead_letters":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                "tenant": tenant,
                "kind": kind,
            }:
                return float(sample.value)
    return 0.0


async def health(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the health stubs are untyped
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def stored_rows(cluster: Cluster) -> list[tuple[str, str, bytes]]:
    """(lifetime id, execution id, envelope bytes) of every row in the state store."""
    path = cluster.work_dir / "state.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT lifetime_id, execution_id, envelope FROM executions WHERE tenant = ?",
            (cluster.tenant,),
        ).fetchall()
    return [(str(a), str(b), bytes(c)) for a, b, c in rows]


def nested_struct(levels: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    cur = root
    for _ in range(levels - 1):
        cur = cur.fields["n"].struct_value
    cur.fields["leaf"].number_value = 1
    return root


def _truncated(raw: bytes) -> bytes:
    """The longest prefix of the first half of ``raw`` that protobuf cannot parse."""
    for cut in range(len(raw) // 2, 0, -1):
        try:
            envelope_pb2.ExecutionEnvelope.FromString(raw[:cut])
        except pb_message.DecodeError:
            return raw[:cut]
    raise AssertionError("every prefix parses")


def malformed_cases(tenant: str, lifetime_id: str) -> list[tuple[str, bytes, str | None]]:
    """(case, payload, Tickmesh-Type header or None) for each malformed record."""
    n = iter(range(1, 100))

    def record(**kw: Any) -> tuple[bytes, envelope_pb2.ExecutionEnvelope]:
        return execution_record(next(n), tenant=tenant, lifetime_id=lifetime_id, **kw)

    raw, _ = record()
    utf8 = bytearray(record()[0])
    utf8[utf8.index(b"coding")] = 0xC3  # starts a 2-byte sequence that never completes
    _, deep = record()
    deep.task_execution.result.error.details.CopyFrom(nested_struct(MAX_STRUCT_DEPTH + 1))
    _, nan = record()
    nan.task_execution.result.error.details.fields["score"].number_value = math.nan
    valid, _ = record()
    _, disagree = record()
    disagree.header.execution_id = "f" * 32  # the record's own header keeps its id
    _, untokened = execution_record(next(n), tenant=tenant, lifetime_id="not a.token")
    return [
        ("random bytes", random.Random(11).randbytes(300), "task_execution"),
        ("truncated envelope", _truncated(raw), "task_execution"),
        (
            "protobuf of the wrong type",
            lifetime_pb2.LifetimeEvent(sequence=3).SerializeToString(),  # parses, no header
            "task_execution",
        ),
        ("invalid UTF-8 in a string field", bytes(utf8), "task_execution"),
        ("Struct 33 levels deep", deep.SerializeToString(), "task_execution"),
        ("NaN in a Struct", nan.SerializeToString(), "task_execution"),
        ("empty payload", b"", "task_execution"),
        ("headers that disagree", disagree.SerializeToString(), "task_execution"),
        ("lifetime id that is no subject token", untokened.SerializeToString(), "task_execution"),
        ("missing Tickmesh-Type header", valid, None),
        ("unknown Tickmesh-Type header", valid, "task_execution_v9"),
    ]


# --- 11 ----------------------------------------------------------------------------------


async def test_each_malformed_record_is_dead_lettered_once_and_the_state_service_serves(
    start_cluster: ClusterFactory,
) -> None:
    metrics_port = free_port()
    cluster = await start_cluster(
        ["state"], env={"TICKMESH_STATE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    names = cluster.names
    target = str(uuid7())  # a lifetime nobody started
    cases = malformed_cases(cluster.tenant, target)
    loop = asyncio.get_running_loop()

    letters: list[Msg] = []
    advisories: list[dict[str, Any]] = []
    errors: list[lifetime_pb2.LifetimeEvent] = []

    async def on_letter(msg: Msg) -> None:
        letters.append(msg)

    async def on_advisory(msg: Msg) -> None:
        advisories.append(json.loads(msg.data))

    async def on_event(msg: Msg) -> None:
        errors.append(decode_envelope(msg.data, expected_kind="lifetime_event").lifetime_event)

    assert cluster.nc is not None
    await cluster.nc.subscribe(names.dlq("exec"), cb=on_letter)
    await cluster.nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{names.exec_stream}.>", cb=on_advisory
    )
    await cluster.nc.subscribe(names.evt(target), cb=on_event)
    await cluster.nc.flush()
    pid = cluster.services["state"].pid
    before = await dead_letters(metrics_url, cluster.tenant, "exec")

    began = loop.time()
    for case, data, kind in cases:
        headers = {HDR_CASE: case, HDR_LIFETIME: target, HDR_MSG_ID: f"bad:{uuid7()}"}
        if kind is not None:
            headers[HDR_TYPE] = kind
        await cluster.js.publish(names.exec(target), data, headers=headers)
    await cluster.wait_drained(names.exec_stream, names.state_consumer, within=WAIT_S)
    # Asserted below, after the figure: a case that was stored instead shows there.
    with contextlib.suppress(AssertionError):
        await until(
            lambda: len(letters) >= len(cases) and len(advisories) >= len(cases),
            within=2.0,
            what="every malformed record dead-lettered and terminated",
        )
    all_out_s = loop.time() - began
    await asyncio.sleep(0.3)  # anything beyond one per case would have arrived by now
    after = await dead_letters(metrics_url, cluster.tenant, "exec")
    status = await health(cluster.state_target)
    rows = stored_rows(cluster)
    state_left = await cluster.js.consumer_info(names.exec_stream, names.state_consumer)
    # No router runs here: the stream keeps its copy of each record for the router, which
    # drops them by the same check.
    exec_held = (await cluster.js.stream_info(names.exec_stream)).state.messages

    reasons = {
        (m.headers or {}).get(HDR_CASE, "?"): (m.headers or {}).get(HDR_REASON, "") for m in letters
    }
    lines = "\n".join(f"  {case:34} {reasons.get(case, '(none)')[:110]}" for case, _, _ in cases)
    figure(
        f"11 malformed records: {len(cases)} published, {len(letters)} dead-lettered and "
        f"{len(advisories)} terminated in {all_out_s:.2f} s; dead-letter counter "
        f"{before:.0f} -> {after:.0f}; {len(errors)} error events; rows {len(rows)}; "
        f"state {status}; reasons:\n{lines}"
    )
    report.record(
        report.Row(
            test="11 malformed records",
            fault=f"{len(cases)} malformed records on the record subject",
            attempted=len(cases),
            acked=0,
            persisted=len(rows),
            lost=0,
            duplicated=len(letters) - len(cases),
            recovery_s=all_out_s,
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    assert sorted(reasons) == sorted(case for case, _, _ in cases), reasons
    assert all(reasons.values()), reasons
    assert len(letters) == len(cases)
    assert sorted(m.data for m in letters) == sorted(d for _, d, _ in cases)
    assert len(advisories) == len(cases)
    assert all(a.get("reason") for a in advisories), advisories
    assert len(errors) == len(cases)
    assert {(e.kind, e.sequence) for e in errors} == {
        (lifetime_pb2.LIFETIME_EVENT_KIND_DEAD_LETTERED, 0)
    }
    assert after - before == len(cases)
    assert rows == []
    assert (state_left.num_pending, state_left.num_ack_pending) == (0, 0)
    assert exec_held == len(cases)
    assert status == "SERVING"
    assert cluster.services["state"].pid == pid
    assert cluster.services["state"].running


# --- 13 ----------------------------------------------------------------------------------


async def test_a_record_with_unknown_fields_is_stored_byte_for_byte(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster(["state"])
    names = cluster.names
    lifetime_id = str(uuid7())
    # A length-delimited and a varint field no version of ExecutionEnvelope uses.
    extra = unknown_field(b"from a newer producer") + b"\xf8\x3e\x05"  # field 999 = 5
    raw, env = execution_record(7, tenant=cluster.tenant, lifetime_id=lifetime_id, extra=extra)
    assert decode_envelope(raw, expected_kind="task_execution") == env

    loop = asyncio.get_running_loop()
    began = loop.time()
    ack = await cluster.js.publish(
        names.exec(lifetime_id),
        raw,
        headers={
            HDR_TYPE: "task_execution",
            HDR_LIFETIME: lifetime_id,
            HDR_EXECUTION: env.header.execution_id,
            HDR_MSG_ID: f"exec:{env.header.execution_id}",
        },
    )
    await cluster.wait_drained(names.exec_stream, names.state_consumer, within=WAIT_S)
    stored_s = loop.time() - began
    [(row_lifetime, row_execution, stored)] = stored_rows(cluster)

    figure(
        f"13 unknown fields: record {len(raw)} bytes ({len(extra)} of them unknown fields "
        f"{UNKNOWN_FIELD_NUMBER} and 999), stored in {stored_s:.3f} s, stored bytes equal: "
        f"{stored == raw}"
    )
    report.record(
        report.Row(
            test="13 unknown fields",
            fault="record with 2 unknown field numbers",
            attempted=1,
            acked=1 if not ack.duplicate else 0,
            persisted=1,
            lost=0,
            duplicated=0,
            recovery_s=stored_s,
        )
    )
    assert (row_lifetime, row_execution) == (lifetime_id, env.header.execution_id)
    assert stored == raw


# --- 14 ----------------------------------------------------------------------------------

BIG = DEFAULT_INLINE_LIMIT + 64 * 1024
"""Over the pool's inline limit (256 KiB), under NATS max_payload: offloaded, not refused."""


@task
async def produce(ctx: TaskContext, size: int) -> bytes:
    return random.Random(size).randbytes(size)


@plan
async def check(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    received = inputs[0].output
    assert isinstance(received, bytes)
    return complete({"size": len(received), "sha256": hashlib.sha256(received).hexdigest()})


async def test_an_oversized_result_is_offloaded_and_an_oversized_envelope_fails_locally(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster()
    names = cluster.names
    expected = random.Random(BIG).randbytes(BIG)
    digest = hashlib.sha256(expected).hexdigest()
    await cluster.worker([produce, check])
    client = await cluster.client()
    graph = await client.register_graph(
        GraphBuilder("oversized")
        .task("produce")
        .plan("check")
        .edge("produce", "check")
        .final("check")
        .build()
    )
    handle = await client.start_lifetime(graph.id, BIG, version=graph.version)
    output = await handle.result(within=WAIT_S)
    found = await audit_lifetime(
        cluster.state_target, cluster.tenant, handle.id, router_target=cluster.router_target
    )
    [produced] = found.of_node("produce")
    record = produced.task_execution
    payload = record.result.output
    blob_path = Path(payload.blob.uri.removeprefix("file://"))
    finished_ns = record.finished_at.ToNanoseconds()
    blob_stat = await asyncio.to_thread(blob_path.stat)
    upload_s = (blob_stat.st_mtime_ns - finished_ns) / 1e9
    to_stored_s = (produced.persisted_at.ToNanoseconds() - finished_ns) / 1e9
    record_bytes = produced.ByteSize()

    # The same bytes inline: refused by the encoder, with advice, before any publish ...
    inline = envelope_pb2.ExecutionEnvelope()
    inline.header.CopyFrom(record.header)
    inline.task_execution.CopyFrom(record)
    inline.task_execution.result.output.inline = random.Random(1).randbytes(MAX_ENVELOPE_BYTES)
    with pytest.raises(ValidationError, match="blob store") as refused:
        encode_envelope(inline)
    # ... and, serialized behind the encoder's back, refused by the NATS client locally.
    before = (await cluster.js.stream_info(names.exec_stream)).state.messages
    with pytest.raises(MaxPayloadError):
        await cluster.js.publish(
            names.exec(handle.id),
            inline.SerializeToString(),
            headers={HDR_TYPE: "task_execution", HDR_MSG_ID: f"big:{uuid7()}"},
        )
    await asyncio.sleep(0.2)
    after = (await cluster.js.stream_info(names.exec_stream)).state.messages
    assert cluster.nc is not None
    server_max = cluster.nc.max_payload

    figure(
        f"14 oversized result: {BIG} B output -> blob {payload.blob.uri.rsplit('/', 1)[-1][:12]}… "
        f"({payload.blob.size} B), record {record_bytes} B; finished -> blob written "
        f"{upload_s * 1000:.1f} ms, finished -> stored {to_stored_s * 1000:.1f} ms; "
        f"{inline.ByteSize()} B inline envelope: encoder says {str(refused.value)[:90]!r}, "
        f"raw publish over max_payload {server_max} B: MaxPayloadError, stream "
        f"{before} -> {after}"
    )
    report.record(
        report.Row(
            test="14 oversized result",
            fault=f"{BIG} B result; {inline.ByteSize()} B inline envelope",
            attempted=2,
            acked=1,
            persisted=len(found.records),
            lost=len(found.lost),
            duplicated=len(found.duplicates),
            recovery_s=to_stored_s,
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    assert output == {"size": BIG, "sha256": digest}
    assert payload.WhichOneof("data") == "blob"
    assert payload.blob.uri.startswith("file://")
    assert (payload.blob.size, payload.blob.sha256) == (BIG, digest)
    blob = await asyncio.to_thread(blob_path.read_bytes)
    assert hashlib.sha256(blob).hexdigest() == digest
    assert record_bytes < DEFAULT_INLINE_LIMIT // 16
    assert not found.lost
    assert not found.duplicates
    assert after == before
    assert inline.ByteSize() > server_max
