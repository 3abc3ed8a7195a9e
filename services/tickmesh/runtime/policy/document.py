"""Policy documents: load guardrail policy YAML safely, compile every rule, or say why not.

A document looks like::

    policy: default
    version: 3
    dry_run: false
    rules:
      - id: lifetime-token-cap
        scope: lifetime            # execution | lifetime | tenant
        when: sum(tokens) > 10000
        action: abort_lifetime     # reject_execution | pause_lifetime | abort_lifetime
        phase: post_result         # pre_dispatch | post_result (the default)
      - id: daily-tenant-spend
        scope: tenant
        window: 24h                # tenant scope only: 90s, 30m, 24h, 7d
        when: sum(cost_usd) > 50
        action: pause_lifetime

The YAML is composed into a node tree (never constructed into Python objects), so every problem
is reported with its line, column and field path. Anchors, aliases, non-standard tags,
duplicate keys, oversized and over-nested documents are refused before any rule is read.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import yaml
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tickmesh.sdk.errors import Issue, ValidationError
from tickmesh.v1 import guardrail_pb2

from .language import Expression, ExpressionError, compile_expression

MAX_POLICY_BYTES: Final = 256 * 1024
"""Largest policy document accepted, in UTF-8 bytes."""
MAX_NESTING: Final = 20
"""Deepest YAML nesting accepted."""
MAX_RULES: Final = 200
"""Most rules one policy may hold."""

SCOPES: Final[Mapping[str, int]] = {
    "execution": guardrail_pb2.GUARDRAIL_SCOPE_EXECUTION,
    "lifetime": guardrail_pb2.GUARDRAIL_SCOPE_LIFETIME,
    "tenant": guardrail_pb2.GUARDRAIL_SCOPE_TENANT,
}
ACTIONS: Final[Mapping[str, int]] = {
    "reject_execution": guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION,
    "pause_lifetime": guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME,
    "abort_lifetime": guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME,
}
PHASES: Final[Mapping[str, int]] = {
    "pre_dispatch": guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH,
    "post_result": guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
}

_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
_WINDOW_RE: Final = re.compile(r"([1-9][0-9]{0,8})([smhd])\Z")
_WINDOW_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TOP_KEYS: Final = ("policy", "version", "description", "dry_run", "rules")
_RULE_KEYS: Final = ("id", "scope", "when", "action", "phase", "window", "message")

_YAML_TAG: Final = "tag:yaml.org,2002:"
_STR, _INT, _BOOL, _NULL = (_YAML_TAG + t for t in ("str", "int", "bool", "null"))
_ALLOWED_TAGS: Final = frozenset(
    _YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map")
)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule, ready to evaluate."""

    id: str
    """The rule's id, unique within its policy."""
    scope: int
    """``guardrail_pb2.GuardrailScope``."""
    action: int
    """``guardrail_pb2.GuardrailAction`` taken when ``when`` holds."""
    phase: int
    """``guardrail_pb2.GuardrailPhase`` in which the rule is evaluated."""
    when: Expression
    """The compiled condition; the rule is violated when it is true."""
    window_s: float | None = None
    """Tenant scope: the window in seconds; ``None`` means all time."""
    message: str = ""
    """The author's explanation, reported with violations."""
    line: int = 0
    """Line of the rule in its document."""


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A loaded, fully checked policy document."""

    id: str
    """The ``policy`` id."""
    version: int
    """The document's informational ``version``."""
    rules: tuple[CompiledRule, ...]
    """Every rule, in document order."""
    description: str = ""
    """Free text."""
    dry_run: bool = False
    """Report violations without enforcing them."""
    _by_phase: Mapping[int, tuple[CompiledRule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_phase = {
            phase: tuple(r for r in self.rules if r.phase == phase) for phase in PHASES.values()
        }
        object.__setattr__(self, "_by_phase", by_phase)

    def rules_for(self, phase: int) -> tuple[CompiledRule, ...]:
        """The rules evaluated in ``phase`` (a ``GuardrailPhase``), in document order."""
        return self._by_phase.get(phase, ())


class _LineTable:
    """Character offset -> 1-based (line, column), counting line breaks as PyYAML does."""

    def __init__(self, source: str) -> None:
        starts = [0]
        n = len(source)
        for i, ch in enumerate(source):
            if ch in "\n\x85\u2028\u2029" or (ch == "\r" and (i + 1 >= n or source[i + 1] != "\n")):
                starts.append(i + 1)
        self.starts = starts

    def locate(self, index: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, index) - 1
        return line + 1, index - self.starts[line] + 1


class _RefusedError(Exception):
    def __init__(self, message: str, node_event: NodeEvent) -> None:
        super().__init__(message)
        self.message = message
        self.mark = node_event.start_mark


def _show_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML_TAG) :] if tag.startswith(_YAML_TAG) else tag


class _PolicyLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses anchors, aliases, foreign tags and deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            raise _RefusedError(
                f"YAML aliases are not allowed (*{event.anchor}); write the value out", event
            )
        if isinstance(event, NodeEvent):
            if event.anchor is not None:
                raise _RefusedError(
                    f"YAML anchors are not allowed (&{event.anchor}); write the value out", event
                )
            tag: str | None = getattr(event, "tag", None)
            if tag not in (None, "!") and tag not in _ALLOWED_TAGS:
                raise _RefusedError(
                    f"tag {_show_tag(str(tag))} is not allowed; only the standard tags "
                    "!!str !!int !!float !!bool !!null !!seq !!map",
                    event,
                )
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                assert isinstance(event, NodeEvent)
                raise _RefusedError(f"nesting deeper than {MAX_NESTING} levels", event)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(source: str, table: _LineTable) -> tuple[Node | None, list[Issue]]:
    loader: _PolicyLoader | None = None
    try:
        # The reader checks for unprintable characters as soon as the loader is built.
        loader = _PolicyLoader(source)
        return loader.get_single_node(), []
    except _RefusedError as exc:
        mark = exc.mark
        assert mark is not None
        return None, [Issue(exc.message, line=mark.line + 1, column=mark.column + 1)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        text = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            text = f"{exc.problem} ({exc.context})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Issue(f"invalid YAML: {text}", line=line, column=column)]
    except yaml.reader.ReaderError as exc:
        line, column = table.locate(int(exc.position))
        return None, [
            # The reader reports the offending code point as an int.
            Issue(f"invalid YAML: {exc.reason} #x{exc.character:04x}", line=line, column=column)
        ]
    finally:
        if loader is not None:
            loader.dispose()


_HEX_ESCAPES: Final = {"x": 4, "u": 6, "U": 10}


def _escape_length(raw: str, pos: int) -> int:
    """Source characters of the double-quoted escape at ``raw[pos]`` (a backslash)."""
    return _HEX_ESCAPES.get(raw[pos + 1 : pos + 2], 2)


def _scalar_locator(
    source: str, table: _LineTable, node: ScalarNode
) -> Callable[[int], tuple[int, int]]:
    """Map offsets into a scalar's value back to the document, through quotes and folding."""
    start = node.start_mark.index
    raw = source[start : node.end_mark.index]
    value: str = node.value
    pos = 0
    if node.style in ("'", '"'):
        pos = 1
    elif node.style in ("|", ">"):
        pos = raw.find("\n") + 1 if "\n" in raw else len(raw)
    last = max(len(raw) - 1, 0)
    escapes = node.style == '"'
    positions: list[int] = []
    for ch in value:
        while pos < len(raw) and raw[pos] != ch and not (ch == " " and raw[pos] in "\r\n"):
            if escapes and raw[pos] == "\\" and raw[pos + 1 : pos + 2] not in ("\r", "\n"):
                break  # an escape sequence: it stands for this character
            pos += 1
        positions.append(start + min(pos, last))
        # A double-quoted escape is several source characters for one value character;
        # past it, the search would find a later occurrence of the next character.
        pos += _escape_length(raw, pos) if escapes and raw[pos : pos + 1] == "\\" else 1

    def locate(offset: int) -> tuple[int, int]:
        if not positions:
            return table.locate(start)
        if offset < len(positions):
            return table.locate(positions[offset])
        return table.locate(positions[-1] + 1 + offset - len(positions))

    return locate


class _Checker:
    """Walks the composed document, collecting every issue and building the policy."""

    def __init__(self, source: str, name: str, table: _LineTable) -> None:
        self.source = source
        self.name = name
        self.table = table
        self.issues: list[Issue] = []

    def at(self, node: Node, field: str, message: str) -> None:
        mark = node.start_mark
        self.issues.append(
            Issue(
                message, field=field, line=mark.line + 1, column=mark.column + 1, source=self.name
            )
        )

    def mapping(
        self, node: Node, path: str, allowed: tuple[str, ...], what: str
    ) -> dict[str, tuple[Node, Node]] | None:
        if not isinstance(node, MappingNode):
            self.at(node, path, f"expected {what} (a mapping with keys {', '.join(allowed)})")
            return None
        found: dict[str, tuple[Node, Node]] = {}
        first_seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.at(key_node, path, "expected a plain string key")
                continue
            key = str(key_node.value)
            key_path = f"{path}.{key}" if path else key
            if key in first_seen:
                first = first_seen[key].start_mark.line + 1
                self.at(key_node, key_path, f"duplicate key '{key}' (first at line {first})")
                continue
            first_seen[key] = key_node
            if key not in allowed:
                self.at(
                    key_node, key_path, f"unknown key '{key}'; allowed keys: {', '.join(allowed)}"
                )
                continue
            found[key] = (key_node, value_node)
        return found

    def text(self, node: Node, path: str, what: str) -> str | None:
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            self.at(node, path, f"expected {what}")
            return None
        return str(node.value)

    def ident(self, node: Node, path: str, what: str) -> str | None:
        value = self.text(node, path, what)
        if value is not None and not _ID_RE.match(value):
            pattern = "[a-z0-9][a-z0-9_.-]{0,63}"
            self.at(node, path, f"{value!r} is not a valid {what}; expected {pattern}")
            return None
        return value

    def choice(self, node: Node, path: str, choices: Mapping[str, int]) -> int | None:
        expected = "one of: " + ", ".join(choices)
        value = self.text(node, path, expected)
        if value is None:
            return None
        if value not in choices:
            self.at(node, path, f"unknown value {value!r}; expected {expected}")
            return None
        return choices[value]

    # -- the document
    def policy(self, root: Node | None) -> CompiledPolicy | None:
        if root is None:
            self.issues.append(
                Issue(
                    "the document is empty; expected a mapping with keys policy and rules",
                    line=1,
                    column=1,
                    source=self.name,
                )
            )
            return None
        keys = self.mapping(root, "", _TOP_KEYS, "a policy")
        if keys is None:
            return None
        for required in ("policy", "rules"):
            if required not in keys:
                self.at(root, required, f"missing required key '{required}'")
        policy_id = (
            self.ident(keys["policy"][1], "policy", "policy id") if "policy" in keys else None
        )
        version = self.version(keys["version"][1]) if "version" in keys else 1
        description = ""
        if "description" in keys:
            description = self.text(keys["description"][1], "description", "a string") or ""
        dry_run = self.flag(keys["dry_run"][1], "dry_run") if "dry_run" in keys else False
        rules = self.rules(keys["rules"][1]) if "rules" in keys else None
        if self.issues or policy_id is None or version is None or rules is None:
            return None
        return CompiledPolicy(
            id=policy_id,
            version=version,
            rules=rules,
            description=description,
            dry_run=bool(dry_run),
        )

    def version(self, node: Node) -> int | None:
        if (
            not isinstance(node, ScalarNode)
            or node.tag != _INT
            or not re.fullmatch(r"[0-9]+", node.value)
            or not 1 <= int(node.value) <= 0xFFFFFFFF
        ):
            self.at(node, "version", "expected a whole number from 1 to 4294967295")
            return None
        return int(node.value)

    def flag(self, node: Node, path: str) -> bool | None:
        if not isinstance(node, ScalarNode) or node.tag != _BOOL:
            self.at(node, path, "expected true or false")
            return None
        return str(node.value).lower() in ("true", "yes", "on")

    def rules(self, node: Node) -> tuple[CompiledRule, ...] | None:
        if not isinstance(node, SequenceNode):
            self.at(node, "rules", "expected a list of rules")
            return None
        if len(node.value) > MAX_RULES:
            self.at(node, "rules", f"{len(node.value)} rules; a policy holds at most {MAX_RULES}")
        compiled: list[CompiledRule] = []
        seen: dict[str, int] = {}
        for index, rule_node in enumerate(node.value):
            rule = self.rule(rule_node, f"rules[{index}]", seen)
            if rule is not None:
                compiled.append(rule)
        return tuple(compiled)

    def rule(self, node: Node, path: str, seen: dict[str, int]) -> CompiledRule | None:
        keys = self.mapping(node, path, _RULE_KEYS, "a rule")
        if keys is None:
            return None
        ok = True
        for required in ("id", "scope", "when", "action"):
            if required not in keys:
                self.at(node, f"{path}.{required}", f"missing required key '{required}'")
                ok = False
        rule_id = None
        if "id" in keys:
            id_node = keys["id"][1]
            rule_id = self.ident(id_node, f"{path}.id", "rule id")
            if rule_id is not None:
                line = id_node.start_mark.line + 1
                if rule_id in seen:
                    self.at(
                        id_node,
                        f"{path}.id",
                        f"duplicate rule id '{rule_id}' (first at line {seen[rule_id]})",
                    )
                    ok = False
                else:
                    seen[rule_id] = line
        scope = self.choice(keys["scope"][1], f"{path}.scope", SCOPES) if "scope" in keys else None
        action = (
            self.choice(keys["action"][1], f"{path}.action", ACTIONS) if "action" in keys else None
        )
        phase: int | None = guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT
        if "phase" in keys:
            phase = self.choice(keys["phase"][1], f"{path}.phase", PHASES)
        window = self.window(keys, path, scope)
        message = ""
        if "message" in keys:
            message = self.text(keys["message"][1], f"{path}.message", "a string") or ""
        when = self.when(keys["when"][1], f"{path}.when", scope, phase) if "when" in keys else None
        if (
            not ok
            or rule_id is None
            or scope is None
            or action is None
            or phase is None
            or when is None
            or window is False
        ):
            return None
        return CompiledRule(
            id=rule_id,
            scope=scope,
            action=action,
            phase=phase,
            when=when,
            window_s=window,
            message=message,
            line=node.start_mark.line + 1,
        )

    def window(
        self, keys: dict[str, tuple[Node, Node]], path: str, scope: int | None
    ) -> float | bool | None:
        """The window in seconds; None when absent; False when wrong (already reported)."""
        if "window" not in keys:
            return None
        key_node, node = keys["window"]
        if scope is not None and scope != guardrail_pb2.GUARDRAIL_SCOPE_TENANT:
            name = next(k for k, v in SCOPES.items() if v == scope)
            self.at(
                key_node,
                f"{path}.window",
                f"window is only allowed with scope: tenant; this rule's scope is {name}",
            )
            return False
        expected = "a window such as 90s, 30m, 24h or 7d"
        value = self.text(node, f"{path}.window", expected)
        if value is None:
            return False
        match = _WINDOW_RE.match(value)
        if match is None:
            self.at(node, f"{path}.window", f"invalid window {value!r}; expected {expected}")
            return False
        return float(int(match.group(1)) * _WINDOW_UNITS[match.group(2)])

    def when(
        self, node: Node, path: str, scope: int | None, phase: int | None
    ) -> Expression | None:
        text = self.text(node, path, "an expression, e.g. sum(tokens) > 10000")
        if text is None:
            return None
        assert isinstance(node, ScalarNode)
        try:
            return compile_expression(
                text,
                # An invalid scope or phase is reported on its own; check the rest regardless.
                scope=scope if scope is not None else guardrail_pb2.GUARDRAIL_SCOPE_UNSPECIFIED,
                phase=phase if phase is not None else guardrail_pb2.GUARDRAIL_PHASE_UNSPECIFIED,
            )
        except ExpressionError as exc:
            locate = _scalar_locator(self.source, self.table, node)
            for diag in exc.diagnostics:
                line, column = locate(diag.offset)
                self.issues.append(
                    Issue(diag.message, field=path, line=line, column=column, source=self.name)
                )
            return None


def _check(source: str, name: str) -> tuple[CompiledPolicy | None, list[Issue]]:
    encoded = source.encode("utf-8", errors="surrogatepass")
    size = len(encoded)
    if size > MAX_POLICY_BYTES:
        # Only the allowed prefix is scanned for line breaks: a 10 MB document is refused
        # in the time a 256 KiB one takes, and the position reported is where it overflowed.
        cut = len(encoded[:MAX_POLICY_BYTES].decode("utf-8", errors="ignore"))
        line, column = _LineTable(source[: cut + 1]).locate(cut)
        message = f"the document is {size} bytes; a policy may be at most {MAX_POLICY_BYTES}"
        return None, [Issue(message, line=line, column=column, source=name)]
    table = _LineTable(source)
    root, issues = _compose(source, table)
    if issues:
        return None, [
            Issue(i.message, field=i.field, line=i.line, column=i.column, source=name)
            for i in issues
        ]
    checker = _Checker(source, name, table)
    policy = checker.policy(root)
    return policy, sorted(checker.issues, key=lambda issue: (issue.line, issue.column))


def load_policy(source: str, *, name: str = "<policy>") -> CompiledPolicy:
    """Load and compile a policy document.

    Args:
        source: The policy YAML.
        name: What to call the document in issues (a file name, or ``tenant/policy``).

    Returns:
        The compiled policy.

    Raises:
        ValidationError: with every issue found, each with its line, column and field path.
    """
    policy, issues = _check(source, name)
    if issues or policy is None:
        raise ValidationError(f"invalid policy {name}", issues)
    return policy


def validate_policy(source: str, *, name: str = "<policy>") -> list[Issue]:
    """Every issue in a policy document; an empty list means it loads."""
    return _check(source, name)[1]


__all__ = [
    "ACTIONS",
    "MAX_NESTING",
    "MAX_POLICY_BYTES",
    "MAX_RULES",
    "PHASES",
    "SCOPES",
    "CompiledPolicy",
    "CompiledRule",
    "load_policy",
    "validate_policy",
]
