"""Structured logs carry the ids of the work in hand."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from tickmesh.runtime.logging import ContextFilter, JsonFormatter, log_context


def _format(record: logging.LogRecord) -> dict[str, str]:
    ContextFilter().filter(record)
    record.service = "router"
    return json.loads(JsonFormatter().format(record))  # type: ignore[no-any-return]


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("tickmesh.test", logging.INFO, __file__, 1, message, (), None)


def test_json_lines_carry_the_context_ids() -> None:
    with log_context(tenant="acme", lifetime="l1", execution="e1"):
        entry = _format(_record("routed"))
    assert entry["msg"] == "routed"
    assert entry["tenant"] == "acme"
    assert entry["lifetime"] == "l1"
    assert entry["execution"] == "e1"
    assert entry["service"] == "router"
    assert entry["level"] == "INFO"
    outside = _format(_record("idle"))
    assert "tenant" not in outside
    assert "lifetime" not in outside


async def test_context_stays_with_its_task() -> None:
    seen: dict[str, str] = {}

    async def work(lifetime: str) -> None:
        with log_context(tenant="acme", lifetime=lifetime):
            await asyncio.sleep(0.01)
            seen[lifetime] = _format(_record("x"))["lifetime"]

    await asyncio.gather(work("a"), work("b"))
    assert seen == {"a": "a", "b": "b"}


def test_exceptions_are_included_once() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info()
        )
    entry = _format(record)
    assert "ValueError: boom" in entry["exc"]
