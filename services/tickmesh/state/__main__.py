"""`python -m tickmesh.state`: run the state service with settings from the environment
and tickmesh.yaml."""

from tickmesh.runtime.lifecycle import run_service

from .config import StateSettings
from .server import serve

if __name__ == "__main__":
    raise SystemExit(run_service("state", StateSettings, serve))
