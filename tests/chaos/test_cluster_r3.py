"""5. A three-node NATS cluster (R3) loses no acked publish through leader faults
(RELIABILITY.md §4.2).

Three nats-servers with routes on 127.0.0.1 (fixed client, route and monitoring ports,
so a restarted node comes back where its peers and clients remember it) hold a tenant's
streams with ``replicas=3``. A writer publishes execution records to the tenant's
records stream steadily through the runtime's publisher (``tickmesh.runtime.nats``
``connect`` / ``publish_batch``), logging every attempt, ack and failure in an auditor
ledger. Meanwhile the stream's leader is SIGKILLed and restarted, then the new leader
is paused (SIGSTOP) for a few seconds and resumed (SIGCONT).

Asserts: every acked publish is in the stream exactly once and nothing unexpected is;
after healing, every node, asked directly on its own monitoring port (``/jsz``), holds
the same message count and last sequence. Figure: the longest gap between acks (the
write-unavailable window, target < 10 s).

The spec's third fault, a bounce of all three nodes, is left out to keep the test short.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from nats.js import JetStreamContext

from tests.chaos import report
from tests.chaos.auditor import Key, Ledger, classify
from tests.chaos.harness import figure
from tests.support.nats_configs import (
    NatsServerProcess,
    NatsServers,
    require_nats_server,
    server_config,
)
from tests.support.nats_server import new_tenant
from tests.support.ports import free_port
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import HDR_MSG_ID, TenantNames

pytestmark = [pytest.mark.slow_chaos, pytest.mark.timeout(240)]

NODES: Final = ("r3a", "r3b", "r3c")
BATCH: Final = 10
ACK_TIMEOUT_S: Final = 2.0
PAUSE_S: Final = 5.0
"""How long the new leader stays SIGSTOPped."""
DOWN_S: Final = 2.0
"""How long the killed leader stays down before its restart."""
GAP_TARGET_S: Final = 10.0
LIFETIME: Final = "lt-r3"


@dataclass
class Node:
    """One cluster member on fixed ports, restartable on its own store."""

    process: NatsServerProcess
    client_port: int
    http_port: int
    starts: int = 1

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def restart(self) -> None:
        # A fresh log: the readiness check reads it.
        log = self.process.log_path
        if log.exists():
            log.rename(log.with_suffix(f".{self.starts}.log"))
        self.process.start()
        self.starts += 1

    def signal(self, sig: signal.Signals) -> None:
        assert self.process.process is not None, f"{self.name} is not running"
        self.process.process.send_signal(sig)

    def stream_state(self, stream: str) -> tuple[int, int] | None:
        """(messages, last_seq) of ``stream`` as this node holds it (its own /jsz)."""
        url = f"http://127.0.0.1:{self.http_port}/jsz?accounts=true&streams=true"
        with urllib.request.urlopen(url, timeout=2) as reply:
            data: dict[str, Any] = json.load(reply)
        for account in data.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    state = detail["state"]
                    return int(state.get("messages", 0)), int(state.get("last_seq", 0))
        return None


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[NatsServers]:
    """The cluster's nats-servers, all stopped at the end; fails (never skips) without
    the nats-server binary."""
    require_nats_server()
    started = NatsServers(tmp_path / "servers")
    try:
        yield started
    finally:
        for server in started._started:  # a SIGSTOPped node must not outlive the test
            if server.process is not None and server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)
        started.stop_all()


def start_nodes(servers: NatsServers, directory: Path) -> list[Node]:
    route_ports = [free_port() for _ in NODES]
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    nodes = []
    for name, route_port in zip(NODES, route_ports, strict=True):
        client_port, http_port = free_port(), free_port()
        config = server_config(
            name,
            jetstream_dir=directory / name,
            blocks=(
                f"http: 127.0.0.1:{http_port}",
                f"cluster {{ name: r3, listen: 127.0.0.1:{route_port}, routes: [{routes}] }}",
            ),
        ).replace("port: -1", f"port: {client_port}", 1)
        nodes.append(Node(servers.start(name, config), client_port, http_port))
    return nodes


def msg_key(i: int) -> Key:
    return f"r3-{i:08d}", 1


async def until_ok(attempt: Any, within: float, what: str) -> Any:
    """Retry ``await attempt()`` while the cluster elects leaders."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if loop.time() > deadline:
                raise AssertionError(f"{what}: still failing after {within:g} s: {exc!r}") from exc
            await asyncio.sleep(0.1)


async def publish_steadily(
    js: JetStreamContext, names: TenantNames, ledger: Ledger, stop: asyncio.Event
) -> None:
    """Publish batches of records until ``stop``; each key once, never retried."""
    i = 0
    while not stop.is_set():
        keys = [msg_key(n) for n in range(i, i + BATCH)]
        i += BATCH
        batch = [
            tm_nats.Outgoing(
                names.exec(LIFETIME), f"record {k[0]}".encode(), {HDR_MSG_ID: f"r3:{k[0]}"}
            )
            for k in keys
        ]
        for key in keys:
            ledger.attempt(key)
        failed: set[Key] = set()
        try:
            await tm_nats.publish_batch(js, batch, ack_timeout=ACK_TIMEOUT_S)
        except tm_nats.PublishError as exc:
            for out, err in exc.failures:
                key = (out.headers[HDR_MSG_ID].removeprefix("r3:"), 1)
                ledger.fail(key, repr(err))
                failed.add(key)
        except Exception as exc:  # publish_async itself refused
            for key in keys:
                ledger.fail(key, repr(exc))
                failed.add(key)
        for key in keys:
            if key not in failed:
                ledger.ack(key)
        await asyncio.sleep(0.01)


async def stored_keys(js: JetStreamContext, stream: str) -> list[Key]:
    """One key per message the stream holds (read through its leader)."""
    info = await js.stream_info(stream)
    keys: list[Key] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await until_ok(lambda s=seq: js.get_msg(stream, s), 10, f"reading seq {seq}")
        keys.append(((msg.headers or {}).get(HDR_MSG_ID, "").removeprefix("r3:"), 1))
    assert len(keys) == info.state.messages
    return keys


async def leader_of(js: JetStreamContext, stream: str, other_than: str | None = None) -> str:
    async def ask() -> str:
        info = await js.stream_info(stream)
        leader = info.cluster.leader if info.cluster is not None else None
        if not leader or leader == other_than:
            raise AssertionError(f"no new leader yet ({leader})")
        return leader

    result: str = await until_ok(ask, 30, "a stream leader")
    return result


async def wait_acks(ledger: Ledger, more: int, within: float = 30.0) -> None:
    target = len(ledger.acked) + more
    async with asyncio.timeout(within):
        while len(ledger.acked) < target:  # noqa: ASYNC110 - the writer's progress
            await asyncio.sleep(0.05)


async def test_r3_cluster_loses_no_acked_publish_through_leader_kill_and_pause(
    servers: NatsServers, tmp_path: Path
) -> None:
    nodes = start_nodes(servers, tmp_path / "js")
    by_name = {n.name: n for n in nodes}
    nc = await tm_nats.connect([n.url for n in nodes], name="chaos-r3", first_connect_within=20)
    publisher: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    try:
        js = tm_nats.jetstream(nc)
        tenant = new_tenant("r3")
        names: TenantNames = await until_ok(
            lambda: ensure_tenant(js, tenant, replicas=3), 30, "creating the R3 streams"
        )
        stream = names.exec_stream
        info = await js.stream_info(stream)
        assert info.config.num_replicas == 3
        ledger = Ledger()
        publisher = asyncio.create_task(publish_steadily(js, names, ledger, stop))
        await wait_acks(ledger, 300)

        # SIGKILL the stream leader, restart it on its store.
        killed = by_name[await leader_of(js, stream)]
        await asyncio.to_thread(killed.process.stop, kill=True)
        new_leader = await leader_of(js, stream, other_than=killed.name)
        await asyncio.sleep(DOWN_S)
        await asyncio.to_thread(killed.restart)
        await wait_acks(ledger, 300)

        # Pause the new leader (SIGSTOP), then resume it.
        paused = by_name[await leader_of(js, stream)]
        paused.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(PAUSE_S)
        finally:
            paused.signal(signal.SIGCONT)
        await wait_acks(ledger, 300)
        stop.set()
        await publisher

        # Healing: each node, asked on its own monitoring port, holds the same state.
        loop = asyncio.get_running_loop()
        healed_from = loop.time()
        final = await until_ok(lambda: js.stream_info(stream), 30, "stream info")
        expected = (final.state.messages, final.state.last_seq)
        states: dict[str, tuple[int, int] | None] = {}
        deadline = loop.time() + 30
        while loop.time() < deadline:
            for node in nodes:
                try:
                    states[node.name] = await asyncio.to_thread(node.stream_state, stream)
                except OSError:
                    states[node.name] = None
            if all(s == expected for s in states.values()):
                break
            await asyncio.sleep(0.2)
        healed_s = loop.time() - healed_from

        verdict = classify(ledger, await stored_keys(js, stream))
        gap = ledger.longest_gap_s()
        fault = (
            f"SIGKILL leader {killed.name} ({DOWN_S:g} s down) + SIGSTOP new leader "
            f"{paused.name} {PAUSE_S:g} s"
        )
        figure(
            f"5 NATS R3: {fault}; first new leader {new_leader}; {verdict.summary()}; "
            f"failed publishes {len(ledger.failed)}; longest write-unavailable gap {gap:.2f} s "
            f"(target < {GAP_TARGET_S:g} s); per-node (messages, last_seq) {states} vs leader "
            f"{expected}, healed in {healed_s:.2f} s"
        )
        report.record(verdict.row("5 NATS R3 cluster", fault, recovery_s=gap))
        verdict.assert_clean()
        assert all(s == expected for s in states.values()), (states, expected)
        assert ledger.failed, "no publish failed: the faults missed the writer"
        assert gap < GAP_TARGET_S, f"write-unavailable for {gap:.2f} s"
    finally:
        stop.set()
        if publisher is not None and not publisher.done():
            publisher.cancel()
        for node in nodes:
            if node.process.process is not None and node.process.process.poll() is None:
                node.signal(signal.SIGCONT)
        await nc.close()
