"""One ``tickmesh.yaml`` configures every service.

The file is optional. Its top level holds values every service shares (``nats``,
``tenants``, ``log``, ...) and one section per service (``router``, ``guardrail``,
``state``, ``executor_pool``) whose values override the shared ones for that
service. Nested mappings flatten into field names with ``_``::

    nats:
      url: nats://n1:4222,nats://n2:4222
      tls: {ca: /etc/tickmesh/ca.pem}        # -> nats_tls_ca
    tenants: [acme, globex]
    log: {level: INFO, json: true}           # -> log_level, log_json
    state:
      store_url: postgresql://tickmesh@db/tickmesh
      blob_url: s3://tickmesh-blobs/prod?region=eu-west-1

Where the file is: ``$TICKMESH_CONFIG`` (which must exist), else ``./tickmesh.yaml``
when present. Environment variables (``TICKMESH_<SERVICE>_<FIELD>``) win over the
file, and the file wins over defaults. A key no service knows is an error naming
its line, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from tickmesh.sdk.errors import ConfigError

CONFIG_ENV: Final = "TICKMESH_CONFIG"
DEFAULT_CONFIG_FILE: Final = Path("tickmesh.yaml")
SERVICE_SECTIONS: Final = ("router", "guardrail", "state", "executor_pool")


@dataclass(frozen=True, slots=True)
class Entry:
    """One flattened value of the file and where it was written."""

    field: str
    value: Any
    line: int
    path: str
    """The key as written, dotted (``state.nats.url``), for messages."""


@dataclass(frozen=True, slots=True)
class ConfigDocument:
    """A parsed config file: shared entries and one list of entries per service section."""

    path: Path
    shared: tuple[Entry, ...]
    sections: dict[str, tuple[Entry, ...]]

    def entry_for(self, section: str, field: str) -> Entry | None:
        """Where the value a service sees for ``field`` is written: its section's entry,
        else the shared one; None when the file does not set it."""
        for entry in (*self.sections.get(section, ()), *self.shared):
            if entry.field == field:
                return entry
        return None

    def values_for(self, section: str) -> dict[str, Any]:
        """The flattened values a service sees: shared ones, overridden by its section's."""
        values = {e.field: e.value for e in self.shared}
        values.update({e.field: e.value for e in self.sections.get(section, ())})
        return values


def config_path(named: str | None) -> Path | None:
    """The config file in effect: ``named`` (the value of ``$TICKMESH_CONFIG``) when
    set, else ``./tickmesh.yaml`` when it exists, else None."""
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={named}: no such file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load(path: Path) -> ConfigDocument:
    """Parse ``path`` into shared and per-service entries.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is not a mapping of
            mappings and values; the message names the file and line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if root is None:
        return ConfigDocument(path, (), {})
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: the config must be a mapping")
    shared: list[Entry] = []
    sections: dict[str, tuple[Entry, ...]] = {}
    section_lines: dict[str, int] = {}
    for key_node, value_node in root.value:
        key = _key(path, key_node)
        if key in SERVICE_SECTIONS:
            line = key_node.start_mark.line + 1
            if key in section_lines:
                raise ConfigError(
                    f"{path}:{line}: {key!r} is set twice (first at line {section_lines[key]})"
                )
            section_lines[key] = line
            if not isinstance(value_node, yaml.MappingNode):
                raise ConfigError(
                    f"{path}:{value_node.start_mark.line + 1}: {key} must be a mapping of settings"
                )
            sections[key] = _unique(path, _flatten(path, value_node, prefix=(), dotted=key))
        else:
            shared.extend(_flatten(path, value_node, prefix=(key,), dotted=key, at=key_node))
    return ConfigDocument(path, _unique(path, shared), sections)


def _unique(path: Path, entries: list[Entry]) -> tuple[Entry, ...]:
    """``entries``, refused if two set the same field: YAML keeps the last of a repeated
    key, and ``nats: {url: ...}`` and ``nats_url`` are one setting, so one value would
    silently win."""
    seen: dict[str, Entry] = {}
    for entry in entries:
        first = seen.setdefault(entry.field, entry)
        if first is not entry:
            written = f" as {first.path!r}" if first.path != entry.path else ""
            raise ConfigError(
                f"{path}:{entry.line}: {entry.path!r} is set twice "
                f"(first at line {first.line}{written})"
            )
    return tuple(entries)


def check_fields(
    document: ConfigDocument, section: str, fields: set[str], shared: set[str]
) -> None:
    """Refuse a key that is not a setting, naming its line.

    Args:
        section: the service section being read.
        fields: that service's settings fields (allowed in its section).
        shared: the fields every service has (the only ones allowed at the top level,
            so a file is valid or not whichever service reads it).
    """
    unknown = [e for e in document.shared if e.field not in shared]
    unknown.extend(e for e in document.sections.get(section, ()) if e.field not in fields)
    if unknown:
        first = unknown[0]
        where = "shared by every service" if first in document.shared else f"of {section}"
        raise ConfigError(
            f"{document.path}:{first.line}: {first.path!r} is not a setting {where}"
            + (f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else "")
        )


def _key(path: Path, node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode) or not isinstance(node.value, str) or not node.value:
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: setting names must be strings")
    return str(node.value)


def _flatten(
    path: Path,
    node: yaml.Node,
    *,
    prefix: tuple[str, ...],
    dotted: str,
    at: yaml.Node | None = None,
) -> list[Entry]:
    if isinstance(node, yaml.MappingNode):
        entries: list[Entry] = []
        for key_node, value_node in node.value:
            key = _key(path, key_node)
            entries.extend(
                _flatten(
                    path, value_node, prefix=(*prefix, key), dotted=f"{dotted}.{key}", at=key_node
                )
            )
        return entries
    value = yaml.safe_load(yaml.serialize(node))
    line = (at or node).start_mark.line + 1
    return [Entry("_".join(prefix), value, line, dotted)]
