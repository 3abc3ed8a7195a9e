"""`python -m tickmesh.router`: run the router service with settings from the environment
and tickmesh.yaml."""

from tickmesh.runtime.lifecycle import run_service

from .config import RouterSettings
from .server import serve

if __name__ == "__main__":
    raise SystemExit(run_service("router", RouterSettings, serve))
