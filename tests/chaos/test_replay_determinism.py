"""10 ★ Replay determinism (RELIABILITY.md §4.2); a few seconds, so in the ★ subset.

A 51-step lifetime runs on the embedded mesh under a guardrail policy (YAML, version 1)
that already refuses some steps: a plan fans out to parallel ``research`` and ``code``
tasks, a join-all ``merge`` plan collects them, ``check`` and ``decide`` close the round,
and ``decide`` loops for 8 rounds of varying width. Handlers are deterministic (no
randomness, no clock in any output or telemetry).

The recorded history (the router's stored lifetime and the state store's records, in
store order) is then re-driven through the router's decision function
(``tickmesh.router.replay.replay``: ``core`` plus the router's own guardrail ``Gate`` for
the tenant):

* under the same policy version, every decision is reproduced, and the decisions,
  normalised (node, handler, iteration, parents as step numbers, task inputs, refusals, the
  recorded outcome, graph and policy version/digest, the end), equal the golden file
  ``golden/replay_50_steps.json``; the ``ReplayLifetime`` RPC (which evaluates no
  guardrails) reproduces the lifetime too;
* after the policy YAML changes (the ``code`` cap tightens; the guardrail service stores
  it as version 2), replay under the new version diverges exactly where the new rule now
  refuses, and it flags the change by version: ``policy_changes`` and every divergence
  name the recorded and replayed policy versions and digests.

Execution and lifetime ids, timestamps and request digests (which cover parent ids) are
normalised away. To rewrite the golden file after an intended change of routing, of the
graph or of the policies here, run::

    TICKMESH_UPDATE_GOLDEN=1 pytest tests/chaos/test_replay_determinism.py

and review its diff like code.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.chaos import report
from tests.chaos.harness import figure
from tests.support.audit import record_of
from tests.support.mesh import Handler, MeshHarness, start_mesh
from tests.support.nats_server import nats_server
from tickmesh.router import core, replay
from tickmesh.router.guard import Gate
from tickmesh.sdk import (
    Decision,
    GraphBuilder,
    PlanContext,
    PlanInputView,
    TaskContext,
    codecs,
    complete,
    dispatch,
    fail,
    plan,
    step,
    task,
)
from tickmesh.v1 import (
    execution_pb2,
    guardrail_pb2,
    guardrail_service_pb2,
    guardrail_service_pb2_grpc,
    lifetime_pb2,
    result_pb2,
)

__all__ = ["nats_server", "start_mesh"]  # fixtures used by this test

pytestmark = pytest.mark.timeout(60)

GOLDEN = Path(__file__).parent / "golden" / "replay_50_steps.json"
UPDATE_GOLDEN = os.environ.get("TICKMESH_UPDATE_GOLDEN") == "1"
WAIT_S = 30.0
PRODUCER = core.Producer(service="router", version="replay-test", instance="replay")

ROUNDS = 8
TOPICS = ("alpha", "beta", "gamma")


def policy_yaml(code_cap: int) -> str:
    """The guardrail policy: ``code`` steps past ``code_cap`` are refused before dispatch."""
    return f"""\
policy: replay-caps
rules:
  - id: code-cap
    scope: execution
    phase: pre_dispatch
    when: node.id == "code" and estimate.iterations > {code_cap}
    action: reject_execution
    message: code steps capped at {code_cap}
  - id: lifetime-tokens
    scope: lifetime
    when: sum(tokens) > 100000
    action: abort_lifetime
"""


RECORDED_CAP = 6
"""Version 1 refuses the last 2 of the 8 ``code`` steps."""
CHANGED_CAP = 3
"""Version 2 also refuses ``code`` steps 4 to 6, which the recorded run ran."""


@pytest.fixture
def mesh_profile() -> dict[str, str]:
    """The embedded profile only: this test is about the decision function, not the stores."""
    return {}


# --- the graph and its deterministic handlers ------------------------------------------


GRAPH = (
    GraphBuilder("replay-50", max_iterations=20)
    .task("intake", "intake")
    .plan("plan", "planner")
    .task("research", "researcher")
    .task("code", "coder")
    .plan("merge", "merger", join="all")
    .task("check", "checker")
    .plan("decide", "decider")
    .edge("intake", "plan")
    .edge("plan", "research", "parallel")
    .edge("plan", "code", "parallel")
    .edge("research", "merge", "join")
    .edge("code", "merge", "join")
    .edge("merge", "check")
    .edge("check", "decide")
    .edge("decide", "research", "parallel")
    .edge("decide", "code", "parallel")
    .final("decide")
    .build()
)


def fan_out(round_: int) -> Decision:
    """Round ``round_``: 1 to 3 research branches (by round) and one code branch."""
    width = 1 + round_ % 3
    return dispatch(
        *(step("research", {"round": round_, "topic": TOPICS[i]}) for i in range(width)),
        step("code", {"round": round_}),
        rationale=f"round {round_}: {width} research + code",
    )


@task(name="intake")
async def intake(ctx: TaskContext, goal: dict[str, Any]) -> dict[str, Any]:
    return {"rounds": goal["rounds"], "subject": goal["subject"].strip().lower()}


@plan(name="planner")
async def planner(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    [parsed] = inputs
    if not parsed.succeeded:
        return fail(f"intake failed: {parsed.error_message}")
    return fan_out(1)


@task(name="researcher")
async def researcher(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    notes = f"{job['topic']} notes, round {job['round']}"
    ctx.report(input_tokens=10 * len(notes), output_tokens=len(notes), model="fake-llm")
    return {"round": job["round"], "topic": job["topic"], "notes": notes}


@task(name="coder")
async def coder(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    ctx.report(input_tokens=100 * job["round"], output_tokens=40, model="fake-llm")
    return {"round": job["round"], "lines": 10 * job["round"]}


@plan(name="merger")
async def merger(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    # Inputs arrive ordered by execution id, which differs from run to run: sort by content.
    found = sorted([i.node_id, i.status, (i.output or {}).get("topic", "")] for i in inputs)
    round_ = max(i.output["round"] for i in inputs if i.succeeded)
    return dispatch(step("check", {"round": round_, "found": found}))


@task(name="checker")
async def checker(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    refused = [node for node, status, _ in job["found"] if status == "rejected"]
    return {"round": job["round"], "branches": len(job["found"]), "refused": refused}


@plan(name="decider")
async def decider(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    [checked] = inputs
    done = checked.output
    if done["round"] >= goal["rounds"]:
        return complete({"rounds": done["round"], "last": done}, rationale="all rounds done")
    return fan_out(done["round"] + 1)


HANDLERS: list[Handler] = [intake, planner, researcher, coder, merger, checker, decider]


# --- helpers -------------------------------------------------------------------------------


def gate(h: MeshHarness) -> Gate:
    assert h.mesh.router is not None
    return h.mesh.router.gates[h.tenant]


async def put_policy(h: MeshHarness, source: str) -> guardrail_pb2.Policy:
    """Store a policy version with the guardrail service; wait until the router enforces it."""
    async with grpc.aio.insecure_channel(h.mesh.guardrail_target) as channel:
        stub = guardrail_service_pb2_grpc.GuardrailServiceStub(channel)
        response = await stub.PutPolicy(
            guardrail_service_pb2.PutPolicyRequest(source=source),
            metadata=(("x-tickmesh-tenant", h.tenant),),
        )
    policy: guardrail_pb2.Policy = response.policy
    deadline = time.monotonic() + 5
    while not any(
        (p.policy_id, p.version) == (policy.policy_id, policy.version) for p in enforced(h)
    ):
        assert time.monotonic() < deadline, f"the router does not enforce {policy.policy_id}"
        await asyncio.sleep(0.01)
    return policy


def enforced(h: MeshHarness) -> list[guardrail_pb2.Policy]:
    snapshot = gate(h).snapshot
    return [] if snapshot is None else list(snapshot.policies)


def outcome(ref: execution_pb2.ExecutionRef) -> str:
    """What a recorded step came to: a task's status, a plan's decision."""
    if ref.HasField("task_execution"):
        result = ref.task_execution.result
        status = result_pb2.TaskStatus.Name(result.status).removeprefix("TASK_STATUS_").lower()
        return f"{status}: {result.error.message}" if result.error.message else status
    decided = ref.plan_execution.result
    kind = decided.WhichOneof("decision") or "error"
    if kind == "dispatch":
        return "dispatch " + ",".join(s.node_id for s in decided.dispatch.steps)
    return kind


def task_input(d: replay.Dispatch) -> Any:
    """The input replay would send a task (the plan's step input), decoded; None for a plan."""
    if not d.envelope.HasField("task_request"):
        return None
    payload = d.envelope.task_request.input
    return codecs.decode(payload.content_type, payload.inline)


def normalise(
    report_: replay.ReplayReport, records: dict[str, execution_pb2.ExecutionRef]
) -> list[dict[str, Any]]:
    """Replay's decisions without ids: parents become step numbers (decision order)."""
    number = {d.execution_id: n for n, d in enumerate(report_.dispatched)}
    steps = []
    for n, d in enumerate(report_.dispatched):
        ref = records.get(d.execution_id)
        steps.append(
            {
                "step": n,
                "node": d.node_id,
                "handler": d.handler,
                "iteration": d.iteration,
                "parents": sorted(number.get(p, -1) for p in d.parents),
                "input": task_input(d),
                "refused": d.refused,
                "recorded": outcome(ref) if ref is not None else "not recorded",
            }
        )
    return steps


def policy_ref(policies: list[guardrail_pb2.Policy]) -> list[dict[str, Any]]:
    return [
        {"id": p.policy_id, "version": p.version, "digest": p.digest}
        for p in sorted(policies, key=lambda p: p.policy_id)
    ]


# --- the test ------------------------------------------------------------------------------


async def test_replay_reproduces_every_decision_and_a_policy_change_is_flagged_by_version(
    start_mesh: Any,
) -> None:
    h: MeshHarness = await start_mesh()
    await h.worker(HANDLERS, concurrency=8)
    graph = await h.register(GRAPH)
    v1 = await put_policy(h, policy_yaml(RECORDED_CAP))
    recorded_policies = enforced(h)

    started = time.monotonic()
    handle = await h.start(graph, {"subject": "  Replay  ", "rounds": ROUNDS})
    output = await handle.result(within=WAIT_S)
    run_s = time.monotonic() - started
    audit = await h.audit(handle.id, settle_s=2.0)
    assert audit.problems == [], audit.summary()

    # The recorded history, as ReplayLifetime reads it.
    router = h.mesh.router
    assert router is not None
    assert router.history_source is not None
    tenant = router.processor.tenants[h.tenant]
    loaded = await tenant.store.load(handle.id, fresh=True)
    assert loaded is not None
    recorded = loaded.state
    stored = await tenant.store.get_graph(graph.id, graph.version)
    refs = await router.history_source.executions(h.tenant, handle.id)
    by_id: dict[str, execution_pb2.ExecutionRef] = {}
    for ref in refs:
        by_id.setdefault(record_of(ref).header.execution_id, ref)
    assert recorded.lifetime.state == lifetime_pb2.LIFETIME_STATE_COMPLETED

    # The RPC: graph-only replay (no guardrails) reproduces the lifetime.
    rpc = await h.client.replay(handle.id)
    assert rpc.reproduced, rpc.divergences

    # Same policy version: the router's decision function reproduces every decision.
    t0 = time.perf_counter()
    same = replay.replay(
        recorded,
        stored,
        refs,
        producer=PRODUCER,
        guardrails=replay.Guardrails(gate(h), policies=enforced(h), recorded=recorded_policies),
    )
    same_ms = (time.perf_counter() - t0) * 1000
    assert same.reproduced, [d.message for d in same.divergences]
    assert same.policy_changes == []
    assert same.decisions_checked == rpc.decisions_checked
    steps = normalise(same, by_id)
    assert len(steps) == len(by_id) == 51, len(steps)
    assert {d.execution_id for d in same.dispatched} == set(by_id)

    # The YAML changes: a new version with a tighter cap.
    v2 = await put_policy(h, policy_yaml(CHANGED_CAP))
    assert (v2.policy_id, v2.version) == (v1.policy_id, v1.version + 1)
    assert v2.digest != v1.digest
    t0 = time.perf_counter()
    changed = replay.replay(
        recorded,
        stored,
        refs,
        producer=PRODUCER,
        guardrails=replay.Guardrails(gate(h), policies=enforced(h), recorded=recorded_policies),
    )
    changed_ms = (time.perf_counter() - t0) * 1000
    number = {d.execution_id: n for n, d in enumerate(changed.dispatched)}
    changed_steps = normalise(changed, by_id)

    found: dict[str, Any] = {
        "graph": {
            "id": same.graph.id,
            "version": same.graph.version,
            "digest": same.graph.digest,
        },
        "policies": policy_ref(recorded_policies),
        "decisions_checked": same.decisions_checked,
        "steps": steps,
        "end": {
            "state": lifetime_pb2.LifetimeState.Name(recorded.lifetime.state),
            "output": output,
        },
        "after_policy_change": {
            "policies": policy_ref(enforced(h)),
            "policy_changes": changed.policy_changes,
            "reproduced": changed.reproduced,
            "divergences": [
                {
                    "step": number.get(d.execution_id, -1),
                    "node": d.node.id,
                    "message": d.message,
                    "actual": d.actual,
                }
                for d in changed.divergences
            ],
            "refused_steps": [s["step"] for s in changed_steps if s["refused"]],
        },
    }
    if UPDATE_GOLDEN:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(golden_text(found))
    golden = json.loads(GOLDEN.read_text())

    # Against the golden file: same decisions as ever, under the same policy version.
    assert found["steps"] == golden["steps"], _first_difference(found["steps"], golden["steps"])
    assert found == golden

    # The changed policy: output changes, and the change is flagged by version.
    assert not changed.reproduced
    flag = (
        f"{v1.policy_id}: recorded v{v1.version} {v1.digest[:12]}, "
        f"replayed v{v2.version} {v2.digest[:12]}"
    )
    assert changed.policy_changes == [flag]
    for divergence in changed.divergences:
        assert divergence.message.startswith(f"guardrail policy changed: {flag}; ")
        assert divergence.message.endswith("the guardrail now rejects the step before dispatch")
        assert divergence.node.id == "code"
    code_iterations = [s["iteration"] for s in changed_steps if s["node"] == "code"]
    refused_now = [s["iteration"] for s in changed_steps if s["node"] == "code" and s["refused"]]
    refused_before = [s["iteration"] for s in steps if s["node"] == "code" and s["refused"]]
    assert code_iterations == list(range(1, ROUNDS + 1))
    assert refused_before == list(range(RECORDED_CAP + 1, ROUNDS + 1))
    assert refused_now == list(range(CHANGED_CAP + 1, ROUNDS + 1))
    assert len(changed.divergences) == RECORDED_CAP - CHANGED_CAP
    assert [s for s in changed_steps if s["node"] != "code"] == [
        s for s in steps if s["node"] != "code"
    ]

    figure(
        f"10 replay determinism: {len(refs)} records, {len(steps)} steps replayed, "
        f"{same.decisions_checked} decisions compared in {same_ms:.1f} ms (run {run_s:.2f} s); "
        f"golden {'rewritten' if UPDATE_GOLDEN else 'matched'}; policy v{v1.version} -> "
        f"v{v2.version}: {len(changed.divergences)} divergences flagged in {changed_ms:.1f} ms"
    )
    report.record(
        report.Row(
            test="10 replay determinism",
            fault=(
                f"guardrail YAML v{v1.version} -> v{v2.version} (code cap {RECORDED_CAP} -> "
                f"{CHANGED_CAP}): {len(changed.divergences)} divergences flagged"
            ),
            attempted=len(steps),
            acked=same.decisions_checked,
            persisted=len(refs),
            lost=len(same.divergences),  # decisions not reproduced under the same version
            duplicated=len(refs) - len(by_id),
        )
    )


def golden_text(found: dict[str, Any]) -> str:
    """``found`` as indented JSON, one line per step (a routing change reads as a line diff)."""
    text = json.dumps({**found, "steps": "<steps>"}, indent=2)
    steps = ",\n".join(f"    {json.dumps(s)}" for s in found["steps"])
    return text.replace('"<steps>"', f"[\n{steps}\n  ]") + "\n"


def _first_difference(found: list[dict[str, Any]], golden: list[dict[str, Any]]) -> str:
    for a, b in zip(found, golden, strict=False):
        if a != b:
            return f"first difference at step {a['step']}: found {a}, golden {b}"
    return f"{len(found)} steps found, {len(golden)} in the golden file"
