"""What the benchmark ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from tickmesh.runtime.embedded_nats import nats_server_path

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
