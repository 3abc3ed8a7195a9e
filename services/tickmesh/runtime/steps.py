"""Timeouts and retries of one step, shared by the executor pool (which retries)
and the router (which must know whether a stored attempt is the last one).

Both sides apply the same rule to the same data (the node's retry policy, sent
in the request, and the attempt's result), so they always agree.
"""

from __future__ import annotations

import math

from tickmesh.v1 import graph_pb2, result_pb2

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_S = 1.0
DEFAULT_MAX_BACKOFF_S = 60.0
DEFAULT_MULTIPLIER = 2.0
EXACT_BACKOFFS = 64
"""Backoffs :func:`total_backoff_seconds` adds one by one before counting the rest as the cap."""


def timeout_seconds(node_timeout_s: float) -> float:
    return node_timeout_s if node_timeout_s > 0 else DEFAULT_TIMEOUT_S


def max_attempts(retry: graph_pb2.RetryPolicy) -> int:
    return retry.max_attempts if retry.max_attempts > 0 else DEFAULT_MAX_ATTEMPTS


def _backoff_cap(retry: graph_pb2.RetryPolicy) -> float:
    return (
        retry.max_backoff.ToTimedelta().total_seconds()
        if retry.HasField("max_backoff")
        else DEFAULT_MAX_BACKOFF_S
    )


def backoff_seconds(retry: graph_pb2.RetryPolicy, attempt: int) -> float:
    """Delay before the attempt after ``attempt`` (1-based)."""
    initial = (
        retry.initial_backoff.ToTimedelta().total_seconds()
        if retry.HasField("initial_backoff")
        else DEFAULT_INITIAL_BACKOFF_S
    )
    cap = _backoff_cap(retry)
    multiplier = retry.backoff_multiplier if retry.backoff_multiplier > 0 else DEFAULT_MULTIPLIER
    try:
        grown = initial * multiplier ** max(0, attempt - 1)
    except OverflowError:  # past a float's range (about 2**1024): long past the cap
        grown = math.inf
    return float(min(cap, grown))


def total_backoff_seconds(retry: graph_pb2.RetryPolicy, attempts: int) -> float:
    """The backoffs between ``attempts`` attempts, summed (``backoff_seconds`` of 1 to
    ``attempts - 1``), in at most ``EXACT_BACKOFFS`` steps: a policy may allow 2**32 - 1
    attempts. Exact when the backoff stops growing within them (any usual policy
    reaches its cap in a few); past them, each counts as the cap (never an underestimate)."""
    count = attempts - 1
    cap = _backoff_cap(retry)
    total = 0.0
    for attempt in range(1, min(count, EXACT_BACKOFFS) + 1):
        backoff = backoff_seconds(retry, attempt)
        if backoff >= cap or backoff == backoff_seconds(retry, attempt + 1):
            return total + backoff * (count - attempt + 1)  # the rest are the same
        total += backoff
    return total + cap * max(0, count - EXACT_BACKOFFS)


def error_is_retryable(retry: graph_pb2.RetryPolicy, error: result_pb2.ErrorInfo) -> bool:
    return error.retryable and error.type not in set(retry.non_retryable_error_types)


def task_attempt_is_final(
    retry: graph_pb2.RetryPolicy, attempt: int, result: result_pb2.TaskResult
) -> bool:
    """Whether this attempt's record ends the step (no retry follows)."""
    if result.status in (
        result_pb2.TASK_STATUS_SUCCEEDED,
        result_pb2.TASK_STATUS_REJECTED,
        result_pb2.TASK_STATUS_CANCELLED,
    ):
        return True
    if attempt >= max_attempts(retry):
        return True
    return not error_is_retryable(retry, result.error)


def plan_attempt_is_final(
    retry: graph_pb2.RetryPolicy, attempt: int, result: result_pb2.PlanResult
) -> bool:
    if result.WhichOneof("decision") is not None:
        return True
    if attempt >= max_attempts(retry):
        return True
    return not error_is_retryable(retry, result.error)
