"""`python -m tickmesh.guardrail`: run the guardrail service with settings from the environment
and tickmesh.yaml."""

from tickmesh.runtime.lifecycle import run_service

from .config import GuardrailSettings
from .server import serve

if __name__ == "__main__":
    raise SystemExit(run_service("guardrail", GuardrailSettings, serve))
