"""Property tests: evaluation never raises on arbitrary telemetry and is deterministic."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.policy.helpers import ISSUE_4_EXAMPLE, NOW, POST, PRE, header, policy, snapshot
from tickmesh.runtime.policy import EvaluationContext, PolicyEngine, Usage
from tickmesh.v1 import guardrail_pb2, telemetry_pb2

ARITHMETIC = """\
policy: arithmetic
rules:
  - id: ratio
    scope: lifetime
    when: sum(tokens) / count() > 5000
    action: pause_lifetime
  - id: avg
    scope: lifetime
    when: avg(cost_usd) * 2 - 1 >= max(cost_usd)
    action: reject_execution
  - id: custom
    scope: execution
    when: custom.score / custom.weight < -1
    action: abort_lifetime
  - id: mix
    scope: execution
    when: tokens * cost_usd > 1e30 or -wall_time_s < -3600
    action: reject_execution
  - id: eq
    scope: execution
    when: output_tokens == input_tokens and tokens != 0
    action: reject_execution
  - id: labels
    scope: execution
    when: labels.tier in ["free"] and model_calls + tool_calls > 100
    action: reject_execution
  - id: iters
    scope: lifetime
    when: iterations >= 50 or fanout > 8 or depth > 12
    action: abort_lifetime
  - id: tenant
    scope: tenant
    window: 1h
    when: sum(cost_micros) / 1e6 > 10
    action: pause_lifetime
  - id: max-custom
    scope: tenant
    when: max(custom.score) > 0.9
    action: pause_lifetime
  - id: reserve
    scope: lifetime
    phase: pre_dispatch
    when: sum(cost_usd) + estimate.cost_usd > 5
    action: reject_execution
  - id: guess
    scope: execution
    phase: pre_dispatch
    when: estimate.tokens / estimate.model_calls > 1000
    action: reject_execution
"""

POLICIES = (
    policy(ISSUE_4_EXAMPLE),
    policy(ARITHMETIC),
    policy(
        "policy: trial\ndry_run: true\nrules:\n"
        "  - {id: t, scope: lifetime, when: sum(tool_calls) > 3, action: abort_lifetime}\n"
    ),
    policy(
        "policy: other-graph\nrules:\n"
        "  - {id: g, scope: execution, when: count() >= 0, action: abort_lifetime}\n",
        graph_id="another",
    ),
)
SNAPSHOT = snapshot(*POLICIES, lease=timedelta(minutes=5))
# Two engines with their own caches: the same decision must not depend on which one compiled.
ENGINE = PolicyEngine()
OTHER_ENGINE = PolicyEngine()

INT64 = st.integers(min_value=-(2**62), max_value=2**62)
UINT32 = st.integers(min_value=0, max_value=2**32 - 1)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 5e-324]),
)


@st.composite
def telemetries(draw: st.DrawFn) -> telemetry_pb2.Telemetry:
    t = telemetry_pb2.Telemetry(
        input_tokens=draw(INT64),
        output_tokens=draw(INT64),
        cost_micros=draw(INT64),
        model_calls=draw(UINT32),
        tool_calls=draw(UINT32),
        custom_metrics=draw(
            st.dictionaries(st.sampled_from(["score", "weight", "other"]), FLOATS, max_size=3)
        ),
    )
    t.run_time.seconds = draw(st.integers(min_value=-315_576_000_000, max_value=315_576_000_000))
    t.run_time.nanos = draw(st.integers(min_value=0, max_value=999_999_999))
    return t


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    parts = [
        Usage.of(
            draw(telemetries()),
            iteration=draw(UINT32),
            fanout=draw(st.integers(min_value=0, max_value=1000)),
            depth=draw(st.integers(min_value=0, max_value=1000)),
        )
        for _ in range(draw(st.integers(min_value=0, max_value=3)))
    ]
    total = Usage()
    for part in parts:
        total = total.plus(part)
    return total


@st.composite
def contexts(draw: st.DrawFn) -> EvaluationContext:
    by_window = {w: draw(usages()) for w in (3600.0, None)}
    return EvaluationContext(
        phase=draw(st.sampled_from([PRE, POST])),
        header=header(
            handler=draw(st.sampled_from(["llm_call", "search", ""])),
            attempt=draw(UINT32),
            labels=draw(st.dictionaries(st.sampled_from(["tier", "team"]), st.text(max_size=5))),
        ),
        execution=draw(usages()),
        estimate=draw(usages()),
        lifetime=draw(usages()),
        tenant_usage=lambda window: by_window[window],
    )


ACTIONS = {
    guardrail_pb2.GUARDRAIL_ACTION_ALLOW,
    guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
    guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME,
    guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME,
}


@settings(max_examples=200, deadline=None)
@given(ctx=contexts())
def test_evaluation_never_raises_and_is_deterministic(ctx: EvaluationContext) -> None:
    first = ENGINE.evaluate(SNAPSHOT, ctx, now=NOW)
    again = ENGINE.evaluate(SNAPSHOT, ctx, now=NOW)
    other = OTHER_ENGINE.evaluate(SNAPSHOT, ctx, now=NOW)
    assert first == again == other
    assert first.action in ACTIONS
    assert first.phase == ctx.phase
    if first.reason.startswith("evaluation_error"):
        assert first.action != guardrail_pb2.GUARDRAIL_ACTION_ALLOW
    assert all(v.rule_id != "g" for v in first.violations)  # another graph's policy


@given(seconds=st.integers(min_value=-(10**6), max_value=10**6))
def test_expiry_is_a_pure_function_of_now(seconds: int) -> None:
    ctx = EvaluationContext(phase=POST, header=header(), tenant_usage=lambda _w: Usage())
    now = NOW + timedelta(seconds=seconds)
    decision = ENGINE.evaluate(SNAPSHOT, ctx, now=now)
    expired = seconds > 300
    assert (decision.reason == "snapshot_expired") is expired
