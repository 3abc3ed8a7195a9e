"""When a test times out, say what its event loop was waiting for.

pytest-timeout prints each thread's stack, but a test's coroutines are on none of them: the
loop's thread shows it waiting in ``select``. This plugin extends that print with every
unfinished asyncio task of each open event loop, and every async generator (a fixture's
teardown runs in one) suspended at an await, each with the chain of awaits it is stopped at.
It is printed at the moment of the timeout, before the loop's tasks are cancelled, and only
then: walking the heap is slow.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import pytest_timeout


def _frame_line(frame: Any) -> str:
    code = frame.f_code
    return f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}"


def await_chain(awaitable: Any) -> list[str]:
    """Where ``awaitable`` (a coroutine, generator or async generator) is suspended: one
    line per frame from the outermost await to the innermost, then what that one awaits
    when it is not a coroutine (a future, mostly)."""
    lines: list[str] = []
    current = awaitable
    for _ in range(200):  # deep enough for any real chain; a cycle cannot loop for ever
        frame = next(
            (
                getattr(current, name)
                for name in ("cr_frame", "gi_frame", "ag_frame")
                if getattr(current, name, None) is not None
            ),
            None,
        )
        if frame is None:
            if current is not awaitable and current is not None:
                lines.append(f"  awaiting {current!r}"[:300])
            break
        lines.append(_frame_line(frame))
        current = next(
            (
                getattr(current, name)
                for name in ("cr_await", "gi_yieldfrom", "ag_await")
                if getattr(current, name, None) is not None
            ),
            None,
        )
    return lines


def waiting_report() -> str:
    """Every pending task of each open loop and every async generator suspended at an
    await, with where each waits."""
    parts: list[str] = []
    objects = gc.get_objects()
    loops = [o for o in objects if isinstance(o, asyncio.AbstractEventLoop) and not o.is_closed()]
    for loop in loops:
        for task in asyncio.all_tasks(loop):
            if not task.done():
                parts.append(f"{task!r}"[:300])
                parts.extend(await_chain(task.get_coro()))
    for gen in objects:
        if inspect.isasyncgen(gen) and gen.ag_running and gen.ag_await is not None:
            parts.append(f"async generator {gen.ag_code.co_qualname}")
            parts.extend(await_chain(gen))
    return "\n".join(parts) or "no asyncio task or async generator is waiting"


def _with_waiting(dump_stacks: Callable[[Any], None]) -> Callable[[Any], None]:
    def dump_stacks_and_waiting(terminal: Any) -> None:
        dump_stacks(terminal)
        terminal.sep("~", title="asyncio: what was waiting at the timeout")
        terminal.write(waiting_report() + "\n")

    dump_stacks_and_waiting.extended = True  # type: ignore[attr-defined]
    return dump_stacks_and_waiting


def pytest_configure(config: pytest.Config) -> None:
    # pytest-timeout looks its dump_stacks up by name when a test times out.
    if not getattr(pytest_timeout.dump_stacks, "extended", False):
        pytest_timeout.dump_stacks = _with_waiting(pytest_timeout.dump_stacks)
