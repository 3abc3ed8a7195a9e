"""Task authoring: the ``@task`` decorator, ``Task`` and the ``TaskContext`` handed to it.

A task does work (a tool, API or model call) and returns an output. The
context says which execution is running, carries the deadline and a
cancellation event, and accumulates the telemetry guardrails read.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar, overload

from . import codecs
from .errors import ConfigError, TaskError

In = TypeVar("In")
Out = TypeVar("Out")

HandlerKind = Literal["task", "plan"]

_HANDLER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")


@dataclass(frozen=True, slots=True)
class ErrorData:
    """A structured error, as it travels in ``ErrorInfo``."""

    type: str
    message: str
    retryable: bool = True
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorData:
        """``TaskError`` keeps its type, retryability and details; anything else is retryable."""
        if isinstance(exc, TaskError):
            return cls(exc.type, str(exc), exc.retryable, dict(exc.details))
        return cls(type(exc).__name__, str(exc) or type(exc).__name__, True)


@dataclass(slots=True)
class ModelUsage:
    """Usage attributed to one model."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    calls: int = 0


@dataclass(slots=True)
class Usage:
    """Telemetry accumulated by one attempt through ``report`` and ``record_tool_action``."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    models: dict[str, ModelUsage] = field(default_factory=dict)
    custom: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolActionRecord:
    """One recorded tool or API call."""

    action_id: str
    tool: str
    input: tuple[str, bytes]
    output: tuple[str, bytes] | None
    error: ErrorData | None
    started_at: datetime | None
    duration: timedelta | None
    side_effect: bool


@dataclass(eq=False)
class ExecutionContext:
    """What every handler is told about the execution it runs."""

    tenant_id: str
    """The tenant the work belongs to."""
    lifetime_id: str
    """The lifetime (one run of a graph) the step belongs to."""
    execution_id: str
    """Deterministic id of the step: the same across attempts, redelivery and replay."""
    node_id: str
    """The graph node being executed."""
    handler: str
    """The handler name the node is bound to."""
    attempt: int
    """1-based attempt number."""
    iteration: int
    """How often this node has run in this lifetime, starting at 1."""
    deadline: datetime
    """When the attempt must be finished (UTC); the worker cancels the handler then."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Free-form labels copied from the lifetime."""
    config: dict[str, Any] = field(default_factory=dict)
    """The node's static configuration from the graph."""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the pool cancels the attempt or the worker drains past its grace."""
    usage: Usage = field(default_factory=Usage)
    """Telemetry accumulated so far."""
    tool_actions: list[ToolActionRecord] = field(default_factory=list)
    """Tool calls recorded so far."""

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return (self.deadline - datetime.now(UTC)).total_seconds()

    def report(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost_micros: int = 0,
        model: str | None = None,
        model_calls: int | None = None,
        tool_calls: int = 0,
        **custom_metrics: float,
    ) -> None:
        """Add usage to this attempt's telemetry (values add up across calls).

        Args:
            input_tokens: Model input tokens used.
            output_tokens: Model output tokens produced.
            cost_micros: Cost in millionths of the currency unit.
            model: The model the usage belongs to; usage is then also broken down per model.
            model_calls: Model calls made; defaults to 1 when ``model`` is given, else 0.
            tool_calls: Tool calls made that were not recorded with ``record_tool_action``.
            **custom_metrics: Numeric metrics guardrails read as ``custom.<name>``; summed.
        """
        calls = model_calls if model_calls is not None else (1 if model else 0)
        usage = self.usage
        usage.input_tokens += input_tokens
        usage.output_tokens += output_tokens
        usage.cost_micros += cost_micros
        usage.model_calls += calls
        usage.tool_calls += tool_calls
        if model:
            per_model = usage.models.setdefault(model, ModelUsage())
            per_model.input_tokens += input_tokens
            per_model.output_tokens += output_tokens
            per_model.cost_micros += cost_micros
            per_model.calls += calls
        for name, value in custom_metrics.items():
            usage.custom[name] = usage.custom.get(name, 0.0) + float(value)

    def record_tool_action(
        self,
        tool: str,
        input: Any,
        output: Any = None,
        *,
        side_effect: bool = False,
        error: BaseException | str | None = None,
        started_at: datetime | None = None,
        duration: timedelta | float | None = None,
    ) -> None:
        """Record a tool or API call, so replay and fork can account for it.

        Each recorded action also counts as one tool call in the telemetry.

        Args:
            tool: The tool or API called.
            input: What was sent (encoded like a task output).
            output: What came back; ``None`` records no output.
            side_effect: Whether the call changed the outside world.
            error: What went wrong, if the call failed.
            started_at: When the call began.
            duration: How long it took (seconds or a timedelta).
        """
        if isinstance(error, str):
            err: ErrorData | None = ErrorData("ToolError", error)
        elif error is not None:
            err = ErrorData.from_exception(error)
        else:
            err = None
        if isinstance(duration, int | float):
            duration = timedelta(seconds=duration)
        self.tool_actions.append(
            ToolActionRecord(
                action_id=f"a{len(self.tool_actions) + 1}",
                tool=tool,
                input=codecs.encode(input),
                output=codecs.encode(output) if output is not None else None,
                error=err,
                started_at=started_at,
                duration=duration,
                side_effect=side_effect,
            )
        )
        self.usage.tool_calls += 1


@dataclass(eq=False)
class TaskContext(ExecutionContext):
    """The context a task function receives as its first argument."""


def code_digest(fn: Callable[..., Any]) -> str:
    """Hex SHA-256 of a function's source, or of its qualified name when no source exists."""
    try:
        material = inspect.getsource(fn)
    except (OSError, TypeError):
        material = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return hashlib.sha256(material.encode()).hexdigest()


def check_handler_name(name: str) -> str:
    if not _HANDLER_NAME.fullmatch(name):
        raise ConfigError(f"invalid handler name {name!r}: expected [A-Za-z0-9_-]{{1,128}}")
    return name


def parameter_annotation(fn: Callable[..., Any], index: int) -> Any:
    """The resolved annotation of ``fn``'s positional parameter ``index``, or None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if len(params) <= index:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: decode by content type
        return None
    return hints.get(params[index].name)


def _timeout_seconds(timeout: float | timedelta | None) -> float | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if seconds <= 0:
        raise ConfigError(f"timeout must be positive, got {timeout!r}")
    return seconds


class HandlerDefinition:
    """What a task and a plan handler have in common: an async function with a name,
    an optional retry count and timeout, and a digest of its code."""

    kind: HandlerKind

    def __init__(
        self,
        fn: Callable[..., Awaitable[Any]],
        *,
        name: str | None,
        retries: int | None,
        timeout: float | timedelta | None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigError(f"@{self.kind} needs an async function, got {fn!r}")
        if retries is not None and retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        self.name = check_handler_name(name or fn.__name__)
        self.retries = retries
        """Retries after the first attempt (a default for graph nodes); None: the graph decides."""
        self.timeout = _timeout_seconds(timeout)
        """Per-attempt limit in seconds, enforced by the worker on top of the pool's deadline."""
        self.code_digest = code_digest(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def max_attempts(self) -> int | None:
        """``retries + 1``, or None when unset."""
        return None if self.retries is None else self.retries + 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Task(HandlerDefinition, Generic[In, Out]):
    """A task handler: an async function ``fn(ctx, input) -> output`` with a name.

    Create one with :func:`task`. Calling the task calls the function, which
    keeps it unit-testable with a hand-made context.
    """

    kind: HandlerKind = "task"

    def __init__(
        self,
        fn: Callable[[TaskContext, In], Awaitable[Out]],
        *,
        name: str | None = None,
        retries: int | None = None,
        timeout: float | timedelta | None = None,
    ) -> None:
        super().__init__(fn, name=name, retries=retries, timeout=timeout)
        self.fn = fn
        self.input_annotation = parameter_annotation(fn, 1)

    async def __call__(self, ctx: TaskContext, input: In) -> Out:
        return await self.fn(ctx, input)


@overload
def task(fn: Callable[[TaskContext, In], Awaitable[Out]], /) -> Task[In, Out]: ...


@overload
def task(
    *,
    name: str | None = None,
    retries: int | None = None,
    timeout: float | timedelta | None = None,
) -> Callable[[Callable[[TaskContext, In], Awaitable[Out]]], Task[In, Out]]: ...


def task(
    fn: Callable[[TaskContext, In], Awaitable[Out]] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int | None = None,
    timeout: float | timedelta | None = None,
) -> Task[In, Out] | Callable[[Callable[[TaskContext, In], Awaitable[Out]]], Task[In, Out]]:
    """Turn an async function into a task handler.

    Args:
        fn: ``async def fn(ctx: TaskContext, input) -> output``.
        name: The handler name nodes bind to; defaults to the function's name.
        retries: Retries after the first attempt, used as the node default.
        timeout: Per-attempt limit in seconds (or a timedelta).

    Example:
        @task(retries=2, timeout=30)
        async def summarize(ctx: TaskContext, doc: dict) -> str:
            ctx.report(input_tokens=1200, output_tokens=80, model="small")
            return doc["text"][:100]
    """

    def wrap(f: Callable[[TaskContext, In], Awaitable[Out]]) -> Task[In, Out]:
        return Task(f, name=name, retries=retries, timeout=timeout)

    if fn is not None:
        return wrap(fn)
    return wrap
