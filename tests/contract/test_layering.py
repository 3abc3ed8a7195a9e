"""Dependencies point one way: tickmesh.v1 <- sdk <- runtime <- services (+ cli on top).

Services never import each other: they talk over NATS or gRPC.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"router", "guardrail", "state", "executor_pool"}

# Which tickmesh packages each layer may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "sdk": {"v1"},
    "runtime": {"v1", "sdk"},
    **{service: {"v1", "internal", "sdk", "runtime"} for service in SERVICES},
    # Layers above the services: they compose them (one process, or the command line).
    "embedded": {"v1", "internal", "sdk", "runtime", *SERVICES},
    # The console is a client of the router: it reaches services only through the SDK.
    "console": {"v1", "sdk"},
    "cli": {"v1", "internal", "sdk", "runtime", "embedded", "console", *SERVICES},
}
# Generated modules stay behind the SDK's conversion seam (STYLE R4).
SDK_MODULES_ALLOWED_TO_IMPORT_V1 = {
    "_convert.py",
    "_transport.py",
    "_graph.py",
    "_client.py",
    "testing.py",
}
SDK_FORBIDDEN_THIRD_PARTY = {"pydantic_settings"}


def python_files() -> Iterator[tuple[str, Path]]:
    for root in (ROOT / "sdk" / "tickmesh", ROOT / "services" / "tickmesh"):
        for path in sorted(root.rglob("*.py")):
            layer = path.relative_to(root).parts[0]
            yield layer, path


def imported_modules(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_every_layer_is_known() -> None:
    layers = {layer for layer, _ in python_files()}
    assert layers <= set(ALLOWED), f"unknown top-level packages: {layers - set(ALLOWED)}"


def test_imports_point_one_way() -> None:
    violations = []
    for layer, path in python_files():
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] != "tickmesh" or len(parts) < 2:
                continue
            target = parts[1]
            if target != layer and target not in ALLOWED[layer]:
                violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_sdk_keeps_generated_code_behind_its_seam() -> None:
    violations = []
    for layer, path in python_files():
        if layer != "sdk":
            continue
        for module in imported_modules(path):
            if (
                module.startswith("tickmesh.v1")
                and path.name not in SDK_MODULES_ALLOWED_TO_IMPORT_V1
            ):
                violations.append(f"{path.relative_to(ROOT)} imports {module}")
            if module.split(".")[0] in SDK_FORBIDDEN_THIRD_PARTY:
                violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not violations, "\n".join(violations)


def test_no_tickmesh_package_init_hides_the_namespace() -> None:
    for root in ("gen/python", "sdk", "services"):
        assert not (ROOT / root / "tickmesh" / "__init__.py").exists(), (
            f"{root}/tickmesh/__init__.py would hide the other roots of the tickmesh namespace"
        )


def test_environment_is_read_only_in_settings_modules() -> None:
    readers = []
    for _, path in python_files():
        if path.name in {"settings.py", "config.py"}:
            continue
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text:
            readers.append(str(path.relative_to(ROOT)))
    assert not readers, f"read the environment only in settings.py/config.py: {readers}"
