"""Timeouts and retries of one step, shared by the executor pool (which retries)
and the router (which must know whether a stored attempt is the last one).

Both sides apply the same rule to the same data (the node's retry policy, sent
in the request, and the attempt's result), so they always agree.
"""

from __future__ import annotations

from tickmesh.v1 import graph_pb2, result_pb2

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_S = 1.0
DEFAULT_MAX_BACKOFF_S = 60.0
DEFAULT_MULTIPLIER = 2.0


def timeout_seconds(node_timeout_s: float) -> float:
    return node_timeout_s if node_timeout_s > 0 else DEFAULT_TIMEOUT_S


def max_attempts(retry: graph_pb2.RetryPolicy) -> int:
    return retry.max_attempts if retry.max_attempts > 0 else DEFAULT_MAX_ATTEMPTS


def backoff_seconds(retry: graph_pb2.RetryPolicy, attempt: int) -> float:
    """Delay before the attempt after ``attempt`` (1-based)."""
    initial = (
        retry.initial_backoff.ToTimedelta().total_seconds()
        if retry.HasField("initial_backoff")
        else DEFAULT_INITIAL_BACKOFF_S
    )
    cap = (
        retry.max_backoff.ToTimedelta().total_seconds()
        if retry.HasField("max_backoff")
        else DEFAULT_MAX_BACKOFF_S
    )
    multiplier = retry.backoff_multiplier if retry.backoff_multiplier > 0 else DEFAULT_MULTIPLIER
    return float(min(cap, initial * multiplier ** max(0, attempt - 1)))


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
