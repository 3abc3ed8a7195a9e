"""`python -m tickmesh.state`: run the state service with settings from the environment."""

from tickmesh.runtime.lifecycle import run

from .config import StateSettings
from .server import serve

if __name__ == "__main__":
    run(serve(StateSettings()))
