"""A tenant's lifetime events cannot fill its account's JetStream storage.

The event stream keeps events for 7 days. In a tenant account with a storage limit (1 GiB
by default), a busy tenant's events alone would reach the limit within hours; from then
on JetStream refuses every write of that tenant (work, records, the router's state), and
the tenant stops. So the event stream may hold at most a share of the account's storage
and drops its oldest events past it (a watch reads what the stream dropped from the state
service). Against a real nats-server with tenant accounts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from nats.js.errors import APIError

from tests.support.nats_configs import NatsServers
from tests.support.tenant_accounts import AccountsServer, login, provision, start_accounts_server
from tickmesh.runtime.streams import (
    EVENT_LIMIT_KEY,
    EVENT_STORAGE_SHARE,
    ensure_tenant,
    event_stream_bytes,
    fit_event_stream,
)
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import SERVICE, Limits

STORAGE = 1 << 20
A = TenantNames("a")


@pytest.fixture
async def server(servers: NatsServers, tmp_path: Path) -> AccountsServer:
    limits = Limits(max_memory=STORAGE, max_storage=STORAGE, max_streams=16, max_consumers=32)
    made = start_accounts_server(servers, tmp_path, {"a": limits}, probes=("a",))
    await provision(made, "a")
    return made


def test_the_event_streams_share_of_storage() -> None:
    assert event_stream_bytes(None, replicas=1) is None  # unlimited account: age only
    assert event_stream_bytes(STORAGE, replicas=1) == STORAGE // EVENT_STORAGE_SHARE
    # Each replica counts against the account.
    assert event_stream_bytes(3 * STORAGE, replicas=3) == STORAGE // EVENT_STORAGE_SHARE


async def test_events_past_the_streams_share_drop_the_oldest_and_the_tenant_keeps_working(
    server: AccountsServer,
) -> None:
    async with login(server.url, nkeys_seed=str(server.seed("a", SERVICE))) as user:
        js = user.js
        # Twice the account's storage in events: every publish is taken.
        event = b"e" * 500
        for _ in range(2 * STORAGE // len(event)):
            await js.publish(A.evb, event, headers={HDR_TYPE: "lifetime_event"})
        info = await js.stream_info(A.evt_stream)
        assert info.config.max_bytes == STORAGE // EVENT_STORAGE_SHARE
        assert info.state.bytes <= STORAGE // EVENT_STORAGE_SHARE
        assert info.state.first_seq > 1, "the oldest events were not dropped"

        # The rest of the account is free for the tenant's work and state.
        for _ in range(200):
            await js.publish(A.work("task", "h"), b"w" * 500, headers={HDR_TYPE: "task_request"})
        kv = await js.key_value(A.router_bucket)
        await kv.put("lt.after-the-flood", b"state")


async def test_a_stream_made_without_the_share_takes_it_and_an_operators_is_kept(
    server: AccountsServer,
) -> None:
    async with login(server.url, nkeys_seed_str=server.probe_seeds["a"]) as admin:
        info = await admin.js.stream_info(A.evt_stream)
        metadata = {k: v for k, v in (info.config.metadata or {}).items() if k != EVENT_LIMIT_KEY}
        # As a version before the limit made it.
        await admin.js.update_stream(replace(info.config, max_bytes=-1, metadata=metadata))
    async with login(server.url, nkeys_seed=str(server.seed("a", SERVICE))) as user:
        await ensure_tenant(user.js, "a")  # as a service starting
        config = (await user.js.stream_info(A.evt_stream)).config
        assert config.max_bytes == STORAGE // EVENT_STORAGE_SHARE
    async with login(server.url, nkeys_seed_str=server.probe_seeds["a"]) as admin:
        await admin.js.update_stream(replace(config, max_bytes=100_000))  # an operator's
    async with login(server.url, nkeys_seed=str(server.seed("a", SERVICE))) as user:
        await ensure_tenant(user.js, "a")
        assert (await user.js.stream_info(A.evt_stream)).config.max_bytes == 100_000
        assert await fit_event_stream(user.js, A, storage=STORAGE // 2) == 100_000


async def test_the_limit_follows_the_accounts_storage_and_trims_the_stream(
    server: AccountsServer,
) -> None:
    async with login(server.url, nkeys_seed=str(server.seed("a", SERVICE))) as user:
        js = user.js
        for _ in range(STORAGE // EVENT_STORAGE_SHARE // 500):
            await js.publish(A.evb, b"e" * 500, headers={HDR_TYPE: "lifetime_event"})
        # The account's storage halved (`tickmesh tenant limits` then fits the stream).
        assert await fit_event_stream(js, A, storage=STORAGE // 2) == STORAGE // 8
        info = await js.stream_info(A.evt_stream)
        assert info.config.max_bytes == STORAGE // 8
        assert info.state.bytes <= STORAGE // 8  # dropped at once, oldest first
        assert info.state.first_seq > 1
        # ...and raised again.
        assert await fit_event_stream(js, A, storage=STORAGE) == STORAGE // EVENT_STORAGE_SHARE
        assert (
            await js.stream_info(A.evt_stream)
        ).config.max_bytes == STORAGE // EVENT_STORAGE_SHARE


async def test_the_service_users_update_cannot_lift_the_streams_protection(
    server: AccountsServer,
) -> None:
    async with login(server.url, nkeys_seed=str(server.seed("a", SERVICE))) as user:
        config = (await user.js.stream_info(A.evt_stream)).config
        for lifted in (replace(config, deny_purge=False), replace(config, deny_delete=False)):
            with pytest.raises(APIError) as refused:
                await user.js.update_stream(lifted)
            assert refused.value.err_code == 10052, refused.value  # "can not cancel"
        after = (await user.js.stream_info(A.evt_stream)).config
        assert (after.deny_purge, after.deny_delete) == (True, True)
