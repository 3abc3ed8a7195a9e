"""Tenants rendered as NATS accounts cannot see, write, list or consume each other.

A real nats-server runs the accounts configuration rendered from a registry of three
tenants (a, b, c), each provisioned with its streams. Every cross-tenant attempt by
a's service and executor users is asserted to fail the way NATS makes it fail: a
permission violation for the subject (the user's allow-list names only its own
tenant's subjects and streams). A test-only "probe" user in a's account, with no
permissions at all, shows that the account is the boundary on its own: b's subjects
do not exist there and b's streams are "not found". Inside a's account, the users
hold least privilege; a's JetStream limits stop a without touching b.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from tests.support.nats_configs import NatsServers
from tests.support.tenant_accounts import (
    AccountsServer,
    Login,
    login,
    provision,
    start_accounts_server,
)
from tickmesh.runtime.consumer import BatchConsumer, durable_config
from tickmesh.runtime.nats import Outgoing, publish_batch
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    SERVICE,
    Limits,
    tenant_streams,
)

A, B, C = TenantNames("a"), TenantNames("b"), TenantNames("c")
ROLES = (SERVICE, EXECUTOR)
QUIET_S = 0.5
"""How long a subscription must stay silent to count as having seen nothing."""


@pytest.fixture
async def tenants(servers: NatsServers, tmp_path: Path) -> AccountsServer:
    """Tenants a, b and c, provisioned; a probe user in a's account. a's limits are
    small (8 streams: its own 7 and one more; 1 MiB on disk; 8 consumers)."""
    small = Limits(max_memory=1 << 20, max_storage=1 << 20, max_streams=8, max_consumers=8)
    server = start_accounts_server(
        servers, tmp_path, {"a": small, "b": Limits(), "c": Limits()}, probes=("a",)
    )
    for tenant in ("a", "b", "c"):
        await provision(server, tenant)
    return server


def _as(server: AccountsServer, tenant: str, role: str) -> AbstractAsyncContextManager[Login]:
    options: dict[str, str] = {"nkeys_seed": str(server.seed(tenant, role))}
    if role == EXECUTOR:
        options["inbox_prefix"] = EXECUTOR_INBOX_PREFIX
    return login(server.url, **options)


def _probe(server: AccountsServer, tenant: str) -> AbstractAsyncContextManager[Login]:
    return login(server.url, nkeys_seed_str=server.probe_seeds[tenant])


async def _silent(received: list[Msg]) -> None:
    await asyncio.sleep(QUIET_S)
    assert [m.subject for m in received] == []


async def _b_publishes(server: AccountsServer) -> None:
    """b's service writes to its streams and to a core subject, as a running tenant does."""
    async with _as(server, "b", SERVICE) as b:
        await b.nc.publish(B.cancel, b"cancel")
        ack = await b.js.publish(B.evb, b"event", headers={HDR_TYPE: "lifetime_event"})
        assert ack.stream == B.evt_stream
        await b.nc.flush()
        assert b.errors == []


async def _stream_names(user: Login) -> list[str]:
    msg = await user.nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=2)
    return sorted(json.loads(msg.data)["streams"] or [])


async def _b_count(server: AccountsServer, stream: str) -> int:
    async with _as(server, "b", SERVICE) as b:
        info = await b.js.stream_info(stream)
        return int(info.state.messages)


# --- a's users against b --------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_a_cannot_subscribe_to_b(tenants: AccountsServer, role: str) -> None:
    async with _as(tenants, "a", role) as a:
        received: list[Msg] = []

        async def keep(msg: Msg) -> None:
            received.append(msg)

        for subject in (B.root + ".>", B.cancel, B.evt_all, ">"):
            await a.nc.subscribe(subject, cb=keep)
            await a.violation("Subscription", subject)
        await _b_publishes(tenants)
        await _silent(received)


@pytest.mark.parametrize("role", ROLES)
async def test_a_cannot_publish_into_b(tenants: AccountsServer, role: str) -> None:
    before = await _b_count(tenants, B.work_stream)
    async with _as(tenants, "a", role) as a:
        for subject in (B.work("task", "h"), B.exec("lt1"), B.cancel):
            await a.nc.publish(subject, b"forged")
            await a.violation("Publish", subject)
        # Through JetStream: the publish never reaches a stream, so no PubAck comes back.
        with pytest.raises(asyncio.TimeoutError):
            await a.js.publish(B.work("task", "h"), b"forged", timeout=0.5)
    assert await _b_count(tenants, B.work_stream) == before


@pytest.mark.parametrize("role", ROLES)
async def test_a_cannot_reach_b_through_the_jetstream_api(
    tenants: AccountsServer, role: str
) -> None:
    request = json.dumps({"stream_name": B.work_stream, "config": {"durable_name": "x"}})
    async with _as(tenants, "a", role) as a:
        subjects = (
            f"$JS.API.STREAM.INFO.{B.work_stream}",
            f"$JS.API.STREAM.INFO.{B.exec_stream}",
            f"$JS.API.STREAM.MSG.GET.{B.evt_stream}",
            f"$JS.API.DIRECT.GET.{B.evt_stream}",
            f"$JS.API.CONSUMER.CREATE.{B.work_stream}",
            f"$JS.API.CONSUMER.CREATE.{B.work_stream}.x.{B.work_all}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{B.work_stream}.x",
            f"$JS.API.CONSUMER.CREATE.{B.exec_stream}.x.{B.exec_all}",
            f"$JS.API.CONSUMER.MSG.NEXT.{B.work_stream}.pool_task_h",
            f"$JS.API.STREAM.DELETE.{B.work_stream}",
            f"$JS.API.STREAM.PURGE.{B.evt_stream}",
            "$JS.API.STREAM.LIST",
        )
        await a.denied_requests(subjects, request.encode())


async def test_a_service_lists_only_its_own_streams(tenants: AccountsServer) -> None:
    async with _as(tenants, "a", SERVICE) as a:
        names = await _stream_names(a)
    assert names == sorted(tenant_streams(A))


async def test_a_executor_cannot_list_streams(tenants: AccountsServer) -> None:
    async with _as(tenants, "a", EXECUTOR) as a:
        await a.denied_requests(["$JS.API.STREAM.NAMES"])


# --- the account boundary alone -------------------------------------------------------


async def test_the_account_is_the_boundary_without_any_permission(
    tenants: AccountsServer,
) -> None:
    """A user of a's account with no permissions block at all still cannot see b."""
    async with _probe(tenants, "a") as probe:
        received: list[Msg] = []

        async def keep(msg: Msg) -> None:
            received.append(msg)

        everything = await probe.nc.subscribe(">", cb=keep)
        await probe.nc.flush()
        await _b_publishes(tenants)
        await _silent(received)
        await everything.unsubscribe()

        # b's streams do not exist in a's account.
        with pytest.raises(NotFoundError) as info:
            await probe.js.stream_info(B.work_stream)
        assert info.value.err_code == 10059  # stream not found
        with pytest.raises(NotFoundError) as consumer:
            await probe.js.add_consumer(
                B.work_stream, ConsumerConfig(durable_name="x", filter_subject=B.work_all)
            )
        assert consumer.value.err_code == 10059
        assert await _stream_names(probe) == sorted(tenant_streams(A))

        # A publish to b's work subject has no stream to land in.
        before = await _b_count(tenants, B.work_stream)
        with pytest.raises(NoStreamResponseError):
            await probe.js.publish(B.work("task", "h"), b"forged")
        assert await _b_count(tenants, B.work_stream) == before
        assert probe.errors == []


# --- least privilege inside a's account -------------------------------------------------


async def test_a_executor_holds_least_privilege_in_its_account(tenants: AccountsServer) -> None:
    request = json.dumps({"stream_name": A.exec_stream, "config": {"durable_name": "x"}})
    async with _as(tenants, "a", EXECUTOR) as a:
        subjects = (
            f"$JS.API.CONSUMER.CREATE.{A.exec_stream}",
            f"$JS.API.CONSUMER.CREATE.{A.exec_stream}.x.{A.exec_all}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{A.exec_stream}.x",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{A.evt_stream}.x",
            f"$JS.API.CONSUMER.CREATE.{A.work_stream}.x.{A.exec_all}",
            f"$JS.API.CONSUMER.DELETE.{A.work_stream}.pool_task_h",
            f"$JS.API.STREAM.INFO.{A.exec_stream}",
            f"$JS.API.STREAM.MSG.GET.{A.exec_stream}",
            f"$JS.API.DIRECT.GET.{A.exec_stream}",
            f"$JS.API.DIRECT.GET.KV_{A.router_bucket}",
            f"$JS.API.STREAM.CREATE.{A.work_stream}",
            f"$JS.API.STREAM.UPDATE.{A.work_stream}",
            f"$JS.API.STREAM.DELETE.{A.work_stream}",
            f"$JS.API.STREAM.PURGE.{A.work_stream}",
        )
        await a.denied_requests(subjects, request.encode())
        for subject in (
            A.work("task", "h"),
            A.ref("lt1"),
            A.evt("lt1"),
            f"$KV.{A.router_bucket}.x",
        ):
            await a.nc.publish(subject, b"x")
            await a.violation("Publish", subject)
        for subject in ("_INBOX.>", A.exec_all, A.work_all, f"$KV.{A.policy_bucket}.>"):
            await a.nc.subscribe(subject)
            await a.violation("Subscription", subject)


async def test_a_service_cannot_delete_or_purge_its_streams_or_consumers(
    tenants: AccountsServer,
) -> None:
    async with _as(tenants, "a", SERVICE) as a:
        await a.denied_requests(
            [
                f"$JS.API.STREAM.{verb}.{stream}"
                for stream in tenant_streams(A)
                for verb in ("DELETE", "PURGE", "UPDATE")
                # Its byte limit follows the account's storage (test_event_stream_limits).
                if (verb, stream) != ("UPDATE", A.evt_stream)
            ]
            + [
                f"$JS.API.CONSUMER.DELETE.{A.exec_stream}.{A.state_consumer}",
                f"$JS.API.CONSUMER.DELETE.{A.ref_stream}.{A.router_consumer}",
            ]
        )


async def test_records_cannot_vanish_even_with_the_whole_api(tenants: AccountsServer) -> None:
    """deny_delete and deny_purge on the streams stop even a user allowed everything."""
    async with _as(tenants, "a", SERVICE) as a:
        ack = await a.js.publish(A.evb, b"kept", headers={HDR_TYPE: "lifetime_event"})
    async with _probe(tenants, "a") as probe:
        with pytest.raises(APIError) as purge:
            await probe.js.purge_stream(A.evt_stream)
        assert (purge.value.err_code, purge.value.description) == (
            10110,
            "stream purge not permitted",
        )
        with pytest.raises(APIError) as delete:
            await probe.js.delete_msg(A.evt_stream, ack.seq)
        assert (delete.value.err_code, delete.value.description) == (
            10057,
            "message delete not permitted",
        )
        info = await probe.js.stream_info(A.evt_stream)
        assert info.state.messages == 1


async def test_a_executor_does_its_work_with_its_grants(tenants: AccountsServer) -> None:
    """The executor pool's bus operations, with the runtime's own code: create its durable
    consumer on the work stream, pull and ack a request, publish an execution record,
    hear a cancellation."""
    async with _as(tenants, "a", SERVICE) as service:
        await service.js.publish(
            A.work("task", "h"), b"request", headers={HDR_TYPE: "task_request"}
        )
    async with _as(tenants, "a", EXECUTOR) as a:
        js = a.js
        got: asyncio.Queue[Msg] = asyncio.Queue()

        async def handle(batch: list[Msg]) -> None:
            for msg in batch:
                await msg.ack_sync()
                await got.put(msg)

        cancels: list[Msg] = []

        async def on_cancel(msg: Msg) -> None:
            cancels.append(msg)

        await a.nc.subscribe(A.cancel, cb=on_cancel)
        consumer = BatchConsumer(
            a.nc,
            js,
            stream=A.work_stream,
            config=durable_config(A.work_consumer("task", "h"), A.work("task", "h"), ack_wait_s=30),
            handler=handle,
        )
        await consumer.start()
        try:
            msg = await asyncio.wait_for(got.get(), 5)
        finally:
            await consumer.stop()
        assert msg.data == b"request"
        info = await js.consumer_info(A.work_stream, A.work_consumer("task", "h"))
        assert info.num_ack_pending == 0
        acks = await publish_batch(
            js, [Outgoing(A.exec("lt1"), b"record", {HDR_TYPE: "task_execution"})]
        )
        assert acks[0].stream == A.exec_stream
        async with _as(tenants, "a", SERVICE) as service:
            await service.nc.publish(A.cancel, b"stop")
            await service.nc.flush()
        await asyncio.sleep(0.2)
        assert [m.data for m in cancels] == [b"stop"]
        assert a.errors == []
    assert tenants.violations() == []


# --- limits -------------------------------------------------------------------------------


async def test_a_limits_stop_a_and_not_b(tenants: AccountsServer) -> None:
    async with _probe(tenants, "a") as probe:
        # Streams: a holds its 7; the 8th fits, the 9th does not.
        await probe.js.add_stream(StreamConfig(name="EXTRA1", subjects=["extra1"]))
        with pytest.raises(APIError) as streams:
            await probe.js.add_stream(StreamConfig(name="EXTRA2", subjects=["extra2"]))
        assert (streams.value.err_code, streams.value.description) == (
            10027,
            "maximum number of streams reached",
        )
        # Consumers: 8 in all.
        for n in range(8):
            await probe.js.add_consumer(
                A.evt_stream, ConsumerConfig(durable_name=f"c{n}", filter_subject=A.evb)
            )
        with pytest.raises(APIError) as consumers:
            await probe.js.add_consumer(
                A.evt_stream, ConsumerConfig(durable_name="c8", filter_subject=A.evb)
            )
        assert (consumers.value.err_code, consumers.value.description) == (
            10026,
            "maximum consumers limit reached",
        )
    # Storage: 1 MiB on disk; a's service fills it with 64 KiB dead letters (not events:
    # the event stream holds at most a quarter of it, dropping its oldest past that).
    payload = b"x" * (64 << 10)
    failed_at, failure = None, None
    async with _as(tenants, "a", SERVICE) as a:
        for n in range(40):
            try:
                await a.js.publish(A.dlq(f"lt{n}"), payload, headers={HDR_TYPE: "dead_letter"})
            except APIError as exc:
                failed_at, failure = n, exc
                break
    assert failure is not None
    assert (failure.err_code, failure.description) == (
        10002,
        "resource limits exceeded for account",
    )
    assert failed_at == 15  # 15 events of 64 KiB fit in 1 MiB with their headers; not 16
    # b is untouched by all of it.
    async with _as(tenants, "b", SERVICE) as b:
        for _ in range(20):
            ack = await b.js.publish(B.evb, payload, headers={HDR_TYPE: "lifetime_event"})
            assert ack.stream == B.evt_stream
        info = await b.js.account_info()
        assert info.limits.max_streams == Limits().max_streams
