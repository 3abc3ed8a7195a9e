"""Structured logs: one JSON object per line, with the tenant, lifetime and
execution ids of the work in hand taken from context variables."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="")
lifetime_var: contextvars.ContextVar[str] = contextvars.ContextVar("lifetime", default="")
execution_var: contextvars.ContextVar[str] = contextvars.ContextVar("execution", default="")


@contextlib.contextmanager
def log_context(tenant: str = "", lifetime: str = "", execution: str = "") -> Iterator[None]:
    tokens = []
    for var, value in ((tenant_var, tenant), (lifetime_var, lifetime), (execution_var, execution)):
        if value:
            tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.tenant = tenant_var.get()
        record.lifetime = lifetime_var.get()
        record.execution = execution_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("service", "tenant", "lifetime", "execution"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", *, json_output: bool = True, service: str = "") -> None:
    """Configure the root logger once, in a service's serve()."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if service:
        handler.addFilter(_ServiceFilter(service))
    handler.setFormatter(
        JsonFormatter()
        if json_output
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _ServiceFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        return True
