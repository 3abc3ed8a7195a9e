"""``tickmesh config show`` and ``tickmesh migrate``.

``config show`` prints every service's effective settings (defaults, then
``tickmesh.yaml``, then the environment), with secrets masked, so an operator
sees exactly what a service will run with. ``migrate`` brings the state store's
schema up to date (the state service also does it on start unless told not to).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any, Final, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import ValidationError as SettingsError

from tickmesh.executor_pool.config import ExecutorPoolSettings
from tickmesh.guardrail.config import GuardrailSettings
from tickmesh.router.config import RouterSettings
from tickmesh.runtime import config_file
from tickmesh.runtime.settings import ServiceSettings
from tickmesh.sdk.errors import ConfigError
from tickmesh.state.config import StateSettings

SETTINGS: Final[dict[str, type[ServiceSettings]]] = {
    "router": RouterSettings,
    "guardrail": GuardrailSettings,
    "state": StateSettings,
    "executor-pool": ExecutorPoolSettings,
}
MASK: Final = "***"
_SECRET_WORDS: Final = ("password", "secret", "token", "seed", "credential")
_URL_FIELDS_SUFFIX: Final = "_url"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = sub.add_parser("config", help="show the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print every service's settings, secrets masked")
    show.add_argument("--service", choices=sorted(SETTINGS), help="only this service")
    sub.add_parser("migrate", help="apply the state store's pending schema migrations")


def load_settings(service: str) -> ServiceSettings:
    """A service's settings from the environment and the config file.

    Raises:
        ConfigError: a value is invalid (the message names the setting).
    """
    settings_cls = SETTINGS[service]
    try:
        return settings_cls()
    except SettingsError as exc:
        problems = "; ".join(
            f"{_where(settings_cls, error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"invalid {service} settings: {problems}") from None


def _where(settings_cls: type[ServiceSettings], loc: tuple[int | str, ...]) -> str:
    """The setting at ``loc`` and where its value comes from: the environment variable,
    else the config file's line (the environment wins over the file)."""
    name = ".".join(str(p) for p in loc)
    field = str(loc[0]) if loc else ""
    variable = f"{settings_cls.model_config.get('env_prefix', '')}{field}".upper()
    if any(key.upper() == variable for key in os.environ):
        return f"{variable} ({name})"
    try:
        path = config_file.config_path(os.environ.get(config_file.CONFIG_ENV))
        entry = (
            None
            if path is None
            else config_file.load(path).entry_for(settings_cls.config_section, field)
        )
    except ConfigError:
        entry = None
    if entry is None:
        return name
    return f"{path}:{entry.line} ({entry.path})"


def masked(settings: ServiceSettings) -> dict[str, Any]:
    """The settings as plain data, with passwords, tokens and URL credentials masked."""
    shown: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None and any(word in name for word in _SECRET_WORDS):
            shown[name] = MASK
        elif isinstance(value, str) and name.endswith(_URL_FIELDS_SUFFIX):
            shown[name] = ",".join(mask_url(part) for part in value.split(","))
        else:
            shown[name] = value
    return shown


def mask_url(url: str) -> str:
    """``url`` with the password of its userinfo and any secret query value masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = [
            (key, MASK if any(word in key.lower() for word in (*_SECRET_WORDS, "key")) else value)
            for key, value in parse_qsl(query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def cmd_config_show(args: argparse.Namespace, out: TextIO) -> int:
    services = [args.service] if args.service else list(SETTINGS)
    document = {service: masked(load_settings(service)) for service in services}
    out.write(yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    return 0


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings("state")
    assert isinstance(settings, StateSettings)
    before, after = asyncio.run(_migrate(settings.store_url))
    where = mask_url(settings.store_url)
    if before == after:
        print(f"{where}: schema is up to date (version {after})", file=out)
    else:
        print(f"{where}: migrated the schema from version {before} to {after}", file=out)
    return 0


async def _migrate(url: str) -> tuple[int, int]:
    if url.startswith(("postgresql://", "postgres://")):
        from tickmesh.state.postgres import migrate

        return await migrate(url)
    from tickmesh.state.store import migrate_sqlite

    return await migrate_sqlite(url.removeprefix("sqlite:///"))
