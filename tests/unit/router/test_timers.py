"""Wait timeouts: the default actions in core, and the timers that fire them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2

from tests.unit.router.test_core import PRODUCER, Sim, complete, hello_graph, payload
from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.router import core
from tickmesh.router.processor import Applied
from tickmesh.router.store import Versioned
from tickmesh.router.timers import WaitTimers
from tickmesh.v1 import lifetime_pb2, result_pb2

A = result_pb2


def waiting(action: A.WaitTimeoutAction.ValueType, timeout_s: float = 0.05) -> Sim:
    sim = Sim(hello_graph())
    sim.finish_task(sim.take("greet"), "hi")
    decision = A.WaitDecision(
        signal_name="approval",
        on_timeout=action,
        default_payload=payload({"approved": False}),
        timeout=duration_pb2.Duration(nanos=int(timeout_s * 1e9)),
    )
    sim.decide(sim.take("decide"), A.PlanResult(wait=decision))
    assert sim.view.state == lifetime_pb2.LIFETIME_STATE_WAITING
    return sim


def test_the_wait_deadline_is_stored_and_known_only_while_waiting() -> None:
    sim = waiting(A.WAIT_TIMEOUT_ACTION_FAIL)
    deadline = core.wait_deadline(sim.state)
    assert deadline is not None
    assert deadline > datetime(2026, 1, 1, tzinfo=UTC)
    sim.run(core.abort, "x")
    assert core.wait_deadline(sim.state) is None


@pytest.mark.parametrize(
    ("action", "state"),
    [
        (A.WAIT_TIMEOUT_ACTION_FAIL, lifetime_pb2.LIFETIME_STATE_FAILED),
        (A.WAIT_TIMEOUT_ACTION_ABORT, lifetime_pb2.LIFETIME_STATE_ABORTED),
        (A.WAIT_TIMEOUT_ACTION_SIGNAL, lifetime_pb2.LIFETIME_STATE_RUNNING),
    ],
)
def test_timeout_actions(action: A.WaitTimeoutAction.ValueType, state: int) -> None:
    sim = waiting(action)
    waited_in = sim.state.wait.plan_execution_id
    sim.run(core.wait_timed_out)
    assert sim.view.state == state
    # The timeout is recorded as an event naming the plan that waited (replay and fork
    # read it from the store), and counted in the state.
    timed_out = [e for e in sim.events if e.kind == lifetime_pb2.LIFETIME_EVENT_KIND_WAIT_TIMED_OUT]
    assert [e.execution_id for e in timed_out] == [waited_in]
    assert sim.state.wake_count == 1
    assert not sim.state.wakes
    if action == A.WAIT_TIMEOUT_ACTION_SIGNAL:
        again = sim.take("decide")
        assert again.plan_request.signal.timed_out
        assert again.plan_request.signal.payload == payload({"approved": False})
        sim.decide(again, complete("done"))
    elif action == A.WAIT_TIMEOUT_ACTION_FAIL:
        assert sim.view.error.type == "WaitTimeout"


@dataclass
class FakeStore:
    states: dict[str, rs.RouterLifetime]
    index: set[str] = field(default_factory=set)

    async def load(self, lifetime_id: str, *, fresh: bool = False) -> Versioned | None:
        state = self.states.get(lifetime_id)
        return None if state is None else Versioned(state, 1)

    async def lifetime_ids(self) -> list[str]:
        return list(self.states)

    async def index_wait(self, lifetime_id: str) -> None:
        self.index.add(lifetime_id)


@dataclass
class FakeTenant:
    store: FakeStore


@dataclass
class FakeProcessor:
    """Applies mutations like Processor.apply, in memory, with the real clock."""

    graph: Any
    tenants: dict[str, FakeTenant] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def tenant(self, tenant_id: str) -> FakeTenant:
        return self.tenants[tenant_id]

    async def apply(
        self, tenant: FakeTenant, lifetime_id: str, mutate: Any, keys: Sequence[str]
    ) -> Applied:
        state = rs.RouterLifetime()
        state.CopyFrom(tenant.store.states[lifetime_id])
        lt = core.Lifetime(state, self.graph, PRODUCER, datetime.now(UTC))
        if mutate(lt):
            tenant.store.states[lifetime_id] = lt.state
            self.keys.extend(keys)
        return Applied(lt, True)


def _live_wait(
    lifetime_id: str, action: A.WaitTimeoutAction.ValueType, timeout_s: float
) -> rs.RouterLifetime:
    state = waiting(action).state
    state.lifetime.lifetime_id = lifetime_id
    deadline = datetime.now(UTC) + timedelta(seconds=timeout_s)
    state.wait.deadline.FromDatetime(deadline)
    return state


async def test_timers_scan_fire_once_and_disarm_when_woken() -> None:
    graph = hello_graph()
    graph.version = 1
    store = FakeStore(
        {
            "due": _live_wait("due", A.WAIT_TIMEOUT_ACTION_FAIL, 0.05),
            "signalled": _live_wait("signalled", A.WAIT_TIMEOUT_ACTION_FAIL, 0.1),
        }
    )
    processor = FakeProcessor(graph, {"acme": FakeTenant(store)})
    timers = WaitTimers(processor, rescan_s=0)  # type: ignore[arg-type]
    waited_in = store.states["due"].wait.plan_execution_id
    assert await timers.scan("acme") == 2
    assert store.index == {"due", "signalled"}  # entered in the index as they were found
    # Signalled before its deadline: the write disarms the timer.
    lt = core.Lifetime(store.states["signalled"], graph, PRODUCER, datetime.now(UTC))
    core.signal(lt, lifetime_pb2.Signal(name="approval"))
    timers.observe("acme", lt.state)
    await asyncio.sleep(0.3)
    assert store.states["due"].lifetime.state == lifetime_pb2.LIFETIME_STATE_FAILED
    assert store.states["signalled"].lifetime.state == lifetime_pb2.LIFETIME_STATE_RUNNING
    assert timers.fired == 1
    assert processor.keys == [f"timeout:{waited_in}"]
    # A second firing (another replica, a rescan) finds nothing to do.
    await timers.scan("acme")
    await asyncio.sleep(0.05)
    assert timers.fired == 1
    await timers.stop()
