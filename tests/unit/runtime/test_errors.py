"""The servicers' error table: known errors keep their status and message, the
unexpected become INTERNAL with a logged id, a tenant out of JetStream storage gets
RESOURCE_EXHAUSTED and a NATS that does not answer UNAVAILABLE, neither with a
traceback per call."""

from __future__ import annotations

import logging

import grpc
import pytest
from nats import errors as nats_errors
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, ServiceUnavailableError

from tickmesh.runtime import errors
from tickmesh.sdk.errors import NotFoundError, StatusCode, ValidationError


@pytest.fixture(autouse=True)
def _fresh_log_throttle() -> None:
    errors._bus_logged_at.clear()


def test_known_errors_keep_their_status_and_message() -> None:
    assert errors.status_for(NotFoundError("lifetime x")) == (
        grpc.StatusCode.NOT_FOUND,
        "lifetime x",
    )
    assert errors.status_for(ValidationError("bad graph")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad graph",
    )
    assert errors.status_for(errors.StatusError(StatusCode.ABORTED, "raced")) == (
        grpc.StatusCode.ABORTED,
        "raced",
    )


def test_an_unexpected_error_is_internal_with_a_logged_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger=errors.__name__):
        code, message = errors.status_for(RuntimeError("boom"))
    assert code is grpc.StatusCode.INTERNAL
    assert "boom" not in message
    error_id = message.removeprefix("internal error (id ").removesuffix(")")
    assert [r.getMessage() for r in caplog.records] == [f"unexpected error {error_id}"]
    assert caplog.records[0].exc_info is not None


@pytest.mark.parametrize(
    ("err_code", "description"),
    [
        (10002, "resource limits exceeded for account"),
        (10023, "insufficient resources"),
        (10028, "insufficient memory resources available"),
        (10047, "insufficient storage resources available"),
    ],
)
def test_a_tenant_out_of_storage_gets_resource_exhausted(err_code: int, description: str) -> None:
    refused = BadRequestError(code=400, err_code=err_code, description=description)
    code, message = errors.status_for(refused)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert description in message
    assert str(err_code) in message


def test_storage_refusals_are_logged_once_a_minute_without_a_traceback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(errors, "_clock", lambda: now[0])
    refused = APIError(code=400, err_code=10002, description="resource limits exceeded")
    with caplog.at_level(logging.WARNING, logger=errors.__name__):
        for _ in range(50):
            errors.status_for(refused)
        now[0] += errors.BUS_LOG_INTERVAL_S - 1
        errors.status_for(refused)
        assert len(caplog.records) == 1
        now[0] += 1
        errors.status_for(refused)
    assert len(caplog.records) == 2
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize(
    "unreachable",
    [
        nats_errors.TimeoutError(),
        nats_errors.FlushTimeoutError(),
        nats_errors.NoServersError(),
        nats_errors.ConnectionClosedError(),
        nats_errors.ConnectionReconnectingError(),
        nats_errors.StaleConnectionError(),
        nats_errors.OutboundBufferLimitError(),
        nats_errors.NoRespondersError(),
        ServiceUnavailableError(code=503, description="no responders"),
        NoStreamResponseError(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_nats_that_does_not_answer_is_unavailable(
    unreachable: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=errors.__name__):
        code, message = errors.status_for(unreachable)
        errors.status_for(unreachable)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert message.startswith(f"NATS did not answer ({type(unreachable).__name__}")
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.WARNING, None)]


def test_a_write_larger_than_a_bus_message_is_resource_exhausted() -> None:
    code, message = errors.status_for(nats_errors.MaxPayloadError())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than one NATS message" in message


def test_a_plain_timeout_stays_unexpected() -> None:
    """Only the bus's own timeout says NATS is away; any other is a bug to look at."""
    code, _ = errors.status_for(TimeoutError("a wait of our own"))
    assert code is grpc.StatusCode.INTERNAL


def test_other_jetstream_refusals_stay_unexpected() -> None:
    wrong_sequence = APIError(code=400, err_code=10071, description="wrong last sequence")
    code, _ = errors.status_for(wrong_sequence)
    assert code is grpc.StatusCode.INTERNAL
