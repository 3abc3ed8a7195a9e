"""One set of services serves two tenant accounts, each through its own connection.

A nats-server includes the accounts rendered for tenants a and b. One router, state,
guardrail and executor pool (in process, built as ``serve()`` builds them) are given
the tenant directory (``nats_tenant_dir``) and no shared credentials: each holds one
connection per tenant, as that tenant's ``service`` user (the pool: ``executor``).
A lifetime runs for each tenant; the monitoring endpoint shows every service's
connection of a tenant in that tenant's account; the server logs no permission
violation. A record that claims tenant b, published with a's credentials on a's
subject, is dead-lettered in a's account and never stored under b.
"""

from __future__ import annotations

import asyncio

from tests.support.factories import LIFETIME_ID
from tests.support.records import exec_id, execution_record
from tests.support.tenant_accounts import (
    AccountsServer,
    jsz_accounts,
    login,
)
from tests.support.tenant_services import (
    INSTANCE,
    TENANTS,
    WAIT_S,
    Services,
    accounts,
    connz,
    run_hello,
    services,
)
from tickmesh.runtime.subjects import HDR_MSG_ID, HDR_TENANT, HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    SERVICE,
    tenant_streams,
)

__all__ = ["accounts", "services"]  # fixtures


async def test_one_set_of_services_serves_each_tenant_through_its_own_account(
    accounts: AccountsServer, services: Services
) -> None:
    await services.start_all()
    assert services.router is not None
    assert services.pool is not None
    for name, links in services.links.items():
        assert links.is_per_tenant, name
        assert sorted(links.connections()) == sorted(TENANTS), name

    results = await asyncio.gather(
        *(run_hello(services.router.target, services.pool.target, t) for t in TENANTS)
    )
    assert results == [{"greeting": "HELLO, A!"}, {"greeting": "HELLO, B!"}]

    # Every service's connection of a tenant is in that tenant's account, and nothing of
    # the services is anywhere else.
    mine = {
        (c["name"], c.get("account"))
        for c in await connz(accounts.monitor_url)
        if str(c.get("name", "")).endswith(tuple(f" {INSTANCE} {t}" for t in TENANTS))
    }
    assert mine == {
        (f"{service} {INSTANCE} {tenant}", tenant)
        for service in ("state", "guardrail", "router", "executor-pool")
        for tenant in TENANTS
    }
    # The executor pool logged in as each tenant's executor user: its replies use the
    # executor inbox, the only one that user may subscribe to.
    pool_links = services.links["executor-pool"]
    for nc in pool_links.connections().values():
        assert nc.new_inbox().startswith(EXECUTOR_INBOX_PREFIX + ".")
    for nc in services.links["router"].connections().values():
        assert not nc.new_inbox().startswith(EXECUTOR_INBOX_PREFIX)

    assert accounts.violations() == []
    streams = await jsz_accounts(accounts.monitor_url)
    for tenant in TENANTS:
        assert streams[tenant] == sorted(tenant_streams(TenantNames(tenant)))


async def test_a_record_claiming_b_published_with_as_credentials_is_never_stored_under_b(
    accounts: AccountsServer, services: Services
) -> None:
    await services.start_state()
    assert services.store is not None
    a = TenantNames("a")
    raw, _ = execution_record(1, tenant="b")
    # A's executor user may publish records on a's subjects, and on no one else's.
    async with login(
        accounts.url,
        nkeys_seed=str(accounts.seed("a", EXECUTOR)),
        inbox_prefix=EXECUTOR_INBOX_PREFIX,
    ) as executor:
        await executor.js.publish(
            a.exec(LIFETIME_ID),
            raw,
            headers={
                HDR_TYPE: "task_execution",
                HDR_TENANT: "b",
                HDR_MSG_ID: f"forged:{exec_id(1)}",
            },
        )

    async with login(accounts.url, nkeys_seed=str(accounts.seed("a", SERVICE))) as service:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (await service.js.stream_info(a.dlq_stream)).state.messages == 0:
            assert loop.time() < deadline, "the forged record was not dead-lettered in a"
            await asyncio.sleep(0.05)
        dead = await service.js.get_last_msg(a.dlq_stream, a.dlq("exec"))
        assert dead.data == raw
        consumer = await service.js.consumer_info(a.exec_stream, a.state_consumer)
        assert consumer.num_pending == 0
        assert consumer.num_ack_pending == 0

    for tenant in TENANTS:
        assert await services.store.get_execution(tenant, exec_id(1)) is None
        assert await services.store.list_executions(tenant, LIFETIME_ID) == []
    async with login(accounts.url, nkeys_seed=str(accounts.seed("b", SERVICE))) as b_service:
        b = TenantNames("b")
        for stream in (b.exec_stream, b.dlq_stream):
            assert (await b_service.js.stream_info(stream)).state.messages == 0
    assert accounts.violations() == []
