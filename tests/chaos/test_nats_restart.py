"""4 ★ NATS single-node restart on file storage (RELIABILITY.md §4.2).

A nats-server of the test's own (``sync_interval: always``, a store_dir in the test's
folder, a fixed port) takes ~2,000 publishes into a tenant's execution stream through
the runtime's publisher (``tickmesh.runtime.nats.connect`` / ``publish_batch``) while it
is stopped with SIGTERM, then separately with SIGKILL, and restarted on the same
store_dir. Every acked publish must be in the stream afterwards, exactly once; every
publish not acked must have raised (none silent); the same client must be connected
again without a restart. Then an outage longer than nats-py's default reconnect budget
(60 attempts) must still end in a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil
import pytest
from nats.aio.client import DEFAULT_MAX_RECONNECT_ATTEMPTS
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tests.chaos import report
from tests.support.nats_configs import NatsServerProcess, require_nats_server
from tests.support.nats_server import new_tenant
from tests.support.ports import free_port
from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.streams import ensure_tenant
from tickmesh.runtime.subjects import HDR_MSG_ID, TenantNames

TOTAL: Final = 2_000
BATCH: Final = 10
ACK_TIMEOUT_S: Final = 1.0
DOWN_S: Final = 1.0
"""How long the server stays down at each fault."""


@dataclass
class Phase:
    """One fault's share of the publishes: indexes [start, stop)."""

    fault: str
    start: int
    stop: int
    acked: set[int] = field(default_factory=set)
    failed: dict[int, BaseException] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)
    down_at: float = math.nan
    up_at: float = math.nan

    def unavailable_s(self) -> float:
        """The longest gap between successful batches: the write-unavailability window."""
        times = sorted(self.ack_times)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Server:
    """nats-server on a fixed port and store_dir, restartable (sync_interval: always)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        config = (
            "server_name: chaos\nhost: 127.0.0.1\n"
            f"port: {self.port}\n"
            f'jetstream {{ store_dir: "{(directory / "js").as_posix()}", '
            "sync_interval: always }\n"
        )
        self.process = NatsServerProcess(directory, "chaos", config)
        self.starts = 0
        self.peak_rss = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        # A fresh log: the readiness check reads it.
        log = self.process.log_path
        if log.exists():
            log.rename(log.with_suffix(f".{self.starts}.log"))
        self.process.start()
        self.starts += 1

    def stop(self, sig: signal.Signals) -> None:
        self.process.stop(kill=sig == signal.SIGKILL)

    def sample_rss(self) -> None:
        proc = self.process.process
        if proc is not None:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, psutil.Process(proc.pid).memory_info().rss)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    require_nats_server()
    srv = Server(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.process.stop(kill=True)


def msg_id(i: int) -> str:
    return f"chaos-w1:{i}"


async def publish_all(js: JetStreamContext, names: TenantNames, phases: list[Phase]) -> None:
    """Publish TOTAL messages in batches, recording per message its ack or its error."""
    by_index = {i: p for p in phases for i in range(p.start, p.stop)}
    for first in range(0, TOTAL, BATCH):
        indexes = range(first, min(first + BATCH, TOTAL))
        batch = [
            tm_nats.Outgoing(
                names.exec("lt-chaos"), f"envelope {i}".encode(), {HDR_MSG_ID: msg_id(i)}
            )
            for i in indexes
        ]
        phase = by_index[first]
        try:
            await tm_nats.publish_batch(js, batch, ack_timeout=ACK_TIMEOUT_S)
            failed: dict[str, BaseException] = {}
        except tm_nats.PublishError as exc:
            failed = {out.headers[HDR_MSG_ID]: err for out, err in exc.failures}
        except Exception as exc:  # publish_async itself refused (e.g. buffer full)
            failed = {msg_id(i): exc for i in indexes}
        for i in indexes:
            if msg_id(i) in failed:
                by_index[i].failed[i] = failed[msg_id(i)]
            else:
                by_index[i].acked.add(i)
        if len(failed) < len(batch):
            phase.ack_times.append(time.monotonic())
        await asyncio.sleep(0.005)


async def stored_ids(js: JetStreamContext, names: TenantNames) -> list[str]:
    """Every Nats-Msg-Id the execution stream holds (read without removing anything)."""
    info = await js.stream_info(names.exec_stream)
    ids: list[str] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(names.exec_stream, seq, direct=True)
        ids.append((msg.headers or {}).get(HDR_MSG_ID, ""))
    assert len(ids) == info.state.messages
    return ids


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.02)


async def test_acked_publishes_survive_sigterm_and_sigkill_restarts(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    nc: NatsClient = await tm_nats.connect(server.url, name="chaos-publisher")
    try:
        js = tm_nats.jetstream(nc)
        names = await ensure_tenant(js, new_tenant("nr"))
        phases = [
            Phase("SIGTERM nats-server, restart", 0, TOTAL // 2),
            Phase("SIGKILL nats-server, restart", TOTAL // 2, TOTAL),
        ]
        publisher = asyncio.create_task(publish_all(js, names, phases))

        def attempted() -> int:
            return sum(len(p.acked) + len(p.failed) for p in phases)

        for phase, sig in zip(phases, (signal.SIGTERM, signal.SIGKILL), strict=True):
            # Fault a third of the way into the phase's publishes.
            at = phase.start + (phase.stop - phase.start) // 3

            def reached(at: int = at) -> bool:
                return attempted() >= at

            await until(reached, within=30, what="publishing")
            server.sample_rss()
            phase.down_at = time.monotonic()
            await asyncio.to_thread(server.stop, sig)
            await asyncio.sleep(DOWN_S)
            await asyncio.to_thread(server.start)
            phase.up_at = time.monotonic()
            await until(lambda: nc.is_connected, within=10, what="the client reconnecting")
            server.sample_rss()
        async with asyncio.timeout(60):
            await publisher
        server.sample_rss()

        stored = await stored_ids(js, names)
        stored_set = set(stored)
        duplicates = len(stored) - len(stored_set)
        assert nc.stats["reconnects"] >= 2, "the client did not reconnect by itself"
        for phase in phases:
            ids = {msg_id(i) for i in range(phase.start, phase.stop)}
            acked = {msg_id(i) for i in phase.acked}
            failed = {msg_id(i) for i in phase.failed}
            persisted = stored_set & ids
            lost = acked - persisted
            recovered = persisted & failed
            # Every publish ended one way or the other: acked or raised, never silent.
            assert acked | failed == ids
            assert not acked & failed
            assert phase.failed, f"{phase.fault}: no publish failed, so the fault missed"
            with capsys.disabled():
                print(  # noqa: T201 - the figures this test measures
                    f"\n[4] {phase.fault}: attempted {len(ids)}, acked {len(acked)}, "
                    f"errors {len(failed)} (of which persisted anyway {len(recovered)}), "
                    f"persisted {len(persisted)}, lost {len(lost)}; write-unavailable "
                    f"{phase.unavailable_s():.2f} s (server down {phase.up_at - phase.down_at:.2f}"
                    " s)"
                )
            report.record(
                report.Row(
                    test="4 NATS restart",
                    fault=phase.fault,
                    attempted=len(ids),
                    acked=len(acked),
                    persisted=len(persisted),
                    lost=len(lost),
                    duplicated=duplicates if phase is phases[-1] else 0,
                    recovery_s=phase.unavailable_s(),
                    peak_rss_mib=server.peak_rss / 2**20,
                )
            )
            assert lost == set(), f"{phase.fault}: acked but not in the stream: {sorted(lost)[:5]}"
        assert stored_set <= {msg_id(i) for i in range(TOTAL)}, "unexpected messages"
        assert duplicates == 0
    finally:
        await nc.close()


async def test_an_outage_past_nats_py_default_reconnect_budget_still_recovers(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    nc: NatsClient = await tm_nats.connect(server.url, name="chaos-long-outage")
    try:
        # The test shortens the wait between attempts (0.25 s in the runtime) to reach the
        # default budget sooner; the attempt limit is the runtime's own.
        nc.options["reconnect_time_wait"] = 0.1
        js = tm_nats.jetstream(nc)
        names = await ensure_tenant(js, new_tenant("nr"))
        budget = DEFAULT_MAX_RECONNECT_ATTEMPTS
        down_at = time.monotonic()
        await asyncio.to_thread(server.stop, signal.SIGKILL)

        def attempts() -> int:
            return max((s.reconnects for s in nc.server_pool), default=0)

        await until(lambda: attempts() > budget + 5, within=30, what="the reconnect attempts")
        assert not nc.is_closed, "the client gave up reconnecting"
        await asyncio.to_thread(server.start)
        await until(lambda: nc.is_connected, within=10, what="the client reconnecting")
        recovered_s = time.monotonic() - down_at
        ack = await tm_nats.publish_batch(
            js, [tm_nats.Outgoing(names.exec("lt-long"), b"after", {HDR_MSG_ID: "after"})]
        )
        assert ack[0].stream == names.exec_stream
        with capsys.disabled():
            print(  # noqa: T201 - the figure this test measures
                f"\n[4] outage of {recovered_s:.1f} s, {attempts()} reconnect attempts or more "
                f"(nats-py gives up after {budget}): reconnected and published"
            )
        report.record(
            report.Row(
                test="4 NATS long outage",
                fault=f"SIGKILL nats-server > {budget} reconnect attempts",
                attempted=1,
                acked=1,
                persisted=1,
                lost=0,
                duplicated=0,
                recovery_s=recovered_s,
            )
        )
    finally:
        await nc.close()
