"""★ 16-21. Security: tenants as NATS accounts, least privilege, the gRPC edge, the
configuration lint (RELIABILITY.md §4.2).

tests/chaos/SECURITY.md maps every assertion of tests 16-21 to the test that proves it;
most are proven elsewhere (tenant isolation and CLI, gRPC security, blobs, deployment).
Added here, against real nats-servers and gRPC servers built as the services build theirs:

* 16: an import of an export restricted to a PLATFORM account is refused by
  ``nats-server -t`` (tickmesh's own check), at start and on reload, and the importer
  receives nothing of it; with imports in place (nats-server #3108), a stream that captures
  every subject of its account holds what the account imported and nothing else;
* 17: the executor user cannot read the record (envelope) stream through any JetStream
  API: message get, direct get, last by subject, the state service's consumer, ordered,
  ephemeral and durable consumers, info, lists, snapshot, KV; nor update, delete or purge
  it; and the one consumer create it holds (on the work stream, any filter) delivers no
  record;
* 19 (outside the ★ subset, timing-bound): a tenant at every one of its limits (stream
  reservation 10047, storage 10002, streams 10027, consumers 10026, created over and over)
  leaves another tenant's publish p99 within 2x of its value alone, with no error;
* 20: an expired (or not yet valid) client certificate fails the handshake; a request one
  byte over the message limit is RESOURCE_EXHAUSTED, at the limit it passes; the SDK client
  gives every call its deadline;
* 21: every config generated for a registry with each kind of tenant passes
  ``nats-server -t``; a running single-node server from deploy/ with its tenants passes
  the lint (``/varz``: monitoring on 127.0.0.1 and ``sync_always``; ``/jsz``: limits on
  every JetStream account; ``/accountz``: no export without ``accounts``; the record
  streams deny delete and purge); so does the embedded server when asked to fsync; and the
  lint reports each problem of a config that has them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from tests.chaos.harness import figure
from tests.support.nats_configs import (
    NatsServerProcess,
    NatsServers,
    UserNkey,
    issue_client_cert,
    make_tls_files,
    new_user_nkey,
    servers,
)
from tests.support.ports import free_port
from tests.support.tenant_accounts import (
    AccountsServer,
    Login,
    login,
    provision,
    register,
    start_accounts_server,
    start_including,
)
from tickmesh.runtime.consumer import durable_config
from tickmesh.runtime.embedded_nats import EmbeddedNats
from tickmesh.runtime.grpc_security import ServerSecurity
from tickmesh.runtime.grpc_server import create_server
from tickmesh.runtime.settings import ServiceSettings
from tickmesh.runtime.streams import stream_configs
from tickmesh.runtime.subjects import HDR_TYPE, TenantNames
from tickmesh.runtime.tenancy import (
    EXECUTOR,
    EXECUTOR_INBOX_PREFIX,
    SERVICE,
    Limits,
    Registry,
    TenantDirectory,
    check_config,
    check_server_config,
    commit,
    render_document,
    tenant_streams,
)
from tickmesh.runtime.tenancy.accounts import HEADER, format_document
from tickmesh.runtime.tenancy.provision import NatsAccess, SystemAccount, connected
from tickmesh.runtime.tenancy.registry import ROLES, now_iso, write_atomic
from tickmesh.sdk import ChannelSecurity, Client, ConfigError
from tickmesh.sdk._client import DEFAULT_TIMEOUT_S
from tickmesh.sdk._transport import create_channel
from tickmesh.v1 import graph_pb2, router_service_pb2, router_service_pb2_grpc

pytestmark = [pytest.mark.chaos]

__all__ = ["servers"]  # fixture

ROOT: Final = Path(__file__).resolve().parents[2]
DEPLOY_NATS: Final = ROOT / "deploy" / "nats"
COMPOSE_NATS: Final = ROOT / "deploy" / "compose" / "nats.conf"
A, B, C = TenantNames("a"), TenantNames("b"), TenantNames("c")
QUIET_S: Final = 0.4
"""How long to wait for messages that must not come."""
DENIED_S: Final = 0.5
"""A request the server drops for a permission violation gets no answer: this long."""
UNLIMITED: Final = 1 << 63
"""An account's JetStream reservation at or above this is nats-server's "unlimited" (-1)."""
SECRET: Final = b"a record the executor must never read"
_VIOLATION: Final = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


def _as(server: AccountsServer, tenant: str, role: str) -> AbstractAsyncContextManager[Login]:
    options: dict[str, str] = {"nkeys_seed": str(server.seed(tenant, role))}
    if role == EXECUTOR:
        options["inbox_prefix"] = EXECUTOR_INBOX_PREFIX
    return login(server.url, **options)


def _denied_publishes(user: Login) -> list[str]:
    """The subjects the server refused ``user`` to publish to (as it reports them)."""
    found: list[str] = _VIOLATION.findall("\n".join(user.errors))
    return found


def _keep(into: list[Msg]) -> Callable[[Msg], Awaitable[None]]:
    async def keep(msg: Msg) -> None:
        into.append(msg)

    return keep


# --- 16: imports of restricted exports; stream capture through imports (#3108) -----------

PLATFORM: Final = "PLATFORM"
NOTICES: Final = {"a": "platform.notice.a.>", "c": "platform.notice.c.>"}
"""What PLATFORM exports to one tenant each (``accounts`` names it)."""
INTERNAL: Final = "platform.internal.>"
"""A stream export restricted to PLATFORM itself."""
INTERNAL_API: Final = "platform.api.>"
"""A service export restricted to PLATFORM itself."""


@dataclass
class PlatformWorld:
    """Tenants a, b and c rendered by tickmesh, plus a test-only PLATFORM account that
    exports a notice stream to a and one to c (each imports its own), and a stream and a
    service restricted to PLATFORM. Each tenant account has a probe user (no
    permissions: only the account's boundary)."""

    servers: NatsServers
    root: Path
    directory: TenantDirectory
    allowed: str
    """The accounts config with the imports the exports allow."""
    forbidden: str
    """The same, plus c importing the stream and the service restricted to PLATFORM."""
    platform: UserNkey
    probes: dict[str, UserNkey]

    def start(self) -> NatsServerProcess:
        write_atomic(self.directory.accounts_path, self.allowed)
        process, _ = start_including(self.servers, self.root)
        return process

    def as_probe(
        self, server: NatsServerProcess, tenant: str
    ) -> AbstractAsyncContextManager[Login]:
        return login(server.url, nkeys_seed_str=self.probes[tenant].seed)

    def as_platform(self, server: NatsServerProcess) -> AbstractAsyncContextManager[Login]:
        return login(server.url, nkeys_seed_str=self.platform.seed)


def _platform_configs(
    registry: Registry, platform: UserNkey, probes: dict[str, UserNkey]
) -> tuple[str, str]:
    document = render_document(registry)
    accounts = document["accounts"]
    accounts[PLATFORM] = {
        "#": "test only: an operator's platform account with restricted exports",
        "users": [{"nkey": platform.public_key}],
        "exports": [
            {"stream": NOTICES["a"], "accounts": ["a"]},
            {"stream": NOTICES["c"], "accounts": ["c"]},
            {"stream": INTERNAL, "accounts": [PLATFORM]},
            {"service": INTERNAL_API, "accounts": [PLATFORM]},
        ],
    }
    for tenant, probe in probes.items():
        accounts[tenant]["users"].append({"#": "test probe", "nkey": probe.public_key})
    for tenant, subject in NOTICES.items():
        accounts[tenant]["imports"] = [{"stream": {"account": PLATFORM, "subject": subject}}]
    allowed = HEADER + "\n" + format_document(document)
    accounts["c"]["imports"] += [
        {"stream": {"account": PLATFORM, "subject": INTERNAL}},
        {"service": {"account": PLATFORM, "subject": INTERNAL_API}},
    ]
    return allowed, HEADER + "\n" + format_document(document)


@pytest.fixture
def platform(servers: NatsServers, tmp_path: Path) -> PlatformWorld:
    directory = TenantDirectory(servers.directory / "tenants")
    registry = register(directory, {t: Limits() for t in ("a", "b", "c")})
    platform_user = new_user_nkey()
    probes = {tenant: new_user_nkey() for tenant in ("a", "b", "c")}
    allowed, forbidden = _platform_configs(registry, platform_user, probes)
    return PlatformWorld(servers, tmp_path, directory, allowed, forbidden, platform_user, probes)


async def test_c_cannot_import_an_export_restricted_to_platform(platform: PlatformWorld) -> None:
    refusals: list[str] = []
    # tickmesh's own check (`tickmesh tenant` runs it before writing anything).
    check_config(platform.allowed)
    with pytest.raises(ConfigError) as checked:
        check_config(platform.forbidden)
    assert f'stream import "{INTERNAL}": stream import not authorized' in str(checked.value)
    assert f'service import "{INTERNAL_API}": service import not authorized' in str(checked.value)
    refusals.append("nats-server -t")
    # A server does not start with it.
    write_atomic(platform.directory.accounts_path, platform.forbidden)
    with pytest.raises(ConfigError, match="stream import not authorized"):
        start_including(platform.servers, platform.root)
    refusals.append("start")
    # A running server refuses to reload it, and keeps its configuration.
    server = platform.start()
    write_atomic(platform.directory.accounts_path, platform.forbidden)
    access = NatsAccess(server.url)
    async with connected(access, platform.directory.system_seed_path, "security test") as nc:
        with pytest.raises(ConfigError, match="stream import not authorized"):
            await SystemAccount(nc).reload()
    refusals.append("reload")

    # Nothing of PLATFORM's restricted exports reaches c; c's own import still works.
    async with (
        platform.as_probe(server, "c") as c,
        platform.as_platform(server) as publisher,
    ):
        # The service: PLATFORM answers, but c's request has no one to go to.
        async def answer(msg: Msg) -> None:
            await msg.respond(b"internal answer")

        await publisher.nc.subscribe(INTERNAL_API, cb=answer)
        await publisher.nc.flush()
        with pytest.raises(NoRespondersError):
            await c.nc.request("platform.api.x", b"", timeout=DENIED_S)
        # The streams: c hears and captures everything under platform.
        received: list[Msg] = []
        await c.nc.subscribe(">", cb=_keep(received))
        await c.js.add_stream(StreamConfig(name="CAPTURE", subjects=["platform.>"]))
        await c.nc.flush()
        for subject in ("platform.internal.x", "platform.notice.c.x", "platform.other"):
            await publisher.nc.publish(subject, subject.encode())
        await publisher.nc.flush()
        await asyncio.sleep(QUIET_S)
        seen = [m.subject for m in received if m.subject.startswith("platform.")]
        captured = (await c.js.stream_info("CAPTURE")).state.messages
        assert seen == ["platform.notice.c.x"]
        assert captured == 1
        assert c.errors == []
        assert publisher.errors == []
    figure(
        f"16 c imports an export restricted to {PLATFORM}: refused by "
        f"{', '.join(refusals)}; of PLATFORM's 3 publishes and 1 service call c got only "
        f"its own import's ({seen}), its capture stream holds {captured}"
    )


async def _captured(user: Login, stream: str) -> list[tuple[str, bytes]]:
    """The (subject, data) of what ``stream`` holds (up to its last sequence now)."""
    info = await user.js.stream_info(stream)
    held: list[tuple[str, bytes]] = []
    if info.state.messages == 0:
        return held
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await user.js.get_msg(stream, seq)
        held.append((str(msg.subject), msg.data or b""))
    return held


async def test_imports_let_no_stream_capture_other_accounts_messages(
    platform: PlatformWorld,
) -> None:
    """nats-server #3108: with stream imports in place, a JetStream stream must hold only
    what its own account publishes and imports. a and c capture every subject (``>``);
    b, whose tickmesh streams exist, captures PLATFORM's and the other tenants' subjects."""
    server = platform.start()
    accounts = AccountsServer(platform.directory, server, 0)
    await provision(accounts, "b")
    async with (
        platform.as_probe(server, "a") as a,
        platform.as_probe(server, "b") as b,
        platform.as_probe(server, "c") as c,
        platform.as_platform(server) as publisher,
        _as(accounts, "b", SERVICE) as b_service,
    ):
        for probe in (a, c):
            await probe.js.add_stream(StreamConfig(name="CAPTURE", subjects=[">"], no_ack=True))
        await b.js.add_stream(
            StreamConfig(name="CAPTURE", subjects=["platform.>", "tm.a.>", "tm.c.>"])
        )
        # Every account publishes: PLATFORM its four subjects, each tenant its own.
        for subject in (
            "platform.notice.a.x",
            "platform.notice.c.x",
            "platform.internal.x",
            "platform.other",
        ):
            await publisher.nc.publish(subject, b"platform")
        await publisher.nc.flush()
        await a.nc.publish(A.cancel, b"a's own")
        await c.nc.publish(C.cancel, b"c's own")
        await b_service.nc.publish(B.cancel, b"b's own")
        ack = await b_service.js.publish(B.evb, b"b's event", headers={HDR_TYPE: "lifetime_event"})
        assert ack.stream == B.evt_stream
        for user in (a, b, c, b_service):
            await user.nc.flush()
        await asyncio.sleep(QUIET_S)

        def foreign(held: list[tuple[str, bytes]], own: TenantNames) -> list[str]:
            """What is not the account's own traffic (its JetStream API, replies, subjects)."""
            mine = ("$JS.", "_INBOX.", own.root + ".")
            return [subject for subject, _ in held if not subject.startswith(mine)]

        def mentions(held: list[tuple[str, bytes]], *markers: bytes) -> list[str]:
            """Held messages whose data names another account's messages or streams."""
            return [subject for subject, data in held if any(m in data for m in markers)]

        a_holds, c_holds = await _captured(a, "CAPTURE"), await _captured(c, "CAPTURE")
        b_holds = await _captured(b, "CAPTURE")
        # The captures work: each holds its account's own message.
        assert A.cancel in [subject for subject, _ in a_holds]
        assert C.cancel in [subject for subject, _ in c_holds]
        assert foreign(a_holds, A) == ["platform.notice.a.x"]
        assert foreign(c_holds, C) == ["platform.notice.c.x"]
        # Nor does any of the account's own API traffic carry the others' messages (the
        # data is read: a's own message is found by its text).
        assert mentions(a_holds, b"a's") == [A.cancel]
        assert mentions(a_holds, b"b's", b"c's", b"TM_B_") == []
        assert mentions(c_holds, b"a's", b"b's", b"TM_B_") == []
        assert b_holds == []
        assert (await b_service.js.stream_info(B.evt_stream)).state.messages == 1
        for user in (a, b, c, publisher, b_service):
            assert user.errors == []
    figure(
        f"16 #3108 stream capture through imports: a's '>' stream holds {len(a_holds)} "
        f"messages, foreign {foreign(a_holds, A)}; c's {len(c_holds)}, foreign "
        f"{foreign(c_holds, C)}; b's capture of platform.>/tm.a.>/tm.c.> holds {len(b_holds)}"
    )


# --- 17: the executor cannot read the record stream ------------------------------------------


async def test_the_executor_cannot_read_the_record_stream_through_any_jetstream_api(
    servers: NatsServers, tmp_path: Path
) -> None:
    """RELIABILITY §0.5's regression test: the record (envelope) stream holds a record and
    the state service's consumer; the executor user tries every JetStream way to read it."""
    server = start_accounts_server(servers, tmp_path, {"a": Limits()})
    await provision(server, "a")
    async with _as(server, "a", SERVICE) as service:
        await service.js.add_consumer(
            A.exec_stream, durable_config(A.state_consumer, A.exec_all, ack_wait_s=30)
        )
        await service.js.publish(A.exec("lt1"), SECRET, headers={HDR_TYPE: "task_execution"})
    exec_stream, state = A.exec_stream, A.state_consumer
    async with _as(server, "a", EXECUTOR) as executor:
        replies: list[Msg] = []
        await executor.nc.subscribe(f"{EXECUTOR_INBOX_PREFIX}.>", cb=_keep(replies))
        js = executor.nc.jetstream(timeout=DENIED_S)

        async def fetch_from(stream: str, durable: str) -> list[Msg]:
            sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
            try:
                return await sub.fetch(1, timeout=DENIED_S)
            finally:
                await sub.unsubscribe()

        async def ordered() -> Msg:
            sub = await js.subscribe(A.exec_all, stream=exec_stream, ordered_consumer=True)
            return await sub.next_msg(timeout=DENIED_S)

        async def ephemeral() -> list[Msg]:
            sub = await js.pull_subscribe(A.exec_all, stream=exec_stream)
            return await sub.fetch(1, timeout=DENIED_S)

        async def kv() -> object:
            bucket = await js.key_value(A.router_bucket)
            return await bucket.get("any")

        # (what is tried, the call, the JetStream API subject the server refuses)
        api: list[tuple[str, Awaitable[object], str]] = [
            ("message get", js.get_msg(exec_stream, 1), f"STREAM.MSG.GET.{exec_stream}"),
            ("direct get", js.get_msg(exec_stream, 1, direct=True), f"DIRECT.GET.{exec_stream}"),
            (
                "last by subject (direct get)",
                js.get_last_msg(exec_stream, A.exec("lt1"), direct=True),
                f"DIRECT.GET.{exec_stream}.{A.exec('lt1')}",
            ),
            (
                "the state service's consumer",
                fetch_from(exec_stream, state),
                f"CONSUMER.MSG.NEXT.{exec_stream}.{state}",
            ),
            ("ordered consumer", ordered(), f"CONSUMER.CREATE.{exec_stream}"),
            ("ephemeral pull consumer", ephemeral(), f"CONSUMER.CREATE.{exec_stream}."),
            (
                "durable pull consumer",
                js.pull_subscribe(A.exec_all, durable="spy", stream=exec_stream),
                f"CONSUMER.INFO.{exec_stream}.spy",
            ),
            ("consumer info", js.consumer_info(exec_stream, state), f"CONSUMER.INFO.{exec_stream}"),
            ("stream info", js.stream_info(exec_stream), f"STREAM.INFO.{exec_stream}"),
            ("KV bucket", kv(), f"STREAM.INFO.KV_{A.router_bucket}"),
            ("consumer delete", js.delete_consumer(exec_stream, state), "CONSUMER.DELETE."),
            ("stream purge", js.purge_stream(exec_stream), f"STREAM.PURGE.{exec_stream}"),
            ("stream delete", js.delete_stream(exec_stream), f"STREAM.DELETE.{exec_stream}"),
        ]
        results = await asyncio.gather(*(call for _, call, _ in api), return_exceptions=True)
        for (what, _, _), result in zip(api, results, strict=True):
            assert isinstance(result, NatsTimeoutError), (what, result)
        # The raw API: every form of consumer create, lists, snapshot (the whole stream),
        # update (a republish or mirror would copy records out), delete and purge of every
        # stream, a mirror of the stream.
        request = json.dumps({"stream_name": exec_stream, "config": {"durable_name": "x"}})
        raw = [
            f"$JS.API.CONSUMER.CREATE.{exec_stream}",
            f"$JS.API.CONSUMER.CREATE.{exec_stream}.x.{A.exec_all}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{exec_stream}.x",
            f"$JS.API.CONSUMER.LIST.{exec_stream}",
            f"$JS.API.CONSUMER.NAMES.{exec_stream}",
            "$JS.API.STREAM.LIST",
            "$JS.API.STREAM.NAMES",
            f"$JS.API.STREAM.SNAPSHOT.{exec_stream}",
            f"$JS.API.STREAM.UPDATE.{exec_stream}",
            "$JS.API.STREAM.CREATE.MIRROR",
            *(
                f"$JS.API.STREAM.{verb}.{stream}"
                for stream in tenant_streams(A)
                for verb in ("DELETE", "PURGE")
            ),
        ]
        await executor.denied_requests(raw, request.encode())
        # Acknowledging (so removing) the records is refused too.
        ack_subject = f"$JS.ACK.{exec_stream}.{state}.1.1.1.0.0"
        await executor.nc.publish(ack_subject, b"+ACK")
        await executor.violation("Publish", ack_subject)

        # The one consumer create the executor holds, on the work stream, takes any filter
        # (the legacy durable form): a consumer filtered to records reads no record.
        created = await executor.nc.request(
            f"$JS.API.CONSUMER.DURABLE.CREATE.{A.work_stream}.spy",
            json.dumps(
                {
                    "stream_name": A.work_stream,
                    "config": {
                        "durable_name": "spy",
                        "filter_subject": A.exec_all,
                        "ack_policy": "explicit",
                    },
                }
            ).encode(),
            timeout=2,
        )
        assert json.loads(created.data).get("error") is None
        with pytest.raises(NatsTimeoutError):
            await fetch_from(A.work_stream, "spy")

        denied = _denied_publishes(executor)
        for what, _, subject in api:
            assert any(d.upper().startswith(f"$JS.API.{subject}".upper()) for d in denied), (
                what,
                denied,
            )
        assert not any(SECRET in m.data for m in replies)
    async with _as(server, "a", SERVICE) as service:
        info = await service.js.consumer_info(exec_stream, state)
        held = (await service.js.stream_info(exec_stream)).state.messages
        record = await service.js.get_msg(exec_stream, 1)
    assert (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (1, 0, 0)
    assert held == 1
    assert record.data == SECRET
    figure(
        f"17 executor vs the record stream {exec_stream}: {len(api)} JetStream API reads and "
        f"changes ({', '.join(what for what, _, _ in api)}) and {len(raw) + 1} raw API "
        f"subjects refused, {len(denied)} permission violations; a work-stream consumer "
        f"filtered to records read 0; the record is still there ({held} held, "
        f"{info.num_pending} pending for the state service, 0 delivered)"
    )


# --- 19: noisy neighbour at every limit ------------------------------------------------------

HAMMER: Final = r"""
import asyncio, collections, json, sys
import nats
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import APIError

async def main(url, seed):
    nc = await nats.connect(url, nkeys_seed_str=seed)
    js = nc.jetstream(timeout=5)
    codes = collections.Counter()
    payload = b"x" * (64 << 10)
    ops = (
        lambda n: js.publish("fill", payload),
        lambda n: js.add_consumer("FILL", ConsumerConfig(durable_name=f"c{n}")),
        lambda n: js.add_stream(StreamConfig(name=f"S{n}", subjects=[f"s{n}"])),
    )
    print("ready", flush=True)
    n = 0
    try:
        while True:
            for op in ops:
                n += 1
                try:
                    await op(n)
                    codes["ok"] += 1
                except APIError as exc:
                    codes[str(exc.err_code)] += 1
                await asyncio.sleep(0.005)
    finally:
        print(json.dumps(codes), flush=True)

try:
    asyncio.run(main(sys.argv[1], sys.argv[2]))
except KeyboardInterrupt:
    pass
"""
"""Tenant a at its limits, in its own process (so its work does not share b's event loop):
publishes into full storage, consumer and stream creates past the limits, one at a time."""
BLOCKS: Final = 40
"""Blocks of b's publishes, alternately with a stopped and with a hammering."""
PER_BLOCK: Final = 50


@pytest.mark.slow_chaos
async def test_a_tenant_at_all_its_limits_leaves_the_others_publish_latency_alone(
    servers: NatsServers, tmp_path: Path
) -> None:
    small = Limits(max_memory=1 << 20, max_storage=1 << 20, max_streams=8, max_consumers=8)
    server = start_accounts_server(servers, tmp_path, {"a": small, "b": Limits()}, probes=("a",))
    await provision(server, "b")
    async with login(server.url, nkeys_seed_str=server.probe_seeds["a"]) as a:
        with pytest.raises(APIError) as reserve:
            await a.js.add_stream(StreamConfig(name="BIG", subjects=["big"], max_bytes=2 << 20))
        assert (reserve.value.err_code, reserve.value.description) == (
            10047,
            "insufficient storage resources available",
        )
        await a.js.add_stream(StreamConfig(name="FILL", subjects=["fill"]))
        refused = None
        for _ in range(40):
            try:
                await a.js.publish("fill", b"x" * (64 << 10))
            except APIError as exc:
                refused = exc.err_code
                break
        assert refused == 10002
    hammer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HAMMER,
        server.url,
        server.probe_seeds["a"],
        stdout=asyncio.subprocess.PIPE,
    )
    assert hammer.stdout is not None
    solo: list[float] = []
    noisy: list[float] = []
    acked = 0
    try:
        assert await asyncio.wait_for(hammer.stdout.readline(), 30) == b"ready\n"
        os.kill(hammer.pid, signal.SIGSTOP)
        async with _as(server, "b", SERVICE) as b:
            for _ in range(20):  # warm-up
                await b.js.publish(B.evb, b"e", headers={HDR_TYPE: "lifetime_event"})
            for block in range(BLOCKS):
                running = block % 2 == 1
                os.kill(hammer.pid, signal.SIGCONT if running else signal.SIGSTOP)
                await asyncio.sleep(0.05)
                for _ in range(PER_BLOCK):
                    started = time.perf_counter()
                    ack = await b.js.publish(B.evb, b"event", headers={HDR_TYPE: "lifetime_event"})
                    (noisy if running else solo).append((time.perf_counter() - started) * 1e3)
                    assert ack.stream == B.evt_stream
                    acked += 1
            held = (await b.js.stream_info(B.evt_stream)).state.messages
            assert b.errors == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hammer.pid, signal.SIGCONT)
            hammer.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(hammer.communicate(), 30)
    codes: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
    assert held == acked + 20
    # a was at every limit, over and over.
    assert {"10002", "10026", "10027"} <= set(codes), codes
    solo_p99, noisy_p99 = _p99(solo), _p99(noisy)
    figure(
        f"19 noisy neighbour: a at its limits (refusals {codes}) while b published "
        f"{len(noisy)} events, interleaved with {len(solo)} alone; b's publish p50/p99 alone "
        f"{statistics.median(solo):.2f}/{solo_p99:.2f} ms, with a "
        f"{statistics.median(noisy):.2f}/{noisy_p99:.2f} ms ({noisy_p99 / solo_p99:.2f}x), "
        f"0 errors\n  ms      alone   with a\n{_histogram(solo, noisy)}"
    )
    assert noisy_p99 <= 2 * solo_p99, (solo_p99, noisy_p99)


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def _histogram(solo: list[float], noisy: list[float]) -> str:
    edges = (0.25, 0.5, 1.0, 2.0, 5.0, float("inf"))
    lines, low = [], 0.0
    for high in edges:
        label = f"<= {high:g}" if high != float("inf") else f"> {low:g}"
        count = [sum(low < v <= high for v in values) for values in (solo, noisy)]
        lines.append(f"  {label:7} {count[0]:6} {count[1]:8}")
        low = high
    return "\n".join(lines)


# --- 20: the gRPC edge -----------------------------------------------------------------------

PROBE_METHOD: Final = "/tickmesh.test.Probe/Size"


class SizeProbe:
    """A gRPC server as the services build theirs (:func:`create_server`), serving one raw
    method that answers with the size of the request it received."""

    def __init__(self) -> None:
        self.calls = 0

    def handler(self) -> grpc.GenericRpcHandler:
        async def size(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self.calls += 1
            return len(request).to_bytes(8, "big")

        return grpc.method_handlers_generic_handler(
            "tickmesh.test.Probe", {"Size": grpc.unary_unary_rpc_method_handler(size)}
        )

    @contextlib.asynccontextmanager
    async def serve(
        self, *, max_message_bytes: int, security: ServerSecurity | None = None
    ) -> AsyncIterator[int]:
        server = await create_server(
            "127.0.0.1:0", max_message_bytes=max_message_bytes, security=security
        )
        server.server.add_generic_rpc_handlers((self.handler(),))
        await server.server.start()
        try:
            yield server.port
        finally:
            await server.stop(0)


async def _size_call(channel: grpc.aio.Channel, request: bytes) -> grpc.StatusCode:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PROBE_METHOD)
    try:
        answer = await call(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert int.from_bytes(answer, "big") == len(request)
    return grpc.StatusCode.OK


async def test_an_expired_client_certificate_fails_the_handshake(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    certificates = {
        "valid": (tls.client_cert, tls.client_key),
        "expired": issue_client_cert(tls, "expired", valid=(now - 2 * day, now - day)),
        "not yet valid": issue_client_cert(tls, "future", valid=(now + day, now + 2 * day)),
    }
    security = ServerSecurity(
        tls_cert=tls.server_cert.read_bytes(),
        tls_key=tls.server_key.read_bytes(),
        client_ca=tls.ca_cert.read_bytes(),
    )
    probe = SizeProbe()
    got: dict[str, grpc.StatusCode] = {}
    async with probe.serve(max_message_bytes=1 << 20, security=security) as port:
        for name, (cert, key) in certificates.items():
            channel_security = ChannelSecurity(
                root_certificates=tls.ca_cert.read_bytes(),
                certificate_chain=cert.read_bytes(),
                private_key=key.read_bytes(),
            )
            async with create_channel(f"localhost:{port}", security=channel_security) as channel:
                got[name] = await _size_call(channel, b"hello")
    figure(f"20 client certificates: {', '.join(f'{n} -> {c.name}' for n, c in got.items())}")
    assert got == {
        "valid": grpc.StatusCode.OK,
        "expired": grpc.StatusCode.UNAVAILABLE,
        "not yet valid": grpc.StatusCode.UNAVAILABLE,
    }
    assert probe.calls == 1  # only the valid certificate reached the handler


async def test_a_request_one_byte_over_the_message_limit_is_resource_exhausted() -> None:
    """At gRPC's own default (4 MiB) and at the services' default ``max_message_bytes``."""
    default = ServiceSettings.model_fields["max_message_bytes"].default
    assert isinstance(default, int)
    got: dict[int, tuple[grpc.StatusCode, grpc.StatusCode]] = {}
    for limit in (4 << 20, default):
        probe = SizeProbe()
        async with (
            probe.serve(max_message_bytes=limit) as port,
            create_channel(f"127.0.0.1:{port}", max_message_bytes=2 * limit) as channel,
        ):
            at = await _size_call(channel, bytes(limit))
            over = await _size_call(channel, bytes(limit + 1))
        got[limit] = (at, over)
        assert probe.calls == 1
    figure(
        "20 message limit: "
        + "; ".join(
            f"{limit} B -> {a.name}, {limit + 1} B -> {o.name}" for limit, (a, o) in got.items()
        )
    )
    assert got == {limit: (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED) for limit in got}


class DeadlineRecorder:
    """A router that only answers GetGraph, and records each call's remaining time."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    def handler(self) -> grpc.GenericRpcHandler:
        async def get_graph(
            request: router_service_pb2.GetGraphRequest,
            context: grpc.aio.ServicerContext[Any, Any],
        ) -> router_service_pb2.GetGraphResponse:
            self.remaining.append(context.time_remaining())
            graph = graph_pb2.AgentGraph(id=request.graph_id)
            return router_service_pb2.GetGraphResponse(graph=graph)

        method = grpc.unary_unary_rpc_method_handler(
            get_graph,
            request_deserializer=router_service_pb2.GetGraphRequest.FromString,
            response_serializer=router_service_pb2.GetGraphResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            "tickmesh.v1.RouterService", {"GetGraph": method}
        )


async def test_the_sdk_client_gives_every_call_its_deadline() -> None:
    """A router that refuses calls without a deadline (``grpc_require_deadline``) serves the
    SDK's client, which gives each call its ``call_timeout``; a bare stub's call without a
    timeout is refused."""
    recorder = DeadlineRecorder()
    server = await create_server(
        "127.0.0.1:0", max_message_bytes=1 << 20, security=ServerSecurity(require_deadline=True)
    )
    server.server.add_generic_rpc_handlers((recorder.handler(),))
    await server.server.start()
    try:
        async with await Client.connect(server.target, tenant="t") as client:
            assert (await client.get_graph("g1")).id == "g1"
        async with await Client.connect(server.target, tenant="t", call_timeout=5) as client:
            assert (await client.get_graph("g2")).id == "g2"
        async with create_channel(server.target) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as bare:
                await stub.GetGraph(router_service_pb2.GetGraphRequest(graph_id="g3"))
    finally:
        await server.stop(0)
    assert bare.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    first, second = recorder.remaining
    assert first is not None
    # (gRPC sends the deadline as a timeout rounded up: a little more may arrive)
    assert DEFAULT_TIMEOUT_S - 5 < first <= DEFAULT_TIMEOUT_S + 0.5
    assert second is not None
    assert 0 < second <= 5 + 0.5
    figure(
        f"20 deadlines: SDK calls arrive with {first:.1f} s (default call_timeout "
        f"{DEFAULT_TIMEOUT_S:g} s) and {second:.1f} s (call_timeout 5 s) left; a call "
        f"without one -> {bare.value.code().name}"
    )


# --- 21: the configuration lint --------------------------------------------------------------


async def _monitor(url: str, path: str) -> Any:
    def fetch() -> Any:
        with urllib.request.urlopen(url + path, timeout=5) as response:
            return json.loads(response.read())

    return await asyncio.to_thread(fetch)


async def lint_server(monitor_url: str) -> list[str]:
    """What a running server's monitoring endpoint shows against RELIABILITY §4.2 test 21:
    monitoring on 127.0.0.1 only, every write fsynced (an R1 server has no replica to
    recover from), limits on every JetStream account, no export open to every account."""
    problems = []
    varz = await _monitor(monitor_url, "/varz")
    if varz.get("http_host") != "127.0.0.1":
        problems.append(f"monitoring listens on {varz.get('http_host')!r}, not 127.0.0.1")
    jetstream = (varz.get("jetstream") or {}).get("config") or {}
    if jetstream.get("sync_always") is not True:
        problems.append(
            f"JetStream does not fsync every write (sync every "
            f"{jetstream.get('sync_interval', 0) / 1e9:g} s)"
        )
    jsz = await _monitor(monitor_url, "/jsz?accounts=true")
    for account in jsz.get("account_details") or []:
        for field in ("reserved_memory", "reserved_storage"):
            value = int(account.get(field, 0))
            if not 0 < value < UNLIMITED:
                shown = "unlimited" if value >= UNLIMITED else value
                problems.append(f"JetStream account {account['name']}: {field} {shown}")
    accountz = await _monitor(monitor_url, "/accountz")
    for name in accountz.get("accounts") or []:
        if name == accountz.get("system_account"):
            continue  # the server's own system services
        query = urllib.parse.urlencode({"acc": name})
        detail = (await _monitor(monitor_url, f"/accountz?{query}"))["account_detail"]
        for export in detail.get("exports") or []:
            if not export.get("approved_accounts"):
                problems.append(f"account {name} exports {export['subject']} to every account")
    return problems


def _registry_of_every_kind(directory: TenantDirectory) -> Registry:
    """Tenants of every kind the renderer handles: default and small limits, a digit-led
    and a 63-character id, a disabled tenant, and one rotating both keys."""
    registry = register(
        directory,
        {
            "acme": Limits(),
            "0x": Limits(max_memory=1 << 20, max_storage=1 << 20, max_streams=7, max_consumers=8),
            "t" * 63: Limits(),
            "globex": Limits(),
            "initech": Limits(),
        },
    )
    registry = registry.with_tenant(replace(registry.get("globex"), disabled=True))
    initech = registry.get("initech")
    for role in ROLES:
        initech = initech.rotated(role, new_user_nkey().public_key, now_iso())
    return registry.with_tenant(initech)


def _deploy_layout(folder: Path, *, http_port: int | None = None) -> Path:
    """The compose NATS's /etc/nats: deploy/compose/nats.conf beside
    deploy/nats/nats-server.conf, with a tenants/ folder. With ``http_port``, only what
    cannot be used here changes: the ports (client: any free one; monitoring: given,
    same host) and the store directory."""
    folder.mkdir(parents=True, exist_ok=True)
    single = (DEPLOY_NATS / "nats-server.conf").read_text()
    if http_port is not None:
        single, listens = re.subn(r"(?m)^listen: \S+:4222", "listen: 127.0.0.1:-1", single)
        single, monitors = re.subn(r"(?m)^(http: \S+):8222", rf"\g<1>:{http_port}", single)
        store = json.dumps((folder / "js").as_posix())
        single, stores = re.subn(
            r'store_dir: "/var/lib/nats/jetstream"', f"store_dir: {store}", single
        )
        assert (listens, monitors, stores) == (1, 1, 1), "deploy/nats/nats-server.conf changed"
    (folder / "nats-server.conf").write_text(single)
    shutil.copy(COMPOSE_NATS, folder / "nats.conf")
    return folder / "nats.conf"


def test_every_generated_config_passes_nats_server_check(tmp_path: Path) -> None:
    layout = tmp_path / "etc-nats"
    config = _deploy_layout(layout)
    directory = TenantDirectory(layout / "tenants")
    registry = _registry_of_every_kind(directory)
    # What `tickmesh tenant` does: render, check, write, check the including config.
    commit(directory, registry, server_config=config)
    checked = [config.name]
    for node in sorted((DEPLOY_NATS / "cluster").glob("*.conf")):
        shutil.copy(node, layout / node.name)
        check_server_config(layout / node.name)
        checked.append(node.name)
    figure(
        f"21 nats-server -t: accounts.conf of {len(registry.tenants)} tenants "
        f"({', '.join(sorted(registry.tenants))[:80]}...; one disabled, one rotating) "
        f"included by {', '.join(checked)}: all pass"
    )


async def test_a_running_single_node_server_passes_the_lint(
    servers: NatsServers, tmp_path: Path
) -> None:
    http_port = free_port()
    config = _deploy_layout(servers.directory, http_port=http_port)
    directory = TenantDirectory(servers.directory / "tenants")
    registry = register(directory, {"acme": Limits(), "globex": Limits()})
    commit(directory, registry, server_config=config)
    process = servers.start("nats-r1", config.read_text())
    accounts = AccountsServer(directory, process, http_port)
    for tenant in registry.tenants:
        await provision(accounts, tenant)

    problems = await lint_server(accounts.monitor_url)
    varz = await _monitor(accounts.monitor_url, "/varz")
    limits: dict[str, dict[str, int]] = {}
    for tenant in registry.tenants:
        async with _as(accounts, tenant, SERVICE) as service:
            applied = (await service.js.account_info()).limits
            limits[tenant] = {
                "max_memory": applied.max_memory,
                "max_storage": applied.max_storage,
                "max_streams": applied.max_streams,
                "max_consumers": applied.max_consumers,
            }
    jsz = await _monitor(accounts.monitor_url, "/jsz?accounts=true&streams=true&config=true")
    denies: dict[str, tuple[bool, bool]] = {}
    for account in jsz["account_details"]:
        for stream in account.get("stream_detail") or []:
            stream_config = stream["config"]
            denies[stream["name"]] = (
                bool(stream_config.get("deny_delete")),
                bool(stream_config.get("deny_purge")),
            )
    records = [
        stream.name
        for tenant in registry.tenants
        for stream in stream_configs(TenantNames(tenant))
        if stream.name
    ]
    figure(
        f"21 lint of deploy/compose/nats.conf + deploy/nats/nats-server.conf running with "
        f"{len(registry.tenants)} tenants: monitoring {varz['http_host']}:{varz['http_port']}, "
        f"sync_always {varz['jetstream']['config'].get('sync_always')}, account limits "
        f"{limits['acme']}, {sum(all(denies[s]) for s in records)}/{len(records)} record "
        f"streams deny delete and purge; problems: {problems or 'none'}"
    )
    assert problems == []
    assert sorted(a["name"] for a in jsz["account_details"]) == sorted(registry.tenants)
    for tenant, values in limits.items():
        assert values == registry.get(tenant).limits.to_json(), tenant
        assert all(value > 0 for value in values.values()), tenant
    for stream in records:
        assert denies[stream] == (True, True), stream
    assert process.log().count("[ERR]") == 0


async def test_the_embedded_server_passes_the_lint_when_asked_to_fsync(tmp_path: Path) -> None:
    """The embedded mesh's server fsyncs every write only with ``sync_always`` (README,
    "Power loss without fsync"): without it, that is the one thing the lint reports of a
    server with tenant accounts."""
    directory = TenantDirectory(tmp_path / "tenants")
    commit(directory, register(directory, {"acme": Limits()}))
    with EmbeddedNats(data_dir=tmp_path / "plain", include=directory.accounts_path) as plain:
        plain_problems = await lint_server(plain.monitor_url)
    with EmbeddedNats(
        data_dir=tmp_path / "synced", sync_always=True, include=directory.accounts_path
    ) as synced:
        synced_problems = await lint_server(synced.monitor_url)
    figure(
        f"21 lint of the embedded server: default {plain_problems}; with sync_always and "
        f"tenant accounts {synced_problems or 'none'}"
    )
    assert plain_problems == ["JetStream does not fsync every write (sync every 120 s)"]
    assert synced_problems == []


async def test_the_lint_reports_each_problem_of_a_bad_config(
    servers: NatsServers, tmp_path: Path
) -> None:
    """Its negative control: a config with every problem the lint looks for."""
    http_port = free_port()
    config = "\n".join(
        [
            "server_name: careless",
            "host: 127.0.0.1",
            "port: -1",
            f"http: 127.0.0.2:{http_port}",
            f"jetstream {{ store_dir: {json.dumps((tmp_path / 'js').as_posix())} }}",
            "accounts {",
            "  OPEN { jetstream: enabled, users: [{user: open, password: open}] }",
            "  SHARING {",
            "    jetstream { max_mem: 1MB, max_file: 1MB, max_streams: 8, max_consumers: 8 }",
            "    users: [{user: sharing, password: sharing}]",
            '    exports: [{stream: "shared.>"}, {stream: "private.>", accounts: ["OPEN"]}]',
            "  }",
            "  SYS { users: [{user: admin, password: admin}] }",
            "}",
            "system_account: SYS",
        ]
    )
    servers.start("careless", config)
    problems = await lint_server(f"http://127.0.0.2:{http_port}")
    figure("21 lint of a careless config:\n" + "\n".join(f"  {p}" for p in problems))
    assert problems == [
        "monitoring listens on '127.0.0.2', not 127.0.0.1",
        "JetStream does not fsync every write (sync every 120 s)",
        "JetStream account OPEN: reserved_memory unlimited",
        "JetStream account OPEN: reserved_storage unlimited",
        "account SHARING exports shared.> to every account",
    ]
