"""`python -m tickmesh.executor_pool`: run the executor pool with settings from the
environment and tickmesh.yaml."""

from tickmesh.runtime.lifecycle import run_service

from .config import ExecutorPoolSettings
from .server import serve

if __name__ == "__main__":
    raise SystemExit(run_service("executor-pool", ExecutorPoolSettings, serve))
