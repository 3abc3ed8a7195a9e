"""★ 1. The state service SIGKILLed mid-stream (RELIABILITY.md §4.2): nothing acked is lost,
nothing is stored twice, and the consumer ends with nothing unacked.

Three writers publish 1,000 execution records each straight to the records stream (as
executor pools would, with the pool's message ids); the state service is SIGKILLed and
restarted at three seeded moments. Recovery per restart: from the kill until every record
published before it is stored and acked (the ack floor passes the stream's last sequence
at the kill: what the dead process held comes back after the ack wait).
"""

from __future__ import annotations

import asyncio
import random

from tests.chaos import report
from tests.chaos.auditor import Ledger, audit_store, publish_records
from tests.chaos.conftest import ClusterFactory
from tests.chaos.harness import Cluster, figure

SEED = 7
WRITERS = 3
PER_WRITER = 1_000
KILLS = 3


async def _caught_up(cluster: Cluster, last_seq: int, within: float = 30.0) -> None:
    """Wait until the state consumer's ack floor reaches ``last_seq``."""
    names = cluster.names
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        info = await cluster.consumer_info(names.exec_stream, names.state_consumer)
        if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= last_seq:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the state consumer did not catch up to {last_seq} in {within}s")


async def test_state_sigkill_mid_stream_loses_and_doubles_nothing(
    start_cluster: ClusterFactory,
) -> None:
    cluster = await start_cluster(services=["state"])
    rng = random.Random(SEED)
    total = WRITERS * PER_WRITER
    moments = sorted(rng.sample(range(total // 10, total * 8 // 10), KILLS))
    ledger = Ledger()
    lifetimes = [f"lt-chaos-{w}" for w in range(WRITERS)]
    writers = [
        asyncio.create_task(
            publish_records(
                cluster.js, cluster.tenant, lifetimes[w], w, range(PER_WRITER), ledger, window=32
            )
        )
        for w in range(WRITERS)
    ]
    names = cluster.names
    recoveries: list[float] = []
    for moment in moments:
        while len(ledger.acked) < moment:  # noqa: ASYNC110 - the writers' progress
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        code = await cluster.kill("state")
        assert code == -9, code
        last_seq = (await cluster.js.stream_info(names.exec_stream)).state.last_seq
        await cluster.restart("state")
        await _caught_up(cluster, last_seq)
        recoveries.append(loop.time() - killed_at)
    await asyncio.gather(*writers)
    await cluster.wait_drained(names.exec_stream, names.state_consumer, within=30)
    info = await cluster.consumer_info(names.exec_stream, names.state_consumer)

    verdict = await audit_store(cluster.state_target, cluster.tenant, lifetimes, ledger)
    figures = ", ".join(f"{r:.2f}" for r in recoveries)
    figure(
        f"1 state SIGKILL (seed {SEED}, kills after {moments} acks): {verdict.summary()}; "
        f"recovery per restart s: [{figures}]; ack_pending={info.num_ack_pending}; "
        f"peak RSS {cluster.peak_rss_mib('state'):.0f} MiB"
    )
    report.record(
        verdict.row(
            "1 state SIGKILL",
            f"SIGKILL state x{KILLS} (seed {SEED})",
            recovery_s=max(recoveries),
            peak_rss_mib=cluster.peak_rss_mib(),
        )
    )
    verdict.assert_clean()
    assert not ledger.failed, sorted(ledger.failed.items())[:5]
    assert verdict.acked == verdict.attempted == total
    assert len(verdict.persisted) == total
    assert info.num_ack_pending == 0
    assert info.num_pending == 0
    assert cluster.services["state"].starts == KILLS + 1
