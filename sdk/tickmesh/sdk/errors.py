"""The tickmesh exception tree: one root, typed subclasses.

    TickmeshError
    ├── ConfigError                 bad configuration
    ├── ClientUsageError            a client closed, or used from another event loop
    ├── TransportError              NATS or gRPC unreachable
    │   └── DeadlineExceededError   also a TimeoutError
    ├── RPCError                    a call failed with a gRPC status (.status)
    │   └── NotFoundError           the thing asked for does not exist
    ├── ValidationError             malformed envelope, graph or policy (.issues)
    ├── GuardrailRejectedError      a guardrail refused a step (.rule_id, .reason)
    ├── TaskError                   raised by task code; travels as ErrorInfo
    ├── PlanFailedError             a plan decided FAIL
    └── LifetimeFailedError         a lifetime ended FAILED or ABORTED

Task failures travel as data (``TaskResult.error``); these exceptions are how
the SDK surfaces them to Python callers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class StatusCode(enum.IntEnum):
    """gRPC status codes, mirrored so SDK users need not import grpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a definition, located as precisely as the input allows."""

    message: str
    """What is wrong and what was expected."""
    field: str = ""
    """Path of the offending field, e.g. ``nodes[2].handler``."""
    line: int = 0
    """1-based line in the source file; 0 when unknown."""
    column: int = 0
    """1-based column in the source file; 0 when unknown."""
    source: str = ""
    """File or document name, when known."""

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.source, self.line, self.column) if p)
        parts = [p for p in (where, self.field) if p]
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class TickmeshError(Exception):
    """Root of every error tickmesh raises."""


class ConfigError(TickmeshError):
    """Configuration is missing or invalid."""


class ClientUsageError(TickmeshError, RuntimeError):
    """A client used where it cannot work: after ``close()`` (or closed under a call in
    flight), or from an event loop other than the one it was connected in."""


class TransportError(TickmeshError):
    """A NATS or gRPC peer could not be reached."""


class DeadlineExceededError(TransportError, TimeoutError):
    """A call or a wait ran past its deadline."""


class RPCError(TickmeshError):
    """A call failed with a gRPC status."""

    def __init__(self, status: StatusCode, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.detail = message


class NotFoundError(RPCError):
    """The graph, lifetime, execution, policy or blob asked for does not exist."""

    def __init__(self, message: str) -> None:
        super().__init__(StatusCode.NOT_FOUND, message)


class ValidationError(TickmeshError):
    """Input is malformed: an envelope, a graph, a policy or a payload."""

    def __init__(self, message: str, issues: Sequence[Issue] = ()) -> None:
        self.issues = tuple(issues)
        if self.issues:
            listed = "\n".join(f"  - {issue}" for issue in self.issues)
            message = f"{message}\n{listed}"
        super().__init__(message)


class GuardrailRejectedError(TickmeshError):
    """A guardrail refused a step or stopped a lifetime."""

    def __init__(self, reason: str, *, rule_id: str = "", policy_id: str = "") -> None:
        super().__init__(f"guardrail {policy_id}/{rule_id}: {reason}" if rule_id else reason)
        self.reason = reason
        self.rule_id = rule_id
        self.policy_id = policy_id


class TaskError(TickmeshError):
    """Raised by task or plan code to fail an attempt with a typed error.

    Args:
        message: What went wrong.
        type: A stable classification, matched by ``RetryPolicy.non_retryable_error_types``.
        retryable: Whether another attempt may succeed.
        details: JSON-like structured context.
    """

    def __init__(
        self,
        message: str,
        *,
        type: str = "TaskError",
        retryable: bool = True,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.retryable = retryable
        self.details = dict(details or {})


class PlanFailedError(TickmeshError):
    """A plan decided to fail the lifetime."""


class LifetimeFailedError(TickmeshError):
    """A lifetime ended FAILED or ABORTED instead of COMPLETED."""

    def __init__(self, lifetime_id: str, state: str, message: str) -> None:
        super().__init__(f"lifetime {lifetime_id} ended {state}: {message}")
        self.lifetime_id = lifetime_id
        self.state = state
        self.detail = message
