"""Policy documents: the issue-4 example loads; everything else is refused with line and column."""

from __future__ import annotations

import pytest

from tests.unit.policy.helpers import ISSUE_4_EXAMPLE
from tickmesh.runtime.policy import (
    MAX_NESTING,
    MAX_POLICY_BYTES,
    MAX_RULES,
    load_policy,
    validate_policy,
)
from tickmesh.sdk import Issue, ValidationError
from tickmesh.v1 import guardrail_pb2 as g


def where(issues: list[Issue]) -> list[tuple[int, int, str]]:
    return [(i.line, i.column, i.field) for i in issues]


def only(source: str) -> Issue:
    issues = validate_policy(source)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


def test_issue_4_example_loads() -> None:
    policy = load_policy(ISSUE_4_EXAMPLE)
    assert (policy.id, policy.version, policy.dry_run) == ("default", 3, False)
    cap, spend, step = policy.rules
    assert (cap.id, cap.scope, cap.action, cap.phase, cap.window_s) == (
        "lifetime-token-cap",
        g.GUARDRAIL_SCOPE_LIFETIME,
        g.GUARDRAIL_ACTION_ABORT_LIFETIME,
        g.GUARDRAIL_PHASE_POST_RESULT,
        None,
    )
    assert (spend.scope, spend.action, spend.window_s) == (
        g.GUARDRAIL_SCOPE_TENANT,
        g.GUARDRAIL_ACTION_PAUSE_LIFETIME,
        86_400.0,
    )
    assert (step.scope, step.action, step.phase) == (
        g.GUARDRAIL_SCOPE_EXECUTION,
        g.GUARDRAIL_ACTION_REJECT_EXECUTION,
        g.GUARDRAIL_PHASE_PRE_DISPATCH,
    )
    assert step.when.metric == "estimate.cost_usd"
    assert policy.rules_for(g.GUARDRAIL_PHASE_PRE_DISPATCH) == (step,)
    assert policy.rules_for(g.GUARDRAIL_PHASE_POST_RESULT) == (cap, spend)
    assert [r.line for r in policy.rules] == [4, 8, 13]
    assert validate_policy(ISSUE_4_EXAMPLE) == []


def test_optional_fields() -> None:
    policy = load_policy(
        "policy: p.v2_x-1\n"
        "description: caps\n"
        "dry_run: true\n"
        "rules:\n"
        "  - id: r\n"
        "    scope: execution\n"
        "    when: tokens > 5\n"
        "    action: reject_execution\n"
        "    message: too many tokens\n"
    )
    assert (policy.id, policy.version, policy.description, policy.dry_run) == (
        "p.v2_x-1",
        1,
        "caps",
        True,
    )
    assert policy.rules[0].message == "too many tokens"


@pytest.mark.parametrize(
    ("window", "seconds"), [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)]
)
def test_windows(window: str, seconds: float) -> None:
    rule = f"{{id: r, scope: tenant, window: {window}, when: count() > 1, action: pause_lifetime}}"
    source = f"policy: p\nrules:\n  - {rule}\n"
    assert load_policy(source).rules[0].window_s == seconds


# -- type errors with exact positions, through every way YAML can hold the expression

MULTILINE = """\
policy: typed
rules:
  - id: plain
    scope: lifetime
    when: sum(tokens) > "many"
    action: abort_lifetime
  - id: quoted
    scope: execution
    when: "node.handler == 'llm' and tokns > 5"
    action: reject_execution
  - id: folded
    scope: lifetime
    when: >
      sum(tokens) > 10
        and avg(node.id) > 2
    action: pause_lifetime
  - id: literal
    scope: execution
    when: |
      tokens > 5 or
      tokens
    action: reject_execution
  - id: estimate-late
    scope: lifetime
    when: sum(cost_usd) + estimate.cost_usd > 5
    action: pause_lifetime
  - id: plain-multiline
    scope: lifetime
    when: sum(tokens)
      > 10 and node.id == 3
    action: pause_lifetime
"""


def test_type_errors_carry_document_line_and_column() -> None:
    issues = validate_policy(MULTILINE, name="typed.yaml")
    got = [(i.line, i.column, i.field, i.source) for i in issues]
    assert got == [
        (5, 23, "rules[0].when", "typed.yaml"),  # '>' between number and string
        (9, 38, "rules[1].when", "typed.yaml"),  # tokns, inside double quotes
        (15, 17, "rules[2].when", "typed.yaml"),  # node.id inside avg(), on the folded line
        (21, 7, "rules[3].when", "typed.yaml"),  # 'or' right side is a number
        (25, 27, "rules[4].when", "typed.yaml"),  # estimate.* in post_result
        (30, 24, "rules[5].when", "typed.yaml"),  # '==' string vs number, second plain line
    ], [str(i) for i in issues]
    messages = [i.message for i in issues]
    assert "cannot compare a number with a string using '>'" in messages[0]
    assert "unknown name 'tokns'; did you mean 'tokens'?" in messages[1]
    assert "cannot aggregate 'node.id': it is a string" in messages[2]
    assert "'or' needs booleans on both sides, got a number 'tokens'" in messages[3]
    assert "'estimate.cost_usd' is only known before dispatch" in messages[4]
    assert "cannot compare a string with a number" in messages[5]


def test_non_bool_when_is_an_error_at_the_expression() -> None:
    issue = only(
        "policy: p\nrules:\n  - id: r\n    scope: lifetime\n"
        "    when: sum(tokens) * 2\n    action: abort_lifetime\n"
    )
    assert (issue.line, issue.column, issue.field) == (5, 11, "rules[0].when")
    assert "expected a bool, got a number" in issue.message


def test_syntax_error_position_inside_the_document() -> None:
    issue = only(
        "policy: p\nrules:\n  - id: r\n    scope: lifetime\n"
        "    when: 'tokens >= 5 &&  tokens < 9'\n    action: abort_lifetime\n"
    )
    assert (issue.line, issue.column) == (5, 24)
    assert "use 'and'" in issue.message


# -- the schema


def test_unknown_keys_list_the_allowed_ones() -> None:
    issues = validate_policy(
        "policy: p\nrule: []\nrules:\n  - id: r\n    scope: lifetime\n    windw: 1h\n"
        "    when: count() > 1\n    action: abort_lifetime\n"
    )
    assert where(issues) == [(2, 1, "rule"), (6, 5, "rules[0].windw")]
    assert (
        "unknown key 'rule'; allowed keys: policy, version, description, dry_run, rules"
        in issues[0].message
    )
    assert "allowed keys: id, scope, when, action, phase, window, message" in issues[1].message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "action",
            "abort",
            "unknown value 'abort'; expected one of: reject_execution, pause_lifetime, "
            "abort_lifetime",
        ),
        ("scope", "global", "unknown value 'global'; expected one of: execution, lifetime, tenant"),
        ("phase", "after", "expected one of: pre_dispatch, post_result"),
        ("action", "[a, b]", "expected one of: reject_execution"),
    ],
)
def test_bad_enumerations(field: str, value: str, expected: str) -> None:
    rule = {"id": "r", "scope": "lifetime", "when": "count() > 1", "action": "abort_lifetime"}
    rule[field] = value
    body = "".join(f"    {k}: {v}\n" for k, v in rule.items()).replace("    ", "  - ", 1)
    issue = only(f"policy: p\nrules:\n{body}")
    line = 3 + list(rule).index(field)
    assert (issue.line, issue.field) == (line, f"rules[0].{field}")
    assert issue.column == len(f"    {field}: ") + 1
    assert expected in issue.message


def test_window_only_on_tenant_scope() -> None:
    issue = only(
        "policy: p\nrules:\n  - id: r\n    scope: lifetime\n    window: 24h\n"
        "    when: sum(tokens) > 1\n    action: abort_lifetime\n"
    )
    assert (issue.line, issue.column, issue.field) == (5, 5, "rules[0].window")
    assert (
        "window is only allowed with scope: tenant; this rule's scope is lifetime" in issue.message
    )


@pytest.mark.parametrize("window", ["24", "1w", "0h", "-1h", "1.5h", "24 h", "[]"])
def test_bad_window(window: str) -> None:
    issue = only(
        f"policy: p\nrules:\n  - id: r\n    scope: tenant\n    window: {window}\n"
        "    when: sum(tokens) > 1\n    action: pause_lifetime\n"
    )
    assert (issue.line, issue.column, issue.field) == (5, 13, "rules[0].window")
    assert "90s, 30m, 24h or 7d" in issue.message


def test_missing_required_keys() -> None:
    issues = validate_policy("policy: p\nrules:\n  - id: r\n    when: tokens > 1\n")
    assert where(issues) == [(3, 5, "rules[0].scope"), (3, 5, "rules[0].action")]
    issues = validate_policy("version: 2\n")
    assert [(i.line, i.column, i.message) for i in issues] == [
        (1, 1, "missing required key 'policy'"),
        (1, 1, "missing required key 'rules'"),
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("policy: Default", "'Default' is not a valid policy id"),
        ("policy: ''", "is not a valid policy id; expected [a-z0-9][a-z0-9_.-]{0,63}"),
        ("policy: ~", "expected policy id"),
        ("policy: " + "a" * 65, "is not a valid policy id"),
        ("version: 0", "expected a whole number from 1 to 4294967295"),
        ("version: two", "expected a whole number"),
        ("version: 4294967296", "expected a whole number"),
        ("dry_run: maybe", "expected true or false"),
        ("description: [a]", "expected a string"),
        ("rules: {}", "expected a list of rules"),
    ],
)
def test_bad_top_level_values(line: str, expected: str) -> None:
    key = line.split(":", 1)[0]
    lines = {"policy": "policy: p", "rules": "rules: []", key: line}
    issue = only("\n".join(lines.values()) + "\n")
    assert issue.field == key
    assert issue.column == len(key) + 3
    assert expected in issue.message


def test_duplicate_rule_id() -> None:
    rule = "  - id: same\n    scope: lifetime\n    when: count() > 1\n    action: abort_lifetime\n"
    issue = only(f"policy: p\nrules:\n{rule}{rule}")
    assert (issue.line, issue.column, issue.field) == (7, 9, "rules[1].id")
    assert issue.message == "duplicate rule id 'same' (first at line 3)"


def test_duplicate_keys() -> None:
    issues = validate_policy(
        "policy: p\npolicy: q\nrules:\n  - id: r\n    scope: lifetime\n    when: count() > 1\n"
        "    when: count() > 2\n    action: abort_lifetime\n"
    )
    assert where(issues) == [(2, 1, "policy"), (7, 5, "rules[0].when")]
    assert issues[0].message == "duplicate key 'policy' (first at line 1)"
    assert issues[1].message == "duplicate key 'when' (first at line 6)"


def test_too_many_rules() -> None:
    rules = "".join(
        f"  - {{id: r{i}, scope: lifetime, when: count() > {i}, action: abort_lifetime}}\n"
        for i in range(MAX_RULES + 1)
    )
    issue = only(f"policy: p\nrules:\n{rules}")
    assert (issue.line, issue.column, issue.field) == (3, 3, "rules")
    assert f"201 rules; a policy holds at most {MAX_RULES}" in issue.message
    load_policy(f"policy: p\nrules:\n{rules.rsplit(chr(10), 2)[0]}\n")


# -- hostile YAML


def test_alias_bomb_is_refused() -> None:
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        bomb += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    issue = only(bomb + "policy: p\nrules: []\n")
    assert (issue.line, issue.column) == (1, 4)
    assert "anchors are not allowed (&a)" in issue.message


def test_alias_is_refused() -> None:
    issue = only("policy: p\nrules: []\ndescription: *x\n")
    assert (issue.line, issue.column) == (3, 14)
    assert "aliases are not allowed (*x)" in issue.message


@pytest.mark.parametrize(
    ("document", "shown", "column"),
    [
        (
            'policy: !!python/object/apply:os.system ["echo pwned"]\nrules: []\n',
            "!!python/object/apply:os.system",
            9,
        ),
        ("policy: p\nrules: !!python/name:os.system []\n", "!!python/name:os.system", 8),
        ("policy: !custom p\nrules: []\n", "!custom", 9),
        ("policy: p\nrules: !!set {a: null}\n", "!!set", 8),
        ("policy: !!binary cGF5bG9hZA==\nrules: []\n", "!!binary", 9),
    ],
)
def test_foreign_tags_are_refused(document: str, shown: str, column: int) -> None:
    issue = only(document)
    assert issue.column == column
    assert f"tag {shown} is not allowed" in issue.message


def test_standard_tags_are_allowed() -> None:
    policy = load_policy("policy: !!str p\nversion: !!int 2\nrules: !!seq []\n")
    assert (policy.id, policy.version) == ("p", 2)


def test_oversized_document_is_refused_before_parsing() -> None:
    padding = "# " + "x" * 1000 + "\n"
    document = "policy: p\nrules: []\n" + padding * 300
    assert len(document.encode()) > MAX_POLICY_BYTES
    issue = only(document)
    assert f"a policy may be at most {MAX_POLICY_BYTES}" in issue.message
    assert issue.line > 1
    assert issue.column >= 1


def test_deep_nesting_is_refused() -> None:
    deep = "[" * (MAX_NESTING + 5) + "]" * (MAX_NESTING + 5)
    issue = only(f"policy: p\nrules: []\ndescription: {deep}\n")
    assert f"nesting deeper than {MAX_NESTING} levels" in issue.message
    assert (issue.line, issue.column) == (3, 14 + MAX_NESTING - 1)


def test_very_deep_nesting_does_not_overflow_the_stack() -> None:
    deep = "[" * 50_000 + "]" * 50_000
    issue = only(f"policy: p\nrules: []\ndescription: {deep}\n")
    assert "nesting deeper" in issue.message


@pytest.mark.parametrize(
    ("document", "position", "fragment"),
    [
        ("policy: p\nrules: [\n", (3, 1), "invalid YAML"),
        ("policy: p\n  rules: []\n", (2, 8), "mapping values are not allowed here"),
        ("policy: p\nrules: []\n---\npolicy: q\n", (3, 1), "expected a single document"),
        ("", (1, 1), "the document is empty"),
        ("- policy: p\n", (1, 1), "expected a policy (a mapping with keys policy, version"),
        ("policy: p\nrules: [a]\n", (2, 9), "expected a rule (a mapping with keys id, scope"),
        ("policy: p\nrules: []\n? [a]\n: b\n", (3, 3), "expected a plain string key"),
        ("policy: p\x00\nrules: []\n", (1, 10), "invalid YAML"),
    ],
)
def test_malformed_yaml(document: str, position: tuple[int, int], fragment: str) -> None:
    issue = only(document)
    assert (issue.line, issue.column) == position, str(issue)
    assert fragment in issue.message


def test_load_policy_raises_with_every_issue_and_each_has_line_and_column() -> None:
    source = (
        "policy: Bad\n"
        "extra: 1\n"
        "rules:\n"
        "  - id: a\n"
        "    scope: lifetime\n"
        "    window: 1h\n"
        "    when: tokns > 1\n"
        "    action: stop\n"
        "  - id: a\n"
        "    scope: galaxy\n"
        "    when: estimate.tokens > 1 / 0\n"
        "    action: abort_lifetime\n"
    )
    with pytest.raises(ValidationError) as info:
        load_policy(source, name="tenants/acme/bad.yaml")
    issues = info.value.issues
    assert len(issues) == 9, [str(i) for i in issues]
    assert all(i.line >= 1 and i.column >= 1 for i in issues)
    assert all(i.source == "tenants/acme/bad.yaml" for i in issues)
    assert [i.line for i in issues] == sorted(i.line for i in issues)
    assert "tenants/acme/bad.yaml:1:9 policy:" in str(info.value)
    assert validate_policy(source, name="tenants/acme/bad.yaml") == list(issues)
