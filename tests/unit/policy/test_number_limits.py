"""Numbers at the edges of the float range: literals and constants that are not finite floats
are refused at load; arithmetic past the range saturates instead of raising; NaN fails closed
in membership tests as in comparisons."""

from __future__ import annotations

import math
import sys

import pytest

from tests.unit.policy.helpers import ABORT, NOW, REJECT, context, policy, snapshot
from tickmesh.runtime.policy import (
    Env,
    EvaluationError,
    ExpressionError,
    PolicyEngine,
    Usage,
    compile_expression,
    validate_policy,
)
from tickmesh.v1 import guardrail_pb2

LIFETIME = guardrail_pb2.GUARDRAIL_SCOPE_LIFETIME

RULE = """\
policy: p
rules:
  - id: r
    scope: lifetime
    action: abort_lifetime
    when: {when}
"""

HUGE_INT = "1" + "0" * 400
MAX_INT = str(int(sys.float_info.max))  # 309 digits, the largest finite float


@pytest.mark.parametrize(
    ("when", "literal"),
    [
        ("tokens > 1e400", "1e400"),
        ("tokens > 2e308", "2e308"),
        (f"cost_usd * {HUGE_INT} > 1", HUGE_INT),
        (f"tokens > {MAX_INT}0", f"{MAX_INT}0"),
        ("tokens in [1, -1e400]", "-1e400"),
        ("tokens not in [1e999]", "1e999"),
    ],
)
def test_a_literal_beyond_the_float_range_is_refused_where_it_is(when: str, literal: str) -> None:
    source = RULE.format(when=when)
    [issue] = validate_policy(source)
    assert issue.field == "rules[0].when"
    assert "not a finite number" in issue.message, issue.message
    line = source.splitlines()[issue.line - 1]
    assert line[issue.column - 1 :].startswith(literal), (issue.line, issue.column, line)


@pytest.mark.parametrize(
    ("when", "offset"),
    [
        ("tokens > 1e308 * 10", 15),
        ("tokens > -1e300 * 1e300", 16),
        (f"tokens > {MAX_INT} + {MAX_INT}", 319),
        ("tokens > 1e308 / 0.1", 15),
    ],
)
def test_a_constant_beyond_the_float_range_is_refused(when: str, offset: int) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(when, scope=LIFETIME)
    [diag] = info.value.diagnostics
    assert diag.offset == offset
    assert "not a finite number" in diag.message, diag.message


def test_every_literal_out_of_range_is_reported() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("tokens > 1e400 or cost_usd < -1e400", scope=LIFETIME)
    assert [d.offset for d in info.value.diagnostics] == [9, 30]


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("tokens < 1.7976931348623157e308", True),
        (f"tokens < {MAX_INT}", True),
        (f"tokens > -{MAX_INT}", True),
        ("tokens > 1e-400", True),  # underflows to 0: finite
        ("tokens in [1e308, 4]", True),
    ],
)
def test_the_largest_finite_numbers_are_accepted(when: str, expected: bool) -> None:
    expr = compile_expression(when, scope=LIFETIME)
    assert expr.test(Env(Usage(input_tokens=4))) is expected


HUGE_TOKENS = Usage(executions=1, input_tokens=2**63, output_tokens=2**63, custom={"zero": 0.0})
POWER = "(" + "*".join(["tokens"] * 17) + ")"  # (2**64)**17 = 2**1088: past the float range


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (f"{POWER} / 1 > 1", True),
        (f"{POWER} / executions > {MAX_INT}", True),
        (f"-{POWER} / 1 < -{MAX_INT}", True),
        (f"cost_usd + {POWER} > 1e308", True),
        (f"cost_usd - {POWER} < -1e308", True),
        (f"1.5 * {POWER} > 1e308", True),
        (f"{POWER} / 0.5 > 1e308", True),
        (f"0.5 / {POWER} == 0", True),
        (f"1 / {POWER} == 0", True),
        # Exact before rounding: 0.0 times a huge number is 0, not inf * 0 = NaN.
        (f"custom.zero * {POWER} == 0", True),
        (f"{POWER} * (1 / {POWER}) < 2", True),
    ],
)
def test_arithmetic_past_the_float_range_saturates_instead_of_raising(
    when: str, expected: bool
) -> None:
    expr = compile_expression(when, scope=LIFETIME)
    assert expr.test(Env(HUGE_TOKENS)) is expected


@pytest.mark.parametrize(
    ("score", "when", "expected"),
    [
        (math.inf, f"custom.score + {POWER} > 1e308", True),
        (-math.inf, f"custom.score + {POWER} < -1e308", True),
        (math.inf, f"{POWER} / custom.score == 0", True),
        (-math.inf, f"custom.score / {POWER} < -1e308", True),
        (-math.inf, f"custom.score * -{POWER} > 1e308", True),
    ],
)
def test_a_huge_integer_meets_an_infinite_metric(score: float, when: str, expected: bool) -> None:
    expr = compile_expression(when, scope=LIFETIME)
    usage = Usage(executions=1, input_tokens=2**63, output_tokens=2**63, custom={"score": score})
    assert expr.test(Env(usage)) is expected


def test_a_rule_past_the_float_range_decides_instead_of_failing_closed() -> None:
    source = RULE.format(when=f"{POWER} / executions > 1")
    decision = PolicyEngine().evaluate(
        snapshot(policy(source)), context(lifetime=HUGE_TOKENS), now=NOW
    )
    assert (decision.action, decision.reason) == (ABORT, "")
    [violation] = decision.violations
    assert violation.observed == math.inf


# -- NaN in membership tests


@pytest.mark.parametrize(
    "when",
    [
        "custom.score in [1, 2]",
        "custom.score not in [1, 2]",
        "custom.score in []",
        "custom.score not in []",
        "custom.score * 2 in [1]",
    ],
)
def test_a_nan_metric_in_a_membership_test_raises_like_a_comparison(when: str) -> None:
    expr = compile_expression(when, scope=LIFETIME)
    with pytest.raises(EvaluationError, match="NaN"):
        expr.test(Env(Usage(custom={"score": math.nan})))


@pytest.mark.parametrize(
    ("when", "score", "expected"),
    [
        ("custom.score in [1, 2]", 2.0, True),
        ("custom.score in [1, 2]", 3.0, False),
        ("custom.score not in [1, 2]", 3.0, True),
        ("custom.score not in [1, 2]", 1.0, False),
        ("custom.score in [1e308]", math.inf, False),
    ],
)
def test_membership_of_numbers_that_are_not_nan(when: str, score: float, expected: bool) -> None:
    expr = compile_expression(when, scope=LIFETIME)
    assert expr.test(Env(Usage(custom={"score": score}))) is expected


def test_a_nan_metric_in_a_membership_rule_fails_closed() -> None:
    source = RULE.format(when="custom.score in [1, 2]")
    decision = PolicyEngine().evaluate(
        snapshot(policy(source)),
        context(lifetime=Usage(custom={"score": math.nan})),
        now=NOW,
    )
    assert decision.action == REJECT
    assert decision.reason.startswith("evaluation_error"), decision.reason
    assert "NaN" in decision.reason
