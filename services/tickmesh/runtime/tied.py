"""Child processes that end with this process, however it ends.

A server this process starts for itself (the embedded nats-server) must not outlive it:
``stop()`` covers a normal exit, but a process killed with SIGKILL, or one that crashes,
runs no code on the way out, and the child would keep running, holding its ports, memory
and files, until someone finds it. On Linux the kernel can signal the child instead: the
child asks for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), which holds
across ``exec``.

The request is made by a fresh interpreter that then ``exec``s the program (``_TIE``),
not in ``preexec_fn``: running Python between fork and exec in a process with other
threads (gRPC's, the event loop's executors) can crash the child (seen: SIGSEGV while
another thread was calling into gRPC), which the fresh interpreter, with one thread of
its own, cannot. And the kernel sends the signal when the *thread* that forked the child
ends, not the process: so every tied child is forked by one thread that lives as long as
the process (one forked from a short-lived thread, ``asyncio.to_thread``, a thread pool
that shrinks, would be terminated with that thread). Elsewhere than Linux a tied child is
a plain child.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

DEATH_SIGNAL = signal.SIGTERM
"""What the child gets when this process dies: a server shuts down cleanly on it."""

_TIE = """
import ctypes, os, sys
parent, signum, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.exit("tied: prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != parent:  # the parent died before the request: too late for it
    sys.exit(1)
os.execv(argv[0], argv)
"""
"""Run by a fresh interpreter: ask for the death signal, then become the program."""


def spawn_tied(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen)``, with the child sent SIGTERM when this process
    dies (Linux; a plain ``Popen`` elsewhere). The child's pid is the program's."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(argv, **popen)
    if not os.path.exists(argv[0]):  # as Popen says it, rather than from the interpreter
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    wrapped = [sys.executable, "-I", "-S", "-c", _TIE, str(os.getpid()), str(int(DEATH_SIGNAL))]
    return _spawner().spawn(lambda: subprocess.Popen([*wrapped, *argv], **popen))


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
