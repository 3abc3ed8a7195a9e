"""The conformance checker against both shipped executors: the Python Worker and the
TypeScript Worker (@tickmesh/sdk, compiled by ``npm run build -w @tickmesh/sdk``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TS_EXECUTOR = ROOT / "sdk/typescript/dist/sdk/typescript/examples/conformance.js"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _run_checker(*command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.conformance.check", "--", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"conformance checker failed:\n{report}"
    assert "FAIL" not in proc.stdout, report


def test_the_python_worker_passes_the_conformance_kit() -> None:
    _run_checker(sys.executable, "-m", "tests.conformance.executors.python_executor")


def test_the_typescript_worker_passes_the_conformance_kit() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not on PATH: the TypeScript executor needs Node.js >= 20", pytrace=False
        )
    if not TS_EXECUTOR.exists():
        pytest.fail(
            f"{TS_EXECUTOR.relative_to(ROOT)} is missing: build the TypeScript SDK first "
            "(npm ci && npm run build -w @tickmesh/sdk, or make test-node)",
            pytrace=False,
        )
    _run_checker(node, str(TS_EXECUTOR))
