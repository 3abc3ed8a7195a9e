"""Policy documents at the edges of YAML: where an issue points when the expression is a
double-quoted scalar with escapes, and how an unprintable character is named."""

from __future__ import annotations

import pytest

from tickmesh.runtime.policy import validate_policy

RULE = """\
policy: p
rules:
  - id: r
    scope: lifetime
    action: abort_lifetime
    when: {when}
"""


@pytest.mark.parametrize(
    "when",
    [
        r'"node.handler == \"caf\u00e9\" and tokenz > 1"',
        r'"node.handler == \"caf\xe9\" and tokenz > 1"',
        r'"node.handler == \"a\tb\" and tokenz > 1"',
        r'"node.handler == \"x\"\n and tokenz > 1"',
        r'"node.handler == \"\U0001F600\" and tokenz > 1"',
        '"node.handler == \\"x\\" \\\n      and tokenz > 1"',
    ],
)
def test_an_issue_after_an_escape_points_at_the_name(when: str) -> None:
    source = RULE.format(when=when)
    [issue] = validate_policy(source)
    assert "unknown name 'tokenz'" in issue.message
    assert issue.field == "rules[0].when"
    line = source.splitlines()[issue.line - 1]
    assert line[issue.column - 1 :].startswith("tokenz"), (issue.line, issue.column, line)


def test_an_unprintable_character_is_named() -> None:
    [issue] = validate_policy("policy: p\x07\nrules: []\n")
    assert (issue.line, issue.column) == (1, 10)
    assert "#x0007" in issue.message, issue.message
