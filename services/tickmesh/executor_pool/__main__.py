"""``python -m tickmesh.executor_pool``: run the executor pool service."""

from __future__ import annotations

import asyncio

from .config import ExecutorPoolSettings
from .server import serve


def main() -> None:
    settings = ExecutorPoolSettings()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not available on Windows
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
