"""`python -m tickmesh.guardrail`: run the guardrail service with settings from the environment."""

from tickmesh.runtime.lifecycle import run

from .config import GuardrailSettings
from .server import serve

if __name__ == "__main__":
    run(serve(GuardrailSettings()))
