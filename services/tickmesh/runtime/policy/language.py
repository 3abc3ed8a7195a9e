"""The guardrail expression language: parsed and type-checked at load, compiled to closures.

A rule's ``when`` is a small expression over the usage of the rule's scope, the step's header
and (before dispatch) the step's estimate::

    sum(tokens) > 10_000
    node.handler == "llm_call" and estimate.cost_usd > 2
    labels.tier in ["free", "trial"] and avg(cost_usd) * count() >= 0.5

Grammar (lowest precedence first)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | cmp
    cmp     := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum
                   | "not"? "in" "[" literal ("," literal)* ","? "]")?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | primary
    primary := NUMBER | STRING | "true" | "false" | "(" expr ")"
             | NAME ("." NAME)* | ("sum" | "max" | "avg") "(" METRIC ")" | "count" "(" ")"

Expressions are never handed to ``eval``, ``exec`` or ``compile``: the parser builds a tree, the
checker types it (number, string, bool), and the compiler turns it into nested Python closures
once, so evaluating a rule costs a handful of function calls and no parsing.
"""

from __future__ import annotations

import difflib
import enum
import math
import operator
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from operator import attrgetter
from typing import Any, Final, NamedTuple, NoReturn

from tickmesh.sdk.errors import Issue, TickmeshError, ValidationError
from tickmesh.v1 import graph_pb2, guardrail_pb2, header_pb2

from .usage import EMPTY_USAGE, Usage

MAX_EXPRESSION_CHARS: Final = 4096
"""Longest ``when`` expression accepted."""
MAX_EXPRESSION_DEPTH: Final = 64
"""Deepest expression tree accepted (keeps parsing, checking and evaluation off the C stack)."""

METRICS: Final = (
    "executions",
    "tokens",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "cost_micros",
    "model_calls",
    "tool_calls",
    "iterations",
    "wall_time_s",
    "fanout",
    "depth",
)
"""Numeric usage metrics, readable bare, as ``estimate.<metric>`` and inside aggregates."""

AGGREGATES: Final = ("avg", "count", "max", "sum")
"""Aggregate functions over the rule's scope."""

KNOWN_NAMES: Final = tuple(
    sorted(
        (
            *METRICS,
            "attempt",
            "custom.<name>",
            "estimate.<metric>",
            "estimate.custom.<name>",
            "graph.id",
            "graph.version",
            "labels.<key>",
            "node.handler",
            "node.id",
            "node.kind",
        )
    )
)
"""Every name an expression may use, as listed in error messages."""

_CONCRETE_NAMES: Final = (
    *METRICS,
    "attempt",
    "graph.id",
    "graph.version",
    "node.handler",
    "node.id",
    "node.kind",
    *(f"estimate.{m}" for m in METRICS),
)

_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "true", "false"})
_NODE_KINDS: Final[Mapping[int, str]] = {
    graph_pb2.NODE_KIND_TASK: "task",
    graph_pb2.NODE_KIND_PLAN: "plan",
}

Fn = Callable[["Env"], Any]
"""A compiled (sub)expression: bindings in, value out."""


class Type(enum.Enum):
    """The type of an expression."""

    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"


class Env:
    """What a compiled expression reads: the scope's usage, the estimate, the step's header.

    One instance is reused for every rule of an evaluation; the engine swaps ``usage`` per
    rule scope.
    """

    __slots__ = ("estimate", "header", "usage")

    def __init__(
        self,
        usage: Usage = EMPTY_USAGE,
        estimate: Usage = EMPTY_USAGE,
        header: header_pb2.EnvelopeHeader | None = None,
    ) -> None:
        self.usage = usage
        self.estimate = estimate
        self.header = header if header is not None else header_pb2.EnvelopeHeader()


class EvaluationError(TickmeshError):
    """An expression could not be evaluated on these inputs (e.g. a NaN metric)."""


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in an expression, at a character offset into the expression text."""

    offset: int
    """0-based offset into the expression."""
    message: str
    """What is wrong and what was expected."""


class ExpressionError(ValidationError):
    """An expression does not parse or does not type-check.

    ``diagnostics`` locate each problem by offset into the expression; ``issues`` place them
    on line 1 at column offset + 1, for expressions that stand alone.
    """

    def __init__(self, text: str, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        issues = [Issue(d.message, line=1, column=d.offset + 1) for d in diagnostics]
        super().__init__(f"invalid expression {text!r}", issues)


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled, type-checked expression."""

    text: str
    """The source text."""
    summary: str
    """The source text on one line (whitespace runs collapsed), for messages."""
    type: Type
    """Its type (a rule's ``when`` is always BOOL)."""
    test: Fn = field(repr=False)
    """Evaluate: ``test(env)`` returns the expression's value."""
    metric: str
    """Source text of the measured side of the principal comparison, e.g. ``sum(tokens)``;
    the whole expression when there is no numeric comparison to report."""
    observed: Fn | None = field(repr=False)
    """Evaluates the measured side of the principal comparison, if there is one."""
    limit: Fn | None = field(repr=False)
    """Evaluates the threshold side of the principal comparison, if there is one."""
    reads_scope: bool = False
    """Whether it reads the scope's usage (bare metrics or aggregates)."""
    reads_estimate: bool = False
    """Whether it reads ``estimate.*``."""

    def measure(self, env: Env) -> tuple[float, float]:
        """``(observed, limit)`` of the principal comparison, ``(0, 0)`` without one."""
        if self.observed is None or self.limit is None:
            return 0.0, 0.0
        return _to_float(self.observed(env)), _to_float(self.limit(env))


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _is_finite(value: Any) -> bool:
    """Whether a number converts to a finite float (an int past the float range does not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


_NOT_FINITE: Final = f"is not a finite number; numbers lie within ±{sys.float_info.max!r}"


# ---------------------------------------------------------------------------------------------
# Lexer


class _Tok(NamedTuple):
    kind: str  # "num" | "str" | "name" | "op" | "eof"
    value: Any
    start: int
    end: int


_TOKEN_RE: Final = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>[0-9][0-9_]*(?:\.[0-9][0-9_]*)?(?:[eE][+-]?[0-9][0-9_]*)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<op>==|!=|<=|>=|[<>+\-*/()\[\],.])
    """,
    re.VERBOSE,
)
_ESCAPES: Final = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_HINTS: Final = {
    "=": "'=' is not an operator; compare with '=='",
    "&": "use 'and' instead of '&&'",
    "|": "use 'or' instead of '||'",
    "!": "use 'not' (or '!=' for inequality)",
    "%": "'%' is not supported; use + - * /",
}


class _ParseError(Exception):
    """A syntax error: parsing stops at the first one."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


def _unescape(raw: str, start: int) -> str:
    out: list[str] = []
    i = 1
    while i < len(raw) - 1:
        ch = raw[i]
        if ch == "\\":
            nxt = raw[i + 1]
            if nxt not in _ESCAPES:
                raise _ParseError(
                    start + i, f"unknown escape '\\{nxt}'; expected \\\\ \\\" \\' \\n or \\t"
                )
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                raise _ParseError(
                    pos, f"unterminated string; expected a closing {ch} on the same line"
                )
            hint = _HINTS.get(ch, "expected a number, string, name, operator or parenthesis")
            raise _ParseError(pos, f"unexpected character {ch!r}: {hint}")
        kind = m.lastgroup
        lexeme = m.group()
        end = m.end()
        if kind == "num":
            if end < n and (text[end].isalnum() or text[end] in "_."):
                raise _ParseError(
                    pos, f"malformed number {text[pos : end + 1]!r}...: expected digits"
                )
            try:
                value: Any = float(lexeme) if any(c in lexeme for c in ".eE") else int(lexeme)
            except ValueError:
                raise _ParseError(
                    pos, f"malformed number {lexeme!r}: underscores go between digits"
                ) from None
            toks.append(_Tok("num", value, pos, end))
        elif kind == "str":
            toks.append(_Tok("str", _unescape(lexeme, pos), pos, end))
        elif kind == "name":
            toks.append(_Tok("name", lexeme, pos, end))
        elif kind == "op":
            toks.append(_Tok("op", lexeme, pos, end))
        pos = end
    toks.append(_Tok("eof", None, n, n))
    return toks


# ---------------------------------------------------------------------------------------------
# Syntax tree


@dataclass(slots=True)
class _Node:
    start: int
    end: int
    height: int


@dataclass(slots=True)
class _Lit(_Node):
    value: Any  # int | float | str | bool


@dataclass(slots=True)
class _Name(_Node):
    path: tuple[str, ...]


@dataclass(slots=True)
class _Call(_Node):
    name: str
    args: list[_Node]


@dataclass(slots=True)
class _Unary(_Node):
    op: str  # "-" | "not"
    operand: _Node


@dataclass(slots=True)
class _Binary(_Node):
    op: str  # arithmetic, comparison, "and", "or"
    op_pos: int
    left: _Node
    right: _Node


@dataclass(slots=True)
class _In(_Node):
    negated: bool
    op_pos: int
    left: _Node
    items: list[_Lit]


_COMPARISONS: Final = frozenset({"==", "!=", "<", "<=", ">", ">="})


class _Parser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0
        self.nesting = 0

    # -- helpers
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def advance(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def is_word(self, tok: _Tok, word: str) -> bool:
        return tok.kind == "name" and tok.value == word

    def is_op(self, tok: _Tok, op: str) -> bool:
        return tok.kind == "op" and tok.value == op

    def unexpected(self, tok: _Tok, expected: str) -> _ParseError:
        if tok.kind == "eof":
            return _ParseError(tok.start, f"expected {expected}, but the expression ended")
        shown = tok.value if tok.kind != "str" else "a string"
        return _ParseError(tok.start, f"expected {expected}, got {shown!r}")

    def enter(self, tok: _Tok) -> None:
        self.nesting += 1
        if self.nesting > MAX_EXPRESSION_DEPTH:
            raise _ParseError(
                tok.start, f"expression nested deeper than {MAX_EXPRESSION_DEPTH} levels"
            )

    def node_height(self, start: int, *children: _Node) -> int:
        height = 1 + max((c.height for c in children), default=0)
        if height > MAX_EXPRESSION_DEPTH:
            raise _ParseError(start, f"expression nested deeper than {MAX_EXPRESSION_DEPTH} levels")
        return height

    def binary(self, op_tok: _Tok, left: _Node, right: _Node) -> _Binary:
        height = self.node_height(left.start, left, right)
        return _Binary(left.start, right.end, height, op_tok.value, op_tok.start, left, right)

    # -- grammar
    def parse(self) -> _Node:
        node = self.expr()
        tok = self.peek()
        if tok.kind != "eof":
            if self.is_op(tok, ")"):
                raise _ParseError(tok.start, "unmatched ')'")
            raise self.unexpected(tok, "an operator (and, or, ==, <, +, ...) or the end")
        return node

    def expr(self) -> _Node:
        left = self.and_()
        while self.is_word(self.peek(), "or"):
            op = self.advance()
            left = self.binary(op, left, self.and_())
        return left

    def and_(self) -> _Node:
        left = self.not_()
        while self.is_word(self.peek(), "and"):
            op = self.advance()
            left = self.binary(op, left, self.not_())
        return left

    def not_(self) -> _Node:
        tok = self.peek()
        if self.is_word(tok, "not"):
            self.advance()
            self.enter(tok)
            operand = self.not_()
            self.nesting -= 1
            height = self.node_height(tok.start, operand)
            return _Unary(tok.start, operand.end, height, "not", operand)
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.additive()
        tok = self.peek()
        if tok.kind == "op" and tok.value in _COMPARISONS:
            self.advance()
            node: _Node = self.binary(tok, left, self.additive())
        elif self.is_word(tok, "in") or (
            self.is_word(tok, "not") and self.is_word(self.peek(1), "in")
        ):
            negated = tok.value == "not"
            self.advance()
            if negated:
                self.advance()
            items, end = self.list_literal()
            height = self.node_height(left.start, left)
            node = _In(left.start, end, height, negated, tok.start, left, items)
        else:
            return left
        nxt = self.peek()
        if nxt.kind == "op" and nxt.value in _COMPARISONS:
            raise _ParseError(nxt.start, "comparisons do not chain; join them with 'and'")
        return node

    def list_literal(self) -> tuple[list[_Lit], int]:
        open_tok = self.peek()
        if not self.is_op(open_tok, "["):
            raise self.unexpected(open_tok, 'a list after \'in\', e.g. ["a", "b"]')
        self.advance()
        items: list[_Lit] = []
        while True:
            tok = self.peek()
            if self.is_op(tok, "]"):
                self.advance()
                return items, tok.end
            items.append(self.list_item())
            tok = self.peek()
            if self.is_op(tok, ","):
                self.advance()
            elif not self.is_op(tok, "]"):
                raise self.unexpected(tok, "',' or ']'")

    def list_item(self) -> _Lit:
        tok = self.advance()
        if tok.kind in ("num", "str"):
            return _Lit(tok.start, tok.end, 1, tok.value)
        if self.is_op(tok, "-") and self.peek().kind == "num":
            num = self.advance()
            return _Lit(tok.start, num.end, 1, -num.value)
        if self.is_word(tok, "true") or self.is_word(tok, "false"):
            return _Lit(tok.start, tok.end, 1, tok.value == "true")
        raise self.unexpected(tok, "a literal list item (number, string, true or false)")

    def additive(self) -> _Node:
        left = self.multiplicative()
        while (tok := self.peek()).kind == "op" and tok.value in ("+", "-"):
            self.advance()
            left = self.binary(tok, left, self.multiplicative())
        return left

    def multiplicative(self) -> _Node:
        left = self.unary()
        while (tok := self.peek()).kind == "op" and tok.value in ("*", "/"):
            self.advance()
            left = self.binary(tok, left, self.unary())
        return left

    def unary(self) -> _Node:
        tok = self.peek()
        if self.is_op(tok, "-"):
            self.advance()
            self.enter(tok)
            operand = self.unary()
            self.nesting -= 1
            height = self.node_height(tok.start, operand)
            return _Unary(tok.start, operand.end, height, "-", operand)
        return self.primary()

    def primary(self) -> _Node:
        tok = self.advance()
        if tok.kind in ("num", "str"):
            return _Lit(tok.start, tok.end, 1, tok.value)
        if self.is_op(tok, "("):
            self.enter(tok)
            inner = self.expr()
            self.nesting -= 1
            close = self.peek()
            if not self.is_op(close, ")"):
                raise self.unexpected(close, f"')' to close the '(' at offset {tok.start}")
            self.advance()
            inner.start, inner.end = tok.start, close.end
            return inner
        if tok.kind == "name":
            if tok.value in ("true", "false"):
                return _Lit(tok.start, tok.end, 1, tok.value == "true")
            if tok.value in _KEYWORDS:
                raise self.unexpected(tok, "a number, string, name or '('")
            if self.is_op(self.peek(), "("):
                return self.call(tok)
            path = [tok.value]
            end = tok.end
            while self.is_op(self.peek(), "."):
                self.advance()
                seg = self.advance()
                if seg.kind != "name":
                    raise self.unexpected(seg, f"a field name after '{'.'.join(path)}.'")
                path.append(seg.value)
                end = seg.end
            return _Name(tok.start, end, 1, tuple(path))
        if self.is_op(tok, "["):
            raise _ParseError(tok.start, "a list is only allowed after 'in'")
        raise self.unexpected(tok, "a number, string, name or '('")

    def call(self, name_tok: _Tok) -> _Node:
        self.advance()  # "("
        args: list[_Node] = []
        if not self.is_op(self.peek(), ")"):
            self.enter(name_tok)
            args.append(self.expr())
            while self.is_op(self.peek(), ","):
                self.advance()
                args.append(self.expr())
            self.nesting -= 1
        close = self.peek()
        if not self.is_op(close, ")"):
            raise self.unexpected(close, f"',' or ')' to close {name_tok.value}(")
        self.advance()
        height = self.node_height(name_tok.start, *args)
        return _Call(name_tok.start, close.end, height, name_tok.value, args)


# ---------------------------------------------------------------------------------------------
# Checker and compiler


@dataclass(slots=True)
class _Typed:
    type: Type | None  # None: already reported, suppress follow-on errors
    fn: Fn
    const: bool = False
    value: Any = None


def _constant(value: Any) -> _Typed:
    kind = (
        Type.BOOL
        if isinstance(value, bool)
        else Type.STRING
        if isinstance(value, str)
        else Type.NUMBER
    )
    return _Typed(kind, lambda _env: value, True, value)


_BAD: Final = _Typed(None, lambda _env: None)

_ARITH: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}
_COMPARE: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_FLIPPED: Final = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


# Getters are written out per root instead of composed: one Python call per metric read keeps
# a 20-rule evaluation inside its budget.
def _metric_getter(root: str, metric: str) -> Fn:
    scope = root == "usage"
    if metric == "tokens":
        if scope:
            return lambda env: (u := env.usage).input_tokens + u.output_tokens
        return lambda env: (u := env.estimate).input_tokens + u.output_tokens
    if metric == "cost_usd":
        if scope:
            return lambda env: env.usage.cost_micros / 1_000_000
        return lambda env: env.estimate.cost_micros / 1_000_000
    return attrgetter(f"{root}.{metric}")


def _custom_getter(root: str, name: str) -> Fn:
    if root == "usage":
        return lambda env: env.usage.custom.get(name, 0.0)
    return lambda env: env.estimate.custom.get(name, 0.0)


def _max_getter(key: str) -> Fn:
    if key == "cost_usd":
        return lambda env: env.usage.max_values.get("cost_micros", 0) / 1_000_000
    return lambda env: env.usage.max_values.get(key, 0)


def _avg_getter(total: Fn) -> Fn:
    def avg(env: Env) -> Any:
        count = env.usage.executions
        # An empty scope averages to 0 rather than failing every rule before the first step.
        return total(env) / count if count else 0.0

    return avg


def _past_float_range(op: str, a: Any, b: Any) -> float:
    """``a <op> b`` where Python raised OverflowError: an int past the float range met a float,
    or an int quotient is past it. Computed exactly, then rounded once: beyond the float range
    it saturates to ±infinity, as float arithmetic does, instead of raising."""
    if isinstance(a, float) and not math.isfinite(a):
        b = 1.0 if b > 0 else -1.0  # a huge int: next to inf or NaN only its sign matters
    elif isinstance(b, float) and not math.isfinite(b):
        a = 1.0 if a > 0 else -1.0
    else:
        return _to_float(_ARITH[op](Fraction(a), Fraction(b)))
    result: float = _ARITH[op](a, b)
    return result


def _saturating(op: str, left: _Typed, right: _Typed) -> Fn:
    """``left <op> right`` at run time; never raises OverflowError (see _past_float_range)."""
    func = _ARITH[op]
    lf, rf = left.fn, right.fn
    # The try costs nothing until it catches; the common path stays one C call.
    if right.const:
        rv = right.value

        def with_constant_right(env: Env) -> Any:
            a = lf(env)
            try:
                return func(a, rv)
            except OverflowError:
                return _past_float_range(op, a, rv)

        return with_constant_right
    if left.const:
        lv = left.value

        def with_constant_left(env: Env) -> Any:
            b = rf(env)
            try:
                return func(lv, b)
            except OverflowError:
                return _past_float_range(op, lv, b)

        return with_constant_left

    def with_both(env: Env) -> Any:
        a = lf(env)
        b = rf(env)
        try:
            return func(a, b)
        except OverflowError:
            return _past_float_range(op, a, b)

    return with_both


def _nan_checked_in(left: Fn, values: frozenset[Any], negated: bool) -> Fn:
    """``left in values`` (or ``not in``) over numbers: NaN is in no list, so it raises as in
    comparisons rather than letting a step through."""
    if negated:

        def not_in(env: Env) -> bool:
            a = left(env)
            if a in values:
                return False
            if a != a:
                _nan()
            return True

        return not_in

    def is_in(env: Env) -> bool:
        a = left(env)
        if a in values:
            return True
        if a != a:
            _nan()
        return False

    return is_in


def _nan() -> NoReturn:
    # A NaN compares false with everything, which would let a step through: fail closed.
    raise EvaluationError("a metric is NaN")


def _nan_checked(op: str, left: Fn, right: Fn) -> Fn:
    compare = _COMPARE[op]

    def check(env: Env) -> bool:
        a = left(env)
        b = right(env)
        if a != a or b != b:
            _nan()
        return compare(a, b)

    return check


def _nan_checked_const(op: str, left: Fn, limit: Any) -> Fn:
    """``left <op> limit``, specialised per operator; NaN is tested only when it could matter."""
    if op == ">":

        def check(env: Env) -> bool:
            a = left(env)
            if a > limit:
                return True
            if a != a:
                _nan()
            return False

    elif op == ">=":

        def check(env: Env) -> bool:
            a = left(env)
            if a >= limit:
                return True
            if a != a:
                _nan()
            return False

    elif op == "<":

        def check(env: Env) -> bool:
            a = left(env)
            if a < limit:
                return True
            if a != a:
                _nan()
            return False

    elif op == "<=":

        def check(env: Env) -> bool:
            a = left(env)
            if a <= limit:
                return True
            if a != a:
                _nan()
            return False

    elif op == "==":

        def check(env: Env) -> bool:
            a = left(env)
            if a == limit:
                return True
            if a != a:
                _nan()
            return False

    else:

        def check(env: Env) -> bool:
            a = left(env)
            if a != limit:
                if a != a:
                    _nan()
                return True
            return False

    return check


class _Compiler:
    def __init__(self, text: str, *, scope: int, phase: int) -> None:
        self.text = text
        self.scope = scope
        self.phase = phase
        self.diags: list[Diagnostic] = []
        self.compiled: dict[int, _Typed] = {}
        self.reads_scope = False
        self.reads_estimate = False

    def error(self, offset: int, message: str) -> _Typed:
        self.diags.append(Diagnostic(offset, message))
        return _BAD

    def source(self, node: _Node) -> str:
        return " ".join(self.text[node.start : node.end].split())

    def compile(self, node: _Node) -> _Typed:
        if isinstance(node, _Lit):
            typed = self.literal(node)
        elif isinstance(node, _Name):
            typed = self.name(node)
        elif isinstance(node, _Call):
            typed = self.call(node)
        elif isinstance(node, _Unary):
            typed = self.unary(node)
        elif isinstance(node, _In):
            typed = self.membership(node)
        elif isinstance(node, _Binary):
            typed = self.binary(node)
        else:  # pragma: no cover - the parser builds only the nodes above
            raise TypeError(type(node).__name__)
        self.compiled[id(node)] = typed
        return typed

    def literal(self, node: _Lit) -> _Typed:
        typed = _constant(node.value)
        if typed.type is Type.NUMBER and not _is_finite(node.value):
            # An infinite limit would make its rule never (or always) fire, silently.
            return self.error(node.start, f"{self.shown(node)} {_NOT_FINITE}")
        return typed

    def shown(self, node: _Node) -> str:
        text = self.source(node)
        return repr(text if len(text) <= 24 else f"{text[:20]}...")

    # -- names
    def name(self, node: _Name) -> _Typed:
        path = node.path
        full = ".".join(path)
        head = path[0]
        if len(path) == 1 and head in METRICS:
            return self.scope_read(node, full, _metric_getter("usage", head))
        if len(path) == 1 and head == "attempt":
            return _Typed(Type.NUMBER, attrgetter("header.attempt"))
        if head == "custom" and len(path) == 2:
            return self.scope_read(node, full, _custom_getter("usage", path[1]))
        if head == "node" and len(path) == 2 and path[1] in ("id", "handler"):
            return _Typed(Type.STRING, attrgetter(f"header.node.{path[1]}"))
        if full == "node.kind":
            get_kind = attrgetter("header.node.kind")
            return _Typed(Type.STRING, lambda env: _NODE_KINDS.get(get_kind(env), ""))
        if full == "graph.id":
            return _Typed(Type.STRING, attrgetter("header.graph.id"))
        if full == "graph.version":
            return _Typed(Type.NUMBER, attrgetter("header.graph.version"))
        if head == "labels" and len(path) == 2:
            key = path[1]
            get_labels = attrgetter("header.labels")
            return _Typed(Type.STRING, lambda env: get_labels(env).get(key, ""))
        if head == "estimate" and len(path) >= 2:
            rest = ".".join(path[1:])
            if len(path) == 2 and path[1] in METRICS:
                return self.estimate_read(node, full, rest, _metric_getter("estimate", path[1]))
            if len(path) == 3 and path[1] == "custom":
                return self.estimate_read(node, full, rest, _custom_getter("estimate", path[2]))
        return self.error(node.start, self.unknown_name(full))

    def unknown_name(self, full: str) -> str:
        guess = difflib.get_close_matches(full, _CONCRETE_NAMES, n=1, cutoff=0.6)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        return f"unknown name '{full}'{hint} Known names: {', '.join(KNOWN_NAMES)}"

    def scope_read(self, node: _Node, shown: str, fn: Fn) -> _Typed:
        if (
            self.scope == guardrail_pb2.GUARDRAIL_SCOPE_EXECUTION
            and self.phase == guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH
        ):
            return self.error(
                node.start,
                f"'{shown}' is the execution's own usage, which is unknown before dispatch; "
                "expected estimate.<metric> in a pre_dispatch rule of scope execution "
                "(or phase: post_result)",
            )
        self.reads_scope = True
        return _Typed(Type.NUMBER, fn)

    def estimate_read(self, node: _Node, full: str, rest: str, fn: Fn) -> _Typed:
        if self.phase == guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT:
            return self.error(
                node.start,
                f"'{full}' is only known before dispatch; expected phase: pre_dispatch "
                f"(or '{rest}' after the result)",
            )
        self.reads_estimate = True
        return _Typed(Type.NUMBER, fn)

    # -- aggregates
    def call(self, node: _Call) -> _Typed:
        name = node.name
        if name not in AGGREGATES:
            return self.error(
                node.start,
                f"unknown function '{name}'; expected one of: "
                + ", ".join(f"{a}()" for a in AGGREGATES),
            )
        if name == "count":
            if node.args:
                return self.error(node.args[0].start, "count() takes no argument")
            return self.scope_read(node, "count()", attrgetter("usage.executions"))
        if len(node.args) != 1:
            offset = node.args[1].start if node.args else node.end - 1
            return self.error(offset, f"{name}() takes exactly one metric, e.g. {name}(tokens)")
        arg = node.args[0]
        path = arg.path if isinstance(arg, _Name) else ()
        metric = ".".join(path)
        is_custom = len(path) == 2 and path[0] == "custom"
        if metric not in METRICS and not is_custom:
            return self.error(arg.start, self.not_a_metric(name, arg))
        if name == "max":
            fn = _max_getter(metric)
        else:
            total = (
                _custom_getter("usage", path[1]) if is_custom else _metric_getter("usage", metric)
            )
            fn = total if name == "sum" else _avg_getter(total)
        return self.scope_read(node, f"{name}({metric})", fn)

    def not_a_metric(self, func: str, arg: _Node) -> str:
        expected = f"{func}() takes a numeric usage metric of the rule's scope: " + ", ".join(
            (*METRICS, "custom.<name>")
        )
        if not isinstance(arg, _Name):
            return f"{expected}; got the expression '{self.source(arg)}'"
        full = ".".join(arg.path)
        if arg.path[0] == "estimate":
            return f"'{full}' is one step's estimate, not a series; use it without {func}()"
        saved = len(self.diags)
        typed = self.name(arg)
        del self.diags[saved:]
        if typed.type is Type.STRING:
            return f"cannot aggregate '{full}': it is a string. {expected}"
        if typed.type is Type.NUMBER:
            return f"cannot aggregate '{full}': it is not a usage metric. {expected}"
        return self.unknown_name(full)

    # -- operators
    def unary(self, node: _Unary) -> _Typed:
        operand = self.compile(node.operand)
        if operand.type is None:
            return _BAD
        if node.op == "not":
            if operand.type is not Type.BOOL:
                return self.error(
                    node.operand.start, f"'not' needs a boolean, got a {operand.type.value}"
                )
            if operand.const:
                return _constant(not operand.value)
            inner = operand.fn
            return _Typed(Type.BOOL, lambda env: not inner(env))
        if operand.type is not Type.NUMBER:
            return self.error(
                node.operand.start, f"unary '-' needs a number, got a {operand.type.value}"
            )
        if operand.const:
            return _constant(-operand.value)
        inner = operand.fn
        return _Typed(Type.NUMBER, lambda env: -inner(env))

    def membership(self, node: _In) -> _Typed:
        left = self.compile(node.left)
        if left.type is None:
            return _BAD
        valid = True
        for item in node.items:
            item_type = _constant(item.value).type
            if item_type is not left.type:
                return self.error(
                    item.start,
                    f"list item is a {item_type.value if item_type else '?'} but "
                    f"'{self.source(node.left)}' is a {left.type.value}; expected "
                    f"{left.type.value} items",
                )
            valid = self.literal(item).type is not None and valid
        if not valid:
            return _BAD
        values = frozenset(item.value for item in node.items)
        negated = node.negated
        if left.const:
            return _constant((left.value in values) != negated)
        inner = left.fn
        if left.type is Type.NUMBER:
            return _Typed(Type.BOOL, _nan_checked_in(inner, values, negated))
        if negated:
            return _Typed(Type.BOOL, lambda env: inner(env) not in values)
        return _Typed(Type.BOOL, lambda env: inner(env) in values)

    def binary(self, node: _Binary) -> _Typed:
        op = node.op
        left = self.compile(node.left)
        right = self.compile(node.right)
        if left.type is None or right.type is None:
            return _BAD
        if op in ("and", "or"):
            return self.logical(node, left, right)
        if op in _ARITH:
            return self.arithmetic(node, left, right)
        return self.comparison(node, left, right)

    def logical(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        for side, typed in ((node.left, left), (node.right, right)):
            if typed.type is not Type.BOOL:
                assert typed.type is not None
                return self.error(
                    side.start,
                    f"'{node.op}' needs booleans on both sides, got a {typed.type.value} "
                    f"'{self.source(side)}'; expected a comparison such as "
                    f"'{self.source(side)} > 0'",
                )
        lf, rf = left.fn, right.fn
        if left.const and right.const:
            both = (left.value and right.value) if node.op == "and" else (left.value or right.value)
            return _constant(both)
        if node.op == "and":
            return _Typed(Type.BOOL, lambda env: lf(env) and rf(env))
        return _Typed(Type.BOOL, lambda env: lf(env) or rf(env))

    def arithmetic(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        op = node.op
        for typed in (left, right):
            if typed.type is not Type.NUMBER:
                assert typed.type is not None
                return self.error(
                    node.op_pos, f"'{op}' needs numbers on both sides, got a {typed.type.value}"
                )
        func = _ARITH[op]
        if right.const and op == "/" and right.value == 0:
            return self.error(node.right.start, "division by zero")
        if left.const and right.const:
            try:
                value = func(left.value, right.value)
            except (ArithmeticError, ValueError) as exc:
                return self.error(node.op_pos, f"cannot compute constant: {exc}")
            if value != value:
                return self.error(node.op_pos, "constant is not a number (NaN)")
            if not _is_finite(value):
                return self.error(node.op_pos, f"constant {self.shown(node)} {_NOT_FINITE}")
            return _constant(value)
        return _Typed(Type.NUMBER, _saturating(op, left, right))

    def comparison(self, node: _Binary, left: _Typed, right: _Typed) -> _Typed:
        op = node.op
        assert left.type is not None
        assert right.type is not None
        if left.type is not right.type:
            return self.error(
                node.op_pos,
                f"cannot compare a {left.type.value} with a {right.type.value} using '{op}'; "
                f"expected a {left.type.value} on the right of '{op}'",
            )
        if op not in ("==", "!=") and left.type is not Type.NUMBER:
            return self.error(
                node.op_pos,
                f"'{op}' needs numbers, got {left.type.value}s; {left.type.value}s support "
                "== != and 'in [...]'",
            )
        compare = _COMPARE[op]
        if left.const and right.const:
            return _constant(compare(left.value, right.value))
        lf, rf = left.fn, right.fn
        if left.type is Type.NUMBER:
            if right.const:
                return _Typed(Type.BOOL, _nan_checked_const(op, lf, right.value))
            if left.const:
                return _Typed(Type.BOOL, _nan_checked_const(_FLIPPED[op], rf, left.value))
            return _Typed(Type.BOOL, _nan_checked(op, lf, rf))
        if right.const:
            rv = right.value
            return _Typed(Type.BOOL, lambda env: compare(lf(env), rv))
        return _Typed(Type.BOOL, lambda env: compare(lf(env), rf(env)))

    # -- what a violation reports
    def principal(self, node: _Node) -> tuple[str, Fn, Fn] | None:
        """The numeric comparison a violation reports: the top one, or the first in an 'and'."""
        if isinstance(node, _Binary):
            if node.op == "and":
                return self.principal(node.left) or self.principal(node.right)
            if node.op in _COMPARISONS:
                left = self.compiled[id(node.left)]
                right = self.compiled[id(node.right)]
                if left.type is not Type.NUMBER:
                    return None
                if left.const and not right.const:
                    return self.source(node.right), right.fn, left.fn
                return self.source(node.left), left.fn, right.fn
        return None


def compile_expression(
    text: str,
    *,
    scope: int = guardrail_pb2.GUARDRAIL_SCOPE_EXECUTION,
    phase: int = guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT,
    expect: Type | None = Type.BOOL,
) -> Expression:
    """Parse, type-check and compile one expression.

    Args:
        text: The expression.
        scope: The rule's ``GuardrailScope`` (execution-scope rules cannot read their own
            usage before dispatch).
        phase: The rule's ``GuardrailPhase`` (``estimate.*`` exists only before dispatch).
            ``GUARDRAIL_PHASE_UNSPECIFIED`` skips the checks that depend on the phase.
        expect: The type the expression must have; ``None`` accepts any.

    Returns:
        The compiled expression.

    Raises:
        ExpressionError: with every problem found, each at an offset into ``text``.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(
            text[:40],
            [Diagnostic(MAX_EXPRESSION_CHARS, f"expression longer than {MAX_EXPRESSION_CHARS}")],
        )
    try:
        toks = _tokenize(text)
        if toks[0].kind == "eof":
            raise _ParseError(0, "expected an expression, e.g. sum(tokens) > 10000")
        tree = _Parser(toks).parse()
    except _ParseError as stop:
        raise ExpressionError(text, [Diagnostic(stop.offset, stop.message)]) from None
    compiler = _Compiler(text, scope=scope, phase=phase)
    typed = compiler.compile(tree)
    if typed.type is not None and expect is not None and typed.type is not expect:
        hint = (
            f"; expected a condition such as '{compiler.source(tree)} > 0'"
            if typed.type is Type.NUMBER
            else ""
        )
        compiler.error(tree.start, f"expected a {expect.value}, got a {typed.type.value}{hint}")
    if compiler.diags:
        raise ExpressionError(text, compiler.diags)
    assert typed.type is not None
    principal = compiler.principal(tree)
    if principal is None:
        metric, observed, limit = " ".join(text.split()), None, None
    else:
        metric, observed, limit = principal
    return Expression(
        text=text,
        summary=" ".join(text.split()),
        type=typed.type,
        test=typed.fn,
        metric=metric,
        observed=observed,
        limit=limit,
        reads_scope=compiler.reads_scope,
        reads_estimate=compiler.reads_estimate,
    )


__all__ = [
    "AGGREGATES",
    "KNOWN_NAMES",
    "MAX_EXPRESSION_CHARS",
    "MAX_EXPRESSION_DEPTH",
    "METRICS",
    "Diagnostic",
    "Env",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "Type",
    "compile_expression",
]
