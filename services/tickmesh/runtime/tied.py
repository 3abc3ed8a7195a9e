"""Child processes that end with this process, however it ends.

A server this process starts for itself (the embedded nats-server) must not outlive it:
``stop()`` covers a normal exit, but a process killed with SIGKILL, or one that crashes,
runs no code on the way out, and the child would keep running, holding its ports, memory
and files, until someone finds it. On Linux the kernel can signal the child instead: the
child asks, between fork and exec, for SIGTERM when its parent dies
(``prctl(PR_SET_PDEATHSIG)``).

The kernel sends that signal when the *thread* that forked the child ends, not the
process. So every tied child is forked by one thread that lives as long as the process:
one forked from a short-lived thread (``asyncio.to_thread``, a thread pool that shrinks)
would otherwise be terminated with that thread. Elsewhere than Linux a tied child is a
plain child.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGTERM
"""What the child gets when this process dies: a server shuts down cleanly on it."""


def spawn_tied(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen)``, with the child sent SIGTERM when this process
    dies (Linux; a plain ``Popen`` elsewhere)."""
    prctl = _prctl()
    if prctl is None:
        return subprocess.Popen(argv, **popen)
    return _spawner().spawn(lambda: subprocess.Popen(argv, preexec_fn=_tie(prctl), **popen))


def _tie(prctl: Callable[..., int]) -> Callable[[], None]:
    parent = os.getpid()

    def tie() -> None:  # runs in the child, between fork and exec: nothing that may lock
        prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request: too late for it
            os.kill(os.getpid(), DEATH_SIGNAL)

    return tie


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return function


class _Spawner:
    """The thread that forks every tied child, for the life of the process."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="tickmesh-spawner", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self._jobs.get()()

    def spawn(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        if threading.current_thread() is self.thread:  # pragma: no cover - not nested
            return start()
        done: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()

        def job() -> None:
            try:
                done.set_result(start())
            except BaseException as exc:  # handed to the caller, raised there
                done.set_exception(exc)

        self._jobs.put(job)
        return done.result()


_SPAWNER: _Spawner | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner() -> _Spawner:
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or not _SPAWNER.thread.is_alive():
            _SPAWNER = _Spawner()
        return _SPAWNER
