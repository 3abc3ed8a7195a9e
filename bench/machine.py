"""What the benchmark ran on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from tickmesh.runtime.embedded_nats import nats_server_path
from tickmesh.v1 import envelope_pb2

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=10, cwd=REPO
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _filesystem(path: Path) -> str:
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    return f"{best.fstype} on {best.device} ({best.mountpoint})" if best else "unknown"


def describe(data_dir: Path) -> dict[str, Any]:
    # TICKMESH_BENCH_COMMIT names the code measured when it is not a git checkout (an export).
    commit = os.environ.get("TICKMESH_BENCH_COMMIT") or _run(
        ["git", "rev-parse", "--short", "HEAD"]
    )
    dirty = not os.environ.get("TICKMESH_BENCH_COMMIT") and bool(
        _run(["git", "status", "--porcelain", "--untracked-files=no"])
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": _run([str(nats_server_path()), "--version"]),
        "tickmesh_commit": commit + ("-dirty" if dirty else ""),
        "data_dir_filesystem": _filesystem(data_dir),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def speed_probe(ops: int = 2000, runs: int = 5) -> float:
    """Microseconds of CPU one fixed piece of step-like work takes on this machine now (the
    median of ``runs`` runs of ``ops``): an envelope built, serialized, hashed and parsed.

    A shared machine's speed can move by a quarter within an hour, with no other load
    visible from inside it. Taken before each phase, this says how fast the machine ran
    code then, so runs can be compared. It counts this thread's CPU time, not wall time,
    so the machine's own other work (a mesh still settling) hardly moves it (by 2% with both
    cores busy)."""
    samples = []
    for _ in range(runs):
        start = time.thread_time()
        for i in range(ops):
            envelope = envelope_pb2.ExecutionEnvelope()
            header = envelope.header
            header.tenant_id = "probe"
            header.lifetime_id = f"019a0000-0000-7000-8000-{i:012d}"
            header.execution_id = hashlib.sha256(header.lifetime_id.encode()).hexdigest()[:32]
            header.node.id = "noop"
            header.labels["probe"] = "1"
            envelope.task_request.input.inline = b"null"
            data = envelope.SerializeToString(deterministic=True)
            envelope_pb2.ExecutionEnvelope.FromString(data)
        samples.append((time.thread_time() - start) / ops * 1e6)
    return statistics.median(samples)
