"""The engine: fail closed, strictest action wins, dry run, scoping, and exact cap crossings."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import pytest
from google.protobuf import duration_pb2

from tests.unit.policy.helpers import (
    ABORT,
    ALLOW,
    ISSUE_4_EXAMPLE,
    NOW,
    PAUSE,
    POST,
    PRE,
    REJECT,
    context,
    one_rule,
    policy,
    snapshot,
)
from tickmesh.runtime.policy import EvaluationContext, PolicyEngine, Usage, load_policy
from tickmesh.runtime.policy import engine as engine_module
from tickmesh.runtime.policy.usage import new_usage
from tickmesh.v1 import guardrail_pb2, telemetry_pb2

LIFETIME = guardrail_pb2.GUARDRAIL_SCOPE_LIFETIME


@pytest.fixture
def engine() -> PolicyEngine:
    return PolicyEngine()


# -- fail closed


def test_missing_snapshot_rejects(engine: PolicyEngine) -> None:
    decision = engine.evaluate(None, context(), now=NOW)
    assert decision.action == REJECT
    assert decision.reason == "snapshot_missing"
    assert decision.phase == POST


def test_expired_snapshot_rejects(engine: PolicyEngine) -> None:
    snap = snapshot(issued_at=NOW - timedelta(seconds=30), lease=timedelta(seconds=30))
    at_the_end = engine.evaluate(snap, context(), now=NOW)
    assert at_the_end.action == ALLOW
    past_it = engine.evaluate(snap, context(), now=NOW + timedelta(microseconds=1))
    assert (past_it.action, past_it.reason) == (REJECT, "snapshot_expired")


def test_snapshot_without_lease_or_issue_time_is_expired(engine: PolicyEngine) -> None:
    snap = guardrail_pb2.PolicySnapshot(tenant_id="acme")
    assert engine.evaluate(snap, context(), now=NOW).reason == "snapshot_expired"


def test_expired_snapshot_rejects_even_when_its_rules_would_allow(engine: PolicyEngine) -> None:
    snap = snapshot(policy(ISSUE_4_EXAMPLE), issued_at=NOW - timedelta(hours=1))
    assert engine.evaluate(snap, context(), now=NOW).action == REJECT


def test_naive_now_is_a_programming_error(engine: PolicyEngine) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        engine.evaluate(snapshot(), context(), now=NOW.replace(tzinfo=None))


def test_snapshot_of_another_tenant_rejects(engine: PolicyEngine) -> None:
    decision = engine.evaluate(snapshot(tenant="other"), context(), now=NOW)
    assert (decision.action, decision.reason) == (REJECT, "snapshot_tenant_mismatch")


def test_unknown_phase_rejects(engine: PolicyEngine) -> None:
    decision = engine.evaluate(snapshot(), context(phase=0), now=NOW)
    assert decision.action == REJECT
    assert decision.reason.startswith("evaluation_error: ")


def test_division_by_zero_rejects_with_its_reason(engine: PolicyEngine) -> None:
    snap = snapshot(policy(one_rule("sum(tokens) / count() > 100", action="pause_lifetime")))
    decision = engine.evaluate(snap, context(lifetime=Usage(input_tokens=5)), now=NOW)
    assert decision.action == REJECT
    assert decision.reason == "evaluation_error: policy 'p' rule 'r': division by zero"
    assert list(decision.violations) == []
    assert (decision.policy_id, decision.policy_version) == ("p", 1)


def test_nan_metric_rejects(engine: PolicyEngine) -> None:
    snap = snapshot(policy(one_rule("custom.score > 0.5", scope="execution")))
    ctx = context(execution=Usage(custom={"score": float("nan")}))
    decision = engine.evaluate(snap, ctx, now=NOW)
    assert decision.action == REJECT
    assert decision.reason == "evaluation_error: policy 'p' rule 'r': a metric is NaN"


def test_failing_tenant_counters_reject(engine: PolicyEngine) -> None:
    def broken(window: float | None) -> Usage:
        raise ConnectionError("redis down")

    snap = snapshot(policy(one_rule("count() > 5", scope="tenant")))
    decision = engine.evaluate(snap, context(tenant_usage=broken), now=NOW)
    assert decision.action == REJECT
    assert decision.reason == "evaluation_error: policy 'p' rule 'r': ConnectionError: redis down"


def test_tenant_rule_without_tenant_counters_rejects(engine: PolicyEngine) -> None:
    snap = snapshot(policy(one_rule("count() > 5", scope="tenant")))
    ctx = EvaluationContext(phase=POST, header=context().header)
    decision = engine.evaluate(snap, ctx, now=NOW)
    assert decision.action == REJECT
    assert "tenant usage was not provided" in decision.reason


def test_an_error_never_weakens_a_stricter_violation(engine: PolicyEngine) -> None:
    source = (
        "policy: p\nrules:\n"
        "  - {id: cap, scope: lifetime, when: sum(tokens) > 10, action: abort_lifetime}\n"
        "  - {id: div, scope: lifetime, when: tokens / count() > 1, action: pause_lifetime}\n"
    )
    decision = engine.evaluate(
        snapshot(policy(source)), context(lifetime=Usage(input_tokens=50)), now=NOW
    )
    assert decision.action == ABORT
    assert [v.rule_id for v in decision.violations] == ["cap"]
    assert decision.reason == "evaluation_error: policy 'p' rule 'div': division by zero"


def test_invalid_policy_in_snapshot_rejects(engine: PolicyEngine) -> None:
    bad = policy("policy: p\nrules:\n  - {id: r, scope: lifetime, when: tokns > 1, action: x}\n")
    decision = engine.evaluate(snapshot(bad), context(), now=NOW)
    assert decision.action == REJECT
    assert decision.reason.startswith("evaluation_error: policy 'p' v1 ")
    assert "acme/p:3:" in decision.reason


def test_digest_that_does_not_match_the_source_rejects(engine: PolicyEngine) -> None:
    tampered = policy(one_rule("sum(tokens) > 10"))
    tampered.source = one_rule("sum(tokens) > 10000000")
    decision = engine.evaluate(snapshot(tampered), context(), now=NOW)
    assert decision.action == REJECT
    assert "digest does not match source" in decision.reason


# -- allowing and each action


def test_no_policies_allows(engine: PolicyEngine) -> None:
    decision = engine.evaluate(snapshot(), context(), now=NOW)
    assert decision == guardrail_pb2.GuardrailDecision(action=ALLOW, phase=POST)


def test_rules_that_hold_allow(engine: PolicyEngine) -> None:
    decision = engine.evaluate(snapshot(policy(ISSUE_4_EXAMPLE)), context(), now=NOW)
    assert decision == guardrail_pb2.GuardrailDecision(action=ALLOW, phase=POST)


@pytest.mark.parametrize(
    ("action", "expected"),
    [("reject_execution", REJECT), ("pause_lifetime", PAUSE), ("abort_lifetime", ABORT)],
)
def test_each_action(engine: PolicyEngine, action: str, expected: int) -> None:
    snap = snapshot(policy(one_rule("count() >= 1", action=action), version=4))
    decision = engine.evaluate(snap, context(lifetime=Usage(executions=1)), now=NOW)
    assert decision.action == expected
    assert (decision.policy_id, decision.policy_version, decision.reason) == ("p", 4, "")
    [violation] = decision.violations
    assert violation.action == expected


def test_strictest_action_wins_across_policies(engine: PolicyEngine) -> None:
    snap = snapshot(
        policy(one_rule("count() >= 1", action="reject_execution", policy_id="a"), version=1),
        policy(one_rule("count() >= 1", action="abort_lifetime", policy_id="b"), version=2),
        policy(one_rule("count() >= 1", action="pause_lifetime", policy_id="c"), version=3),
    )
    decision = engine.evaluate(snap, context(lifetime=Usage(executions=1)), now=NOW)
    assert decision.action == ABORT
    assert (decision.policy_id, decision.policy_version) == ("b", 2)
    assert [v.action for v in decision.violations] == [REJECT, ABORT, PAUSE]


def test_on_a_tie_the_first_policy_decides(engine: PolicyEngine) -> None:
    snap = snapshot(
        policy(one_rule("count() >= 1", policy_id="first")),
        policy(one_rule("count() >= 1", policy_id="second")),
    )
    decision = engine.evaluate(snap, context(lifetime=Usage(executions=1)), now=NOW)
    assert decision.policy_id == "first"


def test_snapshot_ids_and_versions_win_over_the_document(engine: PolicyEngine) -> None:
    source = "policy: doc\nversion: 9\n" + one_rule("count() >= 1").split("\n", 1)[1]
    snap = snapshot(policy(source, policy_id="stored", version=12))
    decision = engine.evaluate(snap, context(lifetime=Usage(executions=1)), now=NOW)
    assert (decision.policy_id, decision.policy_version) == ("stored", 12)


# -- dry run


@pytest.mark.parametrize("where", ["snapshot", "document"])
def test_dry_run_reports_but_allows(engine: PolicyEngine, where: str) -> None:
    source = one_rule("sum(tokens) > 10")
    if where == "document":
        source = source.replace("rules:\n", "dry_run: true\nrules:\n")
    snap = snapshot(policy(source, dry_run=where == "snapshot", version=5))
    decision = engine.evaluate(snap, context(lifetime=Usage(input_tokens=11)), now=NOW)
    assert decision.action == ALLOW
    assert decision.dry_run is True
    assert (decision.policy_id, decision.policy_version) == ("p", 5)
    [violation] = decision.violations
    assert violation.action == ABORT
    assert violation.message.startswith("dry run: ")


def test_enforced_violation_beats_dry_run(engine: PolicyEngine) -> None:
    snap = snapshot(
        policy(one_rule("count() >= 1", policy_id="trial"), dry_run=True),
        policy(one_rule("count() >= 1", action="reject_execution", policy_id="live")),
    )
    decision = engine.evaluate(snap, context(lifetime=Usage(executions=1)), now=NOW)
    assert (decision.action, decision.dry_run, decision.policy_id) == (REJECT, False, "live")
    assert len(decision.violations) == 2


def test_errors_in_a_dry_run_policy_do_not_enforce(engine: PolicyEngine) -> None:
    snap = snapshot(policy(one_rule("tokens / count() > 1"), dry_run=True))
    decision = engine.evaluate(snap, context(), now=NOW)
    assert (decision.action, decision.dry_run) == (ALLOW, True)
    assert decision.reason == "evaluation_error: policy 'p' rule 'r': division by zero"


# -- scoping


def test_graph_scoped_policy_applies_only_to_its_graph(engine: PolicyEngine) -> None:
    snap = snapshot(policy(one_rule("count() >= 1"), graph_id="billing"))
    ctx = context(lifetime=Usage(executions=1), graph_id="support-bot")
    assert engine.evaluate(snap, ctx, now=NOW).action == ALLOW
    assert engine.evaluate(snap, ctx, now=NOW, graph_id="billing").action == ABORT
    billing = context(lifetime=Usage(executions=1), graph_id="billing")
    assert engine.evaluate(snap, billing, now=NOW).action == ABORT


def test_rules_run_only_in_their_phase(engine: PolicyEngine) -> None:
    source = (
        "policy: p\nrules:\n"
        "  - {id: pre, scope: execution, phase: pre_dispatch, when: estimate.tokens > 5,"
        " action: reject_execution}\n"
        "  - {id: post, scope: execution, when: tokens > 5, action: pause_lifetime}\n"
    )
    snap = snapshot(policy(source))
    big = Usage(input_tokens=10)
    pre = engine.evaluate(snap, context(phase=PRE, estimate=big, execution=big), now=NOW)
    assert [v.rule_id for v in pre.violations] == ["pre"]
    assert (pre.action, pre.phase) == (REJECT, PRE)
    post = engine.evaluate(snap, context(phase=POST, estimate=big, execution=big), now=NOW)
    assert [v.rule_id for v in post.violations] == ["post"]
    assert (post.action, post.phase) == (PAUSE, POST)


def test_each_scope_reads_its_own_usage(engine: PolicyEngine) -> None:
    source = (
        "policy: p\nrules:\n"
        "  - {id: e, scope: execution, when: tokens == 1, action: reject_execution}\n"
        "  - {id: l, scope: lifetime, when: tokens == 2, action: reject_execution}\n"
        "  - {id: t, scope: tenant, when: tokens == 3, action: reject_execution}\n"
    )
    ctx = context(
        execution=Usage(input_tokens=1),
        lifetime=Usage(input_tokens=2),
        tenant_usage=lambda _w: Usage(input_tokens=3),
    )
    decision = engine.evaluate(snapshot(policy(source)), ctx, now=NOW)
    assert [v.rule_id for v in decision.violations] == ["e", "l", "t"]


def test_tenant_windows_pass_their_seconds_once_each(engine: PolicyEngine) -> None:
    source = (
        "policy: p\nrules:\n"
        "  - {id: day, scope: tenant, window: 24h, when: sum(cost_usd) > 50,"
        " action: pause_lifetime}\n"
        "  - {id: day2, scope: tenant, window: 1d, when: count() > 1000, action: pause_lifetime}\n"
        "  - {id: burst, scope: tenant, window: 90s, when: count() > 10,"
        " action: reject_execution}\n"
        "  - {id: ever, scope: tenant, when: sum(tokens) > 1e9, action: abort_lifetime}\n"
        "  - {id: life, scope: lifetime, when: count() > 1000, action: abort_lifetime}\n"
    )
    calls: list[float | None] = []
    spend = {86_400.0: Usage(cost_micros=50_000_001), 90.0: Usage(executions=3), None: Usage()}

    def tenant_usage(window: float | None) -> Usage:
        calls.append(window)
        return spend[window]

    decision = engine.evaluate(
        snapshot(policy(source)), context(tenant_usage=tenant_usage), now=NOW
    )
    assert calls == [86_400.0, 90.0, None]
    assert decision.action == PAUSE
    [violation] = decision.violations
    assert (violation.rule_id, violation.observed, violation.limit) == ("day", 50.000001, 50.0)


def test_tenant_counters_are_not_read_without_tenant_rules(engine: PolicyEngine) -> None:
    def untouchable(window: float | None) -> Usage:
        raise AssertionError("called")

    snap = snapshot(policy(one_rule("count() > 1")))
    assert engine.evaluate(snap, context(tenant_usage=untouchable), now=NOW).action == ALLOW


# -- what a violation says


def test_violation_carries_metric_observed_limit_and_message(engine: PolicyEngine) -> None:
    decision = engine.evaluate(
        snapshot(policy(ISSUE_4_EXAMPLE, version=3)),
        context(lifetime=Usage(input_tokens=9_000, output_tokens=1_500)),
        now=NOW,
    )
    assert decision.action == ABORT
    assert (decision.policy_id, decision.policy_version) == ("default", 3)
    assert list(decision.violations) == [
        guardrail_pb2.Violation(
            rule_id="lifetime-token-cap",
            scope=LIFETIME,
            metric="sum(tokens)",
            observed=10_500,
            limit=10_000,
            message="sum(tokens) = 10500, limit 10000 (sum(tokens) > 10000)",
            action=ABORT,
        )
    ]


def test_pre_dispatch_reservation_from_issue_4(engine: PolicyEngine) -> None:
    snap = snapshot(policy(ISSUE_4_EXAMPLE))
    cheap = context(phase=PRE, estimate=Usage(cost_micros=2_000_000))
    assert engine.evaluate(snap, cheap, now=NOW).action == ALLOW
    pricey = context(phase=PRE, estimate=Usage(cost_micros=2_000_001))
    decision = engine.evaluate(snap, pricey, now=NOW)
    assert decision.action == REJECT
    [violation] = decision.violations
    assert (violation.metric, violation.observed, violation.limit) == (
        "estimate.cost_usd",
        2.000001,
        2.0,
    )
    other_handler = context(phase=PRE, estimate=Usage(cost_micros=9_000_000), handler="search")
    assert engine.evaluate(snap, other_handler, now=NOW).action == ALLOW


def test_author_message_is_used(engine: PolicyEngine) -> None:
    source = one_rule("count() > 2 or tokens > 5", extra="    message: loop detected\n")
    decision = engine.evaluate(
        snapshot(policy(source)), context(lifetime=Usage(executions=3)), now=NOW
    )
    [violation] = decision.violations
    assert violation.message == "loop detected"
    assert (violation.metric, violation.observed, violation.limit) == (
        "count() > 2 or tokens > 5",
        0.0,
        0.0,
    )


# -- crossing a cap at exactly the step that crosses it


def test_lifetime_token_cap_aborts_at_exactly_the_crossing_step(engine: PolicyEngine) -> None:
    snap = snapshot(policy(ISSUE_4_EXAMPLE))
    lifetime = Usage()
    actions = []
    for tokens in (4_000, 5_999, 2, 1):
        execution = Usage.of(
            telemetry_pb2.Telemetry(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2)
        )
        lifetime = lifetime.plus(execution)
        ctx = context(execution=execution, lifetime=lifetime)
        decision = engine.evaluate(snap, ctx, now=NOW)
        actions.append((lifetime.input_tokens + lifetime.output_tokens, decision.action))
    assert actions == [(4_000, ALLOW), (9_999, ALLOW), (10_001, ABORT), (10_002, ABORT)]


@pytest.mark.parametrize(("total", "expected"), [(9_999, ALLOW), (10_000, ALLOW), (10_001, ABORT)])
def test_cap_boundary(engine: PolicyEngine, total: int, expected: int) -> None:
    snap = snapshot(policy(ISSUE_4_EXAMPLE))
    decision = engine.evaluate(snap, context(lifetime=Usage(output_tokens=total)), now=NOW)
    assert decision.action == expected


# -- caching


def test_policies_compile_once_per_digest(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = load_policy

    def counting(source: str, *, name: str = "<policy>") -> object:
        calls.append(name)
        return real(source, name=name)

    monkeypatch.setattr(engine_module, "load_policy", counting)
    snap = snapshot(policy(ISSUE_4_EXAMPLE))
    for _ in range(5):
        engine.evaluate(snap, context(), now=NOW)
    no_digest = policy(one_rule("count() > 1"))
    no_digest.digest = ""
    for _ in range(3):
        engine.evaluate(snapshot(no_digest), context(), now=NOW)
    assert calls == ["acme/default", "acme/p"]
    assert engine.compile(snap.policies[0]).id == "default"


def test_cache_is_bounded() -> None:
    engine = PolicyEngine(cache_size=2)
    for limit in range(5):
        engine.compile(policy(one_rule(f"count() > {limit}")))
    assert len(engine._cache) == 2


# -- usage arithmetic


def test_usage_of_telemetry() -> None:
    telemetry = telemetry_pb2.Telemetry(
        input_tokens=10,
        output_tokens=5,
        cost_micros=1_234,
        model_calls=2,
        tool_calls=3,
        run_time=duration_pb2.Duration(seconds=1, nanos=500_000_000),
        custom_metrics={"score": 0.5},
    )
    usage = Usage.of(telemetry, iteration=4, fanout=2, depth=3)
    assert (usage.executions, usage.input_tokens, usage.output_tokens, usage.cost_micros) == (
        1,
        10,
        5,
        1_234,
    )
    assert (usage.model_calls, usage.tool_calls, usage.wall_time_s) == (2, 3, 1.5)
    assert (usage.iterations, usage.fanout, usage.depth) == (4, 2, 3)
    assert usage.custom == {"score": 0.5}
    assert usage.max_values["tokens"] == 15
    assert usage.max_values["custom.score"] == 0.5


def test_usage_plus_adds_counters_and_keeps_high_water_marks() -> None:
    a = Usage.of(telemetry_pb2.Telemetry(input_tokens=10, custom_metrics={"x": 1.0}), iteration=3)
    b = Usage.of(telemetry_pb2.Telemetry(input_tokens=30, custom_metrics={"y": 2.0}), iteration=1)
    total = a.plus(b)
    assert (total.executions, total.input_tokens, total.iterations) == (2, 40, 3)
    assert total.custom == {"x": 1.0, "y": 2.0}
    assert total.max_values["input_tokens"] == 30
    assert total.max_values["iterations"] == 3
    assert Usage().plus(total) == total


def test_usage_plus_all_equals_adding_one_at_a_time() -> None:
    items = [
        Usage.of(
            telemetry_pb2.Telemetry(
                input_tokens=i,
                cost_micros=7 * i,
                run_time=duration_pb2.Duration(nanos=100_000_007 * i),
                custom_metrics={"x": 0.1 * i} if i % 2 else {"y": float("nan") if i == 4 else i},
            ),
            iteration=i % 3,
            fanout=i % 4,
            depth=i,
        )
        for i in range(1, 9)
    ]
    base = Usage.of(telemetry_pb2.Telemetry(output_tokens=3, custom_metrics={"x": 0.3}))
    one_by_one = base
    for item in items:
        one_by_one = one_by_one.plus(item)
    together = base.plus_all(items)
    assert repr(together) == repr(one_by_one)  # NaN != NaN, but prints the same
    assert together.wall_time_s == one_by_one.wall_time_s
    assert base.plus_all([]) == base


def test_new_usage_is_the_same_frozen_usage_as_the_constructor_builds() -> None:
    values: dict[str, Any] = {
        "executions": 3,
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_micros": 7,
        "model_calls": 2,
        "tool_calls": 1,
        "iterations": 4,
        "wall_time_s": 1.5,
        "fanout": 2,
        "depth": 6,
        "max_values": MappingProxyType({"tokens": 15.0}),
        "custom": MappingProxyType({"score": 0.5}),
    }
    assert set(values) == {f.name for f in dataclasses.fields(Usage)}  # every field, set
    built = new_usage(**values)
    assert built == Usage(**values)
    assert repr(built) == repr(Usage(**values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.executions = 4  # type: ignore[misc]
    missing = {k: v for k, v in values.items() if k != "depth"}
    with pytest.raises(TypeError):
        new_usage(**missing)


def test_reads_usage_only_when_a_rule_of_the_phase_applies(engine: PolicyEngine) -> None:
    post_only = policy(one_rule("sum(tokens) > 10"))
    pre_bound = policy(one_rule("tokens > 5", phase="pre_dispatch"), graph_id="other")
    snap = snapshot(post_only, pre_bound)
    assert engine.reads_usage(snap, POST, "g")
    # The only pre_dispatch rule is bound to another graph.
    assert not engine.reads_usage(snap, PRE, "g")
    assert engine.reads_usage(snap, PRE, "other")
    # Whatever makes evaluate fail closed is left to evaluate, with usage built.
    assert engine.reads_usage(None, PRE, "g")
    broken = policy("policy: p\nrules: [", policy_id="p")
    assert engine.reads_usage(snapshot(broken), PRE, "g")
    assert not engine.reads_usage(snapshot(), PRE, "g")


def test_a_phase_without_rules_decides_the_same_without_usage(engine: PolicyEngine) -> None:
    snap = snapshot(policy(one_rule("sum(tokens) > 10")))
    assert not engine.reads_usage(snap, PRE, "g")
    empty = EvaluationContext(phase=PRE, header=context(phase=PRE).header)
    full = context(phase=PRE, lifetime=Usage(input_tokens=50))
    assert engine.evaluate(snap, empty, now=NOW) == engine.evaluate(snap, full, now=NOW)
    assert engine.evaluate(snap, empty, now=NOW).action == ALLOW
    # An expired snapshot still refuses, usage or not.
    late = NOW + timedelta(minutes=5)
    assert engine.evaluate(snap, empty, now=late).reason == "snapshot_expired"
