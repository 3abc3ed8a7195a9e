"""Per-process CPU and RSS, sampled with psutil every 0.2 s in a background thread.

A monitored name is one process, or a :class:`ProcessTree` (a server and its children,
as PostgreSQL runs one backend process per connection)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

SAMPLE_S = 0.2


class ProcessTree:
    """A server process and its children, measured as one.

    CPU: the root's own time, the time of the children it has reaped (``children_user`` and
    ``children_system``: PostgreSQL's ended backends) and the time of the live children.
    Memory: the root's RSS plus each child's RSS minus its shared pages, so memory the
    processes share (PostgreSQL's shared buffers) is not counted once per process.
    """

    def __init__(self, root: psutil.Process) -> None:
        self.root = root

    @property
    def pid(self) -> int:
        return self.root.pid

    def _children(self) -> list[psutil.Process]:
        try:
            return self.root.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return []

    def cpu_seconds(self) -> float:
        try:
            t = self.root.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return float("nan")
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in self._children():
            try:
                c = child.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # ended meanwhile: the root's children_* times hold it once reaped
            total += float(c.user + c.system)
        return total

    def rss_bytes(self) -> int:
        total = 0
        for i, proc in enumerate([self.root, *self._children()]):
            try:
                mem = proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += int(mem.rss) if i == 0 else max(0, int(mem.rss) - int(mem.shared))
        return total


Monitored = psutil.Process | ProcessTree


def cpu_seconds(proc: Monitored) -> float:
    if isinstance(proc, ProcessTree):
        return proc.cpu_seconds()
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return float("nan")
    return float(t.user + t.system)


def rss_bytes(proc: Monitored) -> int:
    if isinstance(proc, ProcessTree):
        return proc.rss_bytes()
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass
class Window:
    """CPU at the start of a measured phase and the peak RSS seen since."""

    cpu_start: dict[str, float]
    busy_start: float = 0.0
    peak_rss: dict[str, int] = field(default_factory=dict)
    cpu_end: dict[str, float] = field(default_factory=dict)
    busy_end: float = 0.0

    def cpu_used(self) -> dict[str, float]:
        return {n: self.cpu_end.get(n, float("nan")) - c for n, c in self.cpu_start.items()}

    def foreign_cpu(self) -> float:
        """Busy CPU seconds of the machine not spent by the monitored processes (other load)."""
        return max(0.0, (self.busy_end - self.busy_start) - sum(self.cpu_used().values()))


class Monitor:
    """Samples the RSS of named processes; brackets phases with CPU readings."""

    def __init__(self, processes: Mapping[str, Monitored]) -> None:
        self._processes = dict(processes)
        self._lock = threading.Lock()
        self._window: Window | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def add(self, name: str, proc: Monitored) -> None:
        with self._lock:
            self._processes[name] = proc

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _sample(self) -> None:
        with self._lock:
            window = self._window
            if window is None:
                return
            for name, proc in self._processes.items():
                rss = rss_bytes(proc)
                if rss > window.peak_rss.get(name, 0):
                    window.peak_rss[name] = rss

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def begin(self) -> None:
        with self._lock:
            self._window = Window(
                {n: cpu_seconds(p) for n, p in self._processes.items()}, machine_busy_seconds()
            )
        self._sample()

    def end(self) -> Window:
        self._sample()
        with self._lock:
            window = self._window
            assert window is not None
            window.cpu_end = {n: cpu_seconds(p) for n, p in self._processes.items()}
            window.busy_end = machine_busy_seconds()
            self._window = None
        return window
