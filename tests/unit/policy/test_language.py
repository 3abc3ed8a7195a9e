"""The expression language: syntax, precedence, every operator and name, and type errors."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tests.unit.policy.helpers import POST, PRE, header
from tickmesh.runtime.policy import (
    MAX_POLICY_BYTES,
    Env,
    EvaluationError,
    ExpressionError,
    Type,
    Usage,
    compile_expression,
)
from tickmesh.runtime.policy.language import MAX_EXPRESSION_DEPTH
from tickmesh.v1 import graph_pb2, guardrail_pb2

LIFETIME = guardrail_pb2.GUARDRAIL_SCOPE_LIFETIME
EXECUTION = guardrail_pb2.GUARDRAIL_SCOPE_EXECUTION

USAGE = Usage(
    executions=4,
    input_tokens=300,
    output_tokens=100,
    cost_micros=2_500_000,
    model_calls=3,
    tool_calls=5,
    iterations=6,
    wall_time_s=1.5,
    fanout=2,
    depth=3,
    max_values={"tokens": 250, "cost_micros": 1_000_000, "custom.score": 0.75},
    custom={"score": 2.0},
)
ESTIMATE = Usage(input_tokens=40, output_tokens=2, cost_micros=3_000_000, custom={"risk": 0.5})


def run(
    text: str,
    *,
    phase: int = POST,
    scope: int = LIFETIME,
    usage: Usage = USAGE,
    estimate: Usage = ESTIMATE,
    **header_fields: Any,
) -> Any:
    expr = compile_expression(text, scope=scope, phase=phase, expect=None)
    return expr.test(Env(usage, estimate, header(**header_fields)))


def problems(text: str, *, phase: int = POST, scope: int = LIFETIME) -> list[tuple[int, str]]:
    with pytest.raises(ExpressionError) as info:
        compile_expression(text, scope=scope, phase=phase)
    return [(d.offset, d.message) for d in info.value.diagnostics]


# -- precedence and grouping


def test_or_binds_looser_than_and_and_not() -> None:
    # true or (false and (not true)) is true; ((true or false) and not true) would be false.
    assert run("true or false and not true") is True
    assert run("(true or false) and not true") is False


def test_precedence_with_runtime_values() -> None:
    # tokens = 400: a(true) or (b(false) and not c(true)) -> true
    assert run("tokens > 1 or tokens > 1000 and not tokens > 3") is True
    assert run("(tokens > 1 or tokens > 1000) and not tokens > 3") is False


def test_not_binds_looser_than_comparison() -> None:
    assert run("not tokens > 1000") is True
    assert run("not not true") is True


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 2 - 3", 5),
        ("8 / 4 / 2", 1),
        ("-2 * -3", 6),
        ("- (2 + 3)", -5),
        ("tokens - input_tokens * 2", -200),
        ("-tokens", -400),
        ("tokens / executions", 100),
        ("((((tokens))))", 400),
    ],
)
def test_arithmetic_precedence_and_associativity(text: str, value: float) -> None:
    assert run(text) == value


# -- operators


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tokens == 400", True),
        ("tokens == 401", False),
        ("tokens != 401", True),
        ("tokens != 400", False),
        ("tokens < 401", True),
        ("tokens < 400", False),
        ("tokens <= 400", True),
        ("tokens <= 399", False),
        ("tokens > 399", True),
        ("tokens > 400", False),
        ("tokens >= 400", True),
        ("tokens >= 401", False),
        ("399 < tokens", True),
        ("tokens + 1 > tokens", True),
        ("tokens * 2 == 800", True),
        ("tokens / 3 > 133.3", True),
        ("tokens - 400 == 0", True),
        ('node.handler == "llm_call"', True),
        ('node.handler != "llm_call"', False),
        ("true == true", True),
        ("true != false", True),
    ],
)
def test_each_operator(text: str, expected: bool) -> None:
    assert run(text) is expected


def test_and_or_short_circuit_over_errors() -> None:
    assert run("false and tokens / 0.5 / (executions - 4) > 1") is False
    assert run("true or tokens / (executions - 4) > 1") is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('node.handler in ["llm_call", "search"]', True),
        ('node.handler in ["search"]', False),
        ('node.handler not in ["search", "fetch"]', True),
        ('labels.tier in ["free", "trial",]', True),
        ("node.handler in []", False),
        ("attempt in [1, 2, 3]", True),
        ("attempt in [-1, 2.5]", False),
    ],
)
def test_in_and_not_in(text: str, expected: bool) -> None:
    assert run(text, labels={"tier": "free"}) is expected


# -- numbers and strings


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10_000", 10_000),
        ("1_000_000.5", 1_000_000.5),
        ("1.5", 1.5),
        ("0.25", 0.25),
        ("1e3", 1000.0),
        ("2.5e-1", 0.25),
        ("1E+2", 100.0),
        ("0", 0),
        ("007", 7),
    ],
)
def test_number_formats(text: str, value: float) -> None:
    expr = compile_expression(text, expect=Type.NUMBER)
    assert expr.test(Env()) == value


@pytest.mark.parametrize(
    ("text", "offset", "fragment"),
    [
        ("1__0 > 1", 0, "malformed number '1__0'"),
        ("10_ > 1", 0, "malformed number '10_'"),
        ("10k > 1", 0, "malformed number"),
        ("tokens > 1.", 9, "malformed number '1.'"),
        ("tokens > 1.5.2", 9, "malformed number"),
    ],
)
def test_malformed_numbers(text: str, offset: int, fragment: str) -> None:
    [(where, message)] = problems(text)
    assert where == offset
    assert fragment in message


def test_strings_in_either_quote_with_escapes() -> None:
    assert run("""node.id == 'a "quoted" id'""", node_id='a "quoted" id') is True
    assert run(r'node.id == "it\'s \\ \"x\""', node_id='it\'s \\ "x"') is True
    assert run(r'node.id == "tab\there"', node_id="tab\there") is True


# -- names


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("tokens", 400),
        ("input_tokens", 300),
        ("output_tokens", 100),
        ("cost_usd", 2.5),
        ("cost_micros", 2_500_000),
        ("iterations", 6),
        ("executions", 4),
        ("wall_time_s", 1.5),
        ("fanout", 2),
        ("depth", 3),
        ("model_calls", 3),
        ("tool_calls", 5),
        ("custom.score", 2.0),
        ("custom.missing", 0.0),
        ("attempt", 2),
        ("graph.version", 7),
        ("node.id", "call"),
        ("node.handler", "llm_call"),
        ("node.kind", "task"),
        ("graph.id", "support-bot"),
        ("labels.team", "search"),
        ("labels.missing", ""),
    ],
)
def test_field_access(text: str, value: Any) -> None:
    assert run(text, attempt=2, labels={"team": "search"}) == value


def test_node_kind_names() -> None:
    assert run("node.kind", kind=graph_pb2.NODE_KIND_PLAN) == "plan"
    assert run("node.kind", kind=graph_pb2.NODE_KIND_UNSPECIFIED) == ""


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("estimate.tokens", 42),
        ("estimate.cost_usd", 3.0),
        ("estimate.input_tokens", 40),
        ("estimate.custom.risk", 0.5),
        ("estimate.custom.none", 0.0),
    ],
)
def test_estimate_fields_before_dispatch(text: str, value: float) -> None:
    assert run(text, phase=PRE) == value


# -- aggregates


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("sum(tokens)", 400),
        ("sum(cost_usd)", 2.5),
        ("sum(custom.score)", 2.0),
        ("max(tokens)", 250),
        ("max(cost_usd)", 1.0),
        ("max(custom.score)", 0.75),
        ("max(tool_calls)", 0),
        ("count()", 4),
        ("avg(tokens)", 100),
        ("avg(cost_usd)", 0.625),
        ("avg(custom.score)", 0.5),
    ],
)
def test_each_aggregate(text: str, value: float) -> None:
    assert run(text) == value


def test_avg_of_an_empty_scope_is_zero() -> None:
    assert run("avg(tokens)", usage=Usage()) == 0.0


# -- violation reporting


def test_simple_comparison_reports_left_side_and_limit() -> None:
    expr = compile_expression("sum(tokens)  >  10_000")
    assert expr.metric == "sum(tokens)"
    assert expr.measure(Env(USAGE)) == (400.0, 10_000.0)


def test_limit_on_the_left_is_still_the_limit() -> None:
    expr = compile_expression("10000 < sum(tokens)")
    assert expr.metric == "sum(tokens)"
    assert expr.measure(Env(USAGE)) == (400.0, 10_000.0)


def test_conjunction_reports_its_numeric_comparison() -> None:
    expr = compile_expression(
        'node.handler == "llm_call" and estimate.cost_usd > 2', scope=EXECUTION, phase=PRE
    )
    assert expr.metric == "estimate.cost_usd"
    assert expr.measure(Env(estimate=ESTIMATE, header=header())) == (3.0, 2.0)


def test_disjunction_reports_the_whole_expression() -> None:
    expr = compile_expression("tokens > 1  or   cost_usd > 2")
    assert expr.metric == "tokens > 1 or cost_usd > 2"
    assert expr.observed is None
    assert expr.measure(Env(USAGE)) == (0.0, 0.0)


def test_constant_subexpressions_are_folded_into_the_limit() -> None:
    expr = compile_expression("sum(cost_usd) > 50 * 2")
    assert expr.measure(Env(USAGE)) == (2.5, 100.0)


# -- runtime failures


def test_division_by_zero_at_runtime_raises() -> None:
    expr = compile_expression("tokens / executions > 1")
    with pytest.raises(ZeroDivisionError):
        expr.test(Env(Usage(input_tokens=5)))


def test_nan_metric_raises_instead_of_comparing_false() -> None:
    expr = compile_expression("custom.score > 1")
    with pytest.raises(EvaluationError, match="NaN"):
        expr.test(Env(Usage(custom={"score": math.nan})))


def test_infinite_metric_compares() -> None:
    expr = compile_expression("custom.score > 1")
    assert expr.test(Env(Usage(custom={"score": math.inf}))) is True


# -- syntax errors


@pytest.mark.parametrize(
    ("text", "offset", "fragment"),
    [
        ("", 0, "expected an expression"),
        ("   ", 0, "expected an expression"),
        ("tokens >", 8, "expected a number, string, name or '(', but the expression ended"),
        ("tokens = 5", 7, "compare with '=='"),
        ("tokens > 1 && tokens < 5", 11, "use 'and'"),
        ("tokens > 1 || tokens < 5", 11, "use 'or'"),
        ("!(tokens > 1)", 0, "use 'not'"),
        ('node.id == "abc', 11, "unterminated string"),
        (r'node.id == "a\qb"', 13, "unknown escape"),
        ("1 < tokens < 5", 11, "comparisons do not chain"),
        ("(tokens > 1", 11, "')' to close the '(' at offset 0"),
        ("tokens > 1)", 10, "unmatched ')'"),
        ("tokens 5", 7, "expected an operator"),
        ('tokens in "a"', 10, "expected a list after 'in'"),
        ("tokens in [tokens]", 11, "a literal list item"),
        ("[1] == tokens", 0, "only allowed after 'in'"),
        ("node. > 1", 6, "a field name after 'node.'"),
        ("tokens > and", 9, "expected a number, string, name or '('"),
        ("sum(tokens > 1", 14, "',' or ')' to close sum("),
    ],
)
def test_syntax_errors_say_where_and_what_was_expected(
    text: str, offset: int, fragment: str
) -> None:
    [(where, message)] = problems(text)
    assert (where, fragment in message) == (offset, True), message


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    deep = "(" * 500 + "1" + ")" * 500 + " > 0"
    [(_, message)] = problems(deep)
    assert f"nested deeper than {MAX_EXPRESSION_DEPTH}" in message
    [(_, message)] = problems("not " * 500 + "true")
    assert "nested deeper" in message
    [(_, message)] = problems("-" * 500 + "1 > 0")
    assert "nested deeper" in message


def test_long_operator_chains_are_bounded() -> None:
    [(_, message)] = problems(" + ".join(["tokens"] * 200) + " > 0")
    assert "nested deeper" in message
    ok = " + ".join(["tokens"] * 30) + " > 0"
    assert compile_expression(ok).test(Env(USAGE)) is True


def test_oversized_expression_is_refused() -> None:
    [(_, message)] = problems("tokens > " + "1" * MAX_POLICY_BYTES)
    assert "longer than" in message


# -- type errors


@pytest.mark.parametrize(
    ("text", "offset", "fragment"),
    [
        ('tokens > "10"', 7, "cannot compare a number with a string using '>'"),
        ("node.handler == 5", 13, "cannot compare a string with a number"),
        ('node.id < "b"', 8, "'<' needs numbers, got strings"),
        ("tokens + node.id > 1", 7, "'+' needs numbers on both sides, got a string"),
        ("-node.id == 1", 1, "unary '-' needs a number"),
        ("not tokens", 4, "'not' needs a boolean, got a number"),
        ("tokens and true", 0, "'and' needs booleans on both sides, got a number 'tokens'"),
        ("true or cost_usd", 8, "'or' needs booleans"),
        ("tokens", 0, "expected a bool, got a number; expected a condition such as 'tokens > 0'"),
        ("node.id", 0, "expected a bool, got a string"),
        ('tokens in ["a"]', 11, "list item is a string but 'tokens' is a number"),
        ("tokens > 1 / 0", 13, "division by zero"),
    ],
)
def test_type_errors(text: str, offset: int, fragment: str) -> None:
    found = problems(text)
    assert (offset, fragment) in [(o, fragment) for o, m in found if fragment in m], found


def test_unknown_name_suggests_and_lists_known_names() -> None:
    [(offset, message)] = problems("sum(tokens) > 1 and tokns > 5")
    assert offset == 20
    assert "unknown name 'tokns'; did you mean 'tokens'?" in message
    for name in ("cost_usd", "custom.<name>", "labels.<key>", "node.handler", "estimate.<metric>"):
        assert name in message


def test_unknown_name_without_a_close_match() -> None:
    [(_, message)] = problems("zzzzzz > 1")
    assert "did you mean" not in message
    assert "Known names: attempt, cost_micros" in message


def test_every_problem_is_reported_not_just_the_first() -> None:
    found = problems("foo > 1 and node.id > 2 and sum(node.id) > 1")
    assert [offset for offset, _ in found] == [0, 20, 32]


@pytest.mark.parametrize(
    ("text", "offset", "fragment"),
    [
        ("sum(node.id) > 1", 4, "cannot aggregate 'node.id': it is a string"),
        ("sum(attempt) > 1", 4, "cannot aggregate 'attempt': it is not a usage metric"),
        ("max(graph.version) > 1", 4, "not a usage metric"),
        ("avg(tokens + 1) > 1", 4, "got the expression 'tokens + 1'"),
        ("sum(estimate.tokens) > 1", 4, "one step's estimate, not a series"),
        ("sum(tokns) > 1", 4, "unknown name 'tokns'"),
        ("sum() > 1", 4, "sum() takes exactly one metric"),
        ("sum(tokens, cost_usd) > 1", 12, "takes exactly one metric"),
        ("count(tokens) > 1", 6, "count() takes no argument"),
        ("median(tokens) > 1", 0, "unknown function 'median'; expected one of: avg(), count()"),
    ],
)
def test_aggregate_errors(text: str, offset: int, fragment: str) -> None:
    [(where, message)] = problems(text, phase=PRE)
    assert (where, fragment in message) == (offset, True), message


def test_estimate_is_refused_after_the_result() -> None:
    [(offset, message)] = problems("tokens > 1 and estimate.cost_usd > 2", phase=POST)
    assert offset == 15
    assert "'estimate.cost_usd' is only known before dispatch" in message
    assert "expected phase: pre_dispatch (or 'cost_usd' after the result)" in message


def test_execution_usage_is_refused_before_dispatch() -> None:
    found = problems("tokens > 1 or count() > 2", scope=EXECUTION, phase=PRE)
    assert [offset for offset, _ in found] == [0, 14]
    assert "unknown before dispatch; expected estimate.<metric>" in found[0][1]


def test_lifetime_rules_may_reserve_against_the_estimate_before_dispatch() -> None:
    expr = compile_expression("sum(cost_usd) + estimate.cost_usd > 5", scope=LIFETIME, phase=PRE)
    assert expr.reads_scope
    assert expr.reads_estimate
    assert expr.test(Env(USAGE, ESTIMATE)) is True
