"""`python -m tickmesh.router`: run the router with settings from the environment."""

from tickmesh.runtime.lifecycle import run

from .config import RouterSettings
from .server import serve

if __name__ == "__main__":
    run(serve(RouterSettings()))
