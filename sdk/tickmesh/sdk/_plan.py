"""Plan authoring: the ``@plan`` decorator, ``PlanContext`` and the decisions a plan returns.

A plan decides what runs next. It receives the lifetime's goal and the
results that flowed into it, and returns a :class:`Decision` built with
:func:`dispatch` (of :func:`step` s), :func:`complete`, :func:`wait_for` or
:func:`fail`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar, overload

from ._task import (
    ExecutionContext,
    HandlerDefinition,
    HandlerKind,
    _timeout_seconds,
    parameter_annotation,
)
from .errors import ConfigError

In = TypeVar("In")

DecisionKind = Literal["dispatch", "complete", "wait", "fail"]
OnTimeout = Literal["fail", "signal", "abort"]


@dataclass(frozen=True, slots=True)
class SignalView:
    """A signal delivered to a plan that waited for it."""

    name: str
    """The signal's name."""
    payload: Any
    """The data sent with the signal, decoded."""
    approver: str = ""
    """Who sent it."""
    timed_out: bool = False
    """True when the wait timed out and this is its default payload."""


@dataclass(frozen=True, slots=True)
class PlanInputView:
    """The outcome of one task execution that flowed into the plan."""

    execution_id: str
    """The task execution's id."""
    node_id: str
    """The task node that ran."""
    status: str
    """``succeeded``, ``failed``, ``timed_out``, ``cancelled`` or ``rejected``."""
    output: Any = None
    """The task's output, decoded; None unless it succeeded."""
    error_type: str = ""
    """The error's type when the task did not succeed."""
    error_message: str = ""
    """The error's message when the task did not succeed."""
    input_tokens: int = 0
    """Model input tokens the task used."""
    output_tokens: int = 0
    """Model output tokens the task produced."""
    cost_micros: int = 0
    """What the task cost, in millionths of the currency unit."""

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass(eq=False)
class PlanContext(ExecutionContext):
    """The context a plan function receives as its first argument."""

    signal: SignalView | None = None
    """The signal the plan waited for, when it is asked again after ``wait_for``."""


@dataclass(frozen=True, slots=True)
class Step:
    """One node to run next, with its input."""

    node_id: str
    input: Any = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a plan decided. Build one with dispatch / complete / wait_for / fail."""

    kind: DecisionKind
    steps: tuple[Step, ...] = ()
    output: Any = None
    signal_name: str = ""
    timeout: timedelta | None = None
    on_timeout: OnTimeout = "fail"
    default: Any = None
    prompt: str = ""
    message: str = ""
    error_type: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    rationale: str = ""


def step(node_id: str, input: Any = None) -> Step:
    """One next step: run ``node_id`` with ``input`` (encoded like a task output)."""
    if not node_id:
        raise ConfigError("step() needs a node id")
    return Step(node_id, input)


def dispatch(*steps: Step, rationale: str = "") -> Decision:
    """Run the given steps next; more than one is a fan-out."""
    if not steps:
        raise ConfigError("dispatch() needs at least one step")
    for item in steps:
        if not isinstance(item, Step):
            raise ConfigError(f"dispatch() takes step(...) values, got {item!r}")
    return Decision("dispatch", steps=tuple(steps), rationale=rationale)


def complete(output: Any = None, *, rationale: str = "") -> Decision:
    """Complete the lifetime with ``output``."""
    return Decision("complete", output=output, rationale=rationale)


def wait_for(
    signal_name: str,
    *,
    timeout: float | timedelta | None = None,
    on_timeout: OnTimeout = "fail",
    default: Any = None,
    prompt: str = "",
    rationale: str = "",
) -> Decision:
    """Park the lifetime until ``signal_name`` arrives; the plan is then asked again.

    Args:
        signal_name: The signal to wait for, e.g. ``"approval"``.
        timeout: How long to wait (seconds or a timedelta); None waits forever.
        on_timeout: ``"fail"``, ``"abort"``, or ``"signal"`` (deliver ``default``).
        default: The payload delivered when ``on_timeout`` is ``"signal"``.
        prompt: What the approver is asked.
        rationale: Why, for people reading the trace.
    """
    if not signal_name:
        raise ConfigError("wait_for() needs a signal name")
    if on_timeout not in ("fail", "signal", "abort"):
        raise ConfigError(f"on_timeout must be 'fail', 'signal' or 'abort', not {on_timeout!r}")
    seconds = _timeout_seconds(timeout)
    return Decision(
        "wait",
        signal_name=signal_name,
        timeout=None if seconds is None else timedelta(seconds=seconds),
        on_timeout=on_timeout,
        default=default,
        prompt=prompt,
        rationale=rationale,
    )


def fail(
    message: str,
    *,
    type: str = "PlanFailed",
    details: Mapping[str, Any] | None = None,
    rationale: str = "",
) -> Decision:
    """Fail the lifetime with a typed error."""
    return Decision(
        "fail", message=message, error_type=type, details=dict(details or {}), rationale=rationale
    )


PlanFn = Callable[[PlanContext, In, list[PlanInputView]], Awaitable[Decision]]


class Plan(HandlerDefinition, Generic[In]):
    """A plan handler: ``fn(ctx, goal, inputs) -> Decision`` with a name.

    Create one with :func:`plan`.
    """

    kind: HandlerKind = "plan"

    def __init__(
        self,
        fn: PlanFn[In],
        *,
        name: str | None = None,
        retries: int | None = None,
        timeout: float | timedelta | None = None,
    ) -> None:
        super().__init__(fn, name=name, retries=retries, timeout=timeout)
        self.fn = fn
        self.goal_annotation = parameter_annotation(fn, 1)

    async def __call__(self, ctx: PlanContext, goal: In, inputs: list[PlanInputView]) -> Decision:
        return await self.fn(ctx, goal, inputs)


@overload
def plan(fn: PlanFn[In], /) -> Plan[In]: ...


@overload
def plan(
    *,
    name: str | None = None,
    retries: int | None = None,
    timeout: float | timedelta | None = None,
) -> Callable[[PlanFn[In]], Plan[In]]: ...


def plan(
    fn: PlanFn[In] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int | None = None,
    timeout: float | timedelta | None = None,
) -> Plan[In] | Callable[[PlanFn[In]], Plan[In]]:
    """Turn an async function into a plan handler.

    Example:
        @plan
        async def coordinator(
            ctx: PlanContext, goal: dict, inputs: list[PlanInputView]
        ) -> Decision:
            if not inputs:
                return dispatch(step("research", goal))
            return complete({"answer": inputs[0].output})
    """

    def wrap(f: PlanFn[In]) -> Plan[In]:
        return Plan(f, name=name, retries=retries, timeout=timeout)

    if fn is not None:
        return wrap(fn)
    return wrap
