"""The tenant registry: which tenants exist, their JetStream limits and their users' keys.

Kept as ``tenants.json`` in the tenant directory, next to the rendered
``accounts.conf`` and the NKey seeds (``creds/<tenant>/<user>.nk``, mode 0600; the
system account's admin seed is ``creds/_system/admin.nk``). The registry holds public
keys only, so it and the rendered config can be kept in version control; the seeds
must not be. Writers hold ``.lock`` (an advisory ``flock``) and replace files
atomically, so concurrent commands cannot lose each other's changes.

A tenant with a key rotation pending also has ``previous`` (role -> the replaced key
and when it was replaced); the field is written only then, so a registry without a
pending rotation reads and writes exactly as before rotations existed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tickmesh.sdk import ConfigError, ValidationError

from ..streams import stream_configs
from ..subjects import TenantNames, check_tenant

REGISTRY_VERSION: Final = 1
REGISTRY_FILE: Final = "tenants.json"
ACCOUNTS_FILE: Final = "accounts.conf"
CREDS_DIR: Final = "creds"
SYSTEM_CREDS_DIR: Final = "_system"
"""Not a tenant id (those start with a letter or digit), so it never collides with one."""
LOCK_FILE: Final = ".lock"

SYSTEM_ACCOUNT: Final = "SYS"
SYSTEM_USER: Final = "admin"
SERVICE: Final = "service"
EXECUTOR: Final = "executor"
ROLES: Final = (SERVICE, EXECUTOR)

KV_STREAM_PREFIX: Final = "KV_"
"""JetStream keeps a KV bucket in the stream ``KV_<bucket>``."""


def tenant_streams(names: TenantNames) -> tuple[str, ...]:
    """Every stream a tenant's services create: the five bus streams, then the two KV
    buckets' streams (the same list :func:`tickmesh.runtime.streams.ensure_tenant` makes)."""
    streams = [config.name for config in stream_configs(names) if config.name]
    buckets = (names.router_bucket, names.policy_bucket)
    return (*streams, *(KV_STREAM_PREFIX + bucket for bucket in buckets))


MIN_STREAMS: Final = len(tenant_streams(TenantNames("x")))
"""A tenant's account must hold at least its own streams and buckets."""
MIN_CONSUMERS: Final = 8
"""The state service's two durables, the router's two (records and refs), a work consumer
per handler (two for a graph of one task and one plan) and the watchers of policies and of
one lifetime: fewer than this cannot run one graph."""

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(I?B?)", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``1073741824``, ``64MB``, ``64MiB``, ``1G``, ``10GB``...

    Units are binary, as in nats-server's configuration (``1GB`` is 1024³ bytes).

    Raises:
        ValidationError: Not a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValidationError(f"invalid size {text!r}: expected bytes or a number with K/M/G/T")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """``1073741824`` -> ``1GiB``; sizes that are not a whole unit stay in bytes."""
    for unit in ("T", "G", "M", "K"):
        scale = _UNITS[unit]
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}iB"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant account's JetStream limits.

    The server reserves ``max_memory`` and ``max_storage`` for the account when it
    enables JetStream, so the sum over all accounts must fit the server's
    ``max_memory_store`` and ``max_file_store``.
    """

    max_memory: int = 16 << 20
    """Bytes of memory-backed streams (tickmesh's own streams are on disk)."""
    max_storage: int = 1 << 30
    """Bytes of file-backed streams: every message the tenant's streams hold."""
    max_streams: int = 16
    max_consumers: int = 1000

    def __post_init__(self) -> None:
        problems = []
        if self.max_memory <= 0:
            problems.append("max_memory must be positive")
        if self.max_storage < 1 << 20:
            problems.append("max_storage must be at least 1MiB")
        if self.max_streams < MIN_STREAMS:
            problems.append(
                f"max_streams must be at least {MIN_STREAMS} (the tenant's own streams and buckets)"
            )
        if self.max_consumers < MIN_CONSUMERS:
            problems.append(f"max_consumers must be at least {MIN_CONSUMERS}")
        if problems:
            raise ValidationError("invalid limits: " + "; ".join(problems))

    def to_json(self) -> dict[str, int]:
        return {
            "max_memory": self.max_memory,
            "max_storage": self.max_storage,
            "max_streams": self.max_streams,
            "max_consumers": self.max_consumers,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        unknown = set(data) - {"max_memory", "max_storage", "max_streams", "max_consumers"}
        if unknown:
            raise ValidationError(f"unknown limits {sorted(unknown)}")
        return cls(**{key: _int(value, key) for key, value in data.items()})


@dataclass(frozen=True, slots=True)
class PreviousKey:
    """A user's key replaced by a rotation that is not finished yet: it stays authorised
    (with the same permissions as the new key) until ``tickmesh tenant rotate --finish``."""

    nkey: str
    """The replaced public NKey (``U...``)."""
    since: str = ""
    """When the rotation started (ISO-8601, UTC)."""

    def __post_init__(self) -> None:
        _check_public_key(self.nkey)

    def to_json(self) -> dict[str, str]:
        return {"nkey": self.nkey, "since": self.since}

    @classmethod
    def from_json(cls, data: Any) -> PreviousKey:
        if not isinstance(data, Mapping) or set(data) - {"nkey", "since"}:
            raise ValidationError(
                f"a previous key is {{'nkey': 'U...', 'since': ...}}, not {data!r}"
            )
        return cls(nkey=str(data.get("nkey", "")), since=str(data.get("since", "")))


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant: its account's limits and its users' public NKeys."""

    id: str
    limits: Limits
    users: Mapping[str, str]
    """Role (``service``, ``executor``) -> public NKey (``U...``)."""
    created: str = ""
    """When the tenant was created (ISO-8601, UTC)."""
    disabled: bool = False
    """A disabled tenant keeps its account and data, but no user of it may connect."""
    previous: Mapping[str, PreviousKey] = field(default_factory=dict)
    """Role -> the key a pending rotation replaced (empty: no rotation pending). Each is
    rendered as a second user of that role, so connections made with the old seed keep
    working until the rotation is finished."""

    def __post_init__(self) -> None:
        check_tenant(self.id)
        if set(self.users) != set(ROLES):
            raise ValidationError(f"tenant {self.id!r} must have exactly the users {ROLES}")
        for key in self.users.values():
            _check_public_key(key)
        unknown = set(self.previous) - set(ROLES)
        if unknown:
            raise ValidationError(
                f"tenant {self.id!r}: previous keys of unknown roles {sorted(unknown)}"
            )
        for role, previous in self.previous.items():
            if previous.nkey in self.users.values():
                raise ValidationError(
                    f"tenant {self.id!r}: the previous {role} key is a current key"
                )

    @property
    def rotating(self) -> tuple[str, ...]:
        """The roles whose rotation is pending (in :data:`ROLES` order)."""
        return tuple(role for role in ROLES if role in self.previous)

    def rotated(self, role: str, new_key: str, since: str) -> Tenant:
        """This tenant with ``role``'s key replaced by ``new_key``, the old one kept as
        its previous key.

        Raises:
            ConfigError: A rotation of ``role`` is pending already.
        """
        if role in self.previous:
            raise ConfigError(
                f"tenant {self.id!r}: a rotation of the {role} key is pending since "
                f"{self.previous[role].since or 'an unknown time'}; finish it first "
                f"(`tickmesh tenant rotate --finish {self.id} --role {role}`)"
            )
        return replace(
            self,
            users={**self.users, role: new_key},
            previous={**self.previous, role: PreviousKey(self.users[role], since)},
        )

    def finished(self, roles: tuple[str, ...]) -> Tenant:
        """This tenant without the previous keys of ``roles``."""
        return replace(self, previous={r: k for r, k in self.previous.items() if r not in roles})

    @property
    def names(self) -> TenantNames:
        return TenantNames(self.id)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "created": self.created,
            "disabled": self.disabled,
            "limits": self.limits.to_json(),
            "users": {role: self.users[role] for role in ROLES},
        }
        # Only while a rotation is pending: a registry without one is written exactly as
        # before rotations existed.
        if self.previous:
            data["previous"] = {role: self.previous[role].to_json() for role in self.rotating}
        return data

    @classmethod
    def from_json(cls, tenant: str, data: Any) -> Tenant:
        if not isinstance(data, Mapping):
            raise ValidationError(f"tenant {tenant!r} must be a JSON object, not {data!r}")
        previous = data.get("previous") or {}
        if not isinstance(previous, Mapping):
            raise ValidationError(f"tenant {tenant!r}: previous must map roles to keys")
        limits = data.get("limits", {})
        if not isinstance(limits, Mapping):
            raise ValidationError(f"tenant {tenant!r}: limits must be a JSON object")
        users = data.get("users", {})
        if not isinstance(users, Mapping):
            raise ValidationError(f"tenant {tenant!r}: users must map roles to public keys")
        disabled = data.get("disabled", False)
        # bool("false") is True: a quoted value would silently lock the tenant out.
        if not isinstance(disabled, bool):
            raise ValidationError(
                f"tenant {tenant!r}: disabled must be true or false, not {disabled!r}"
            )
        return cls(
            id=tenant,
            limits=Limits.from_json(limits),
            users=dict(users),
            created=str(data.get("created", "")),
            disabled=disabled,
            previous={role: PreviousKey.from_json(key) for role, key in previous.items()},
        )


@dataclass(frozen=True, slots=True)
class Registry:
    """Every tenant, and the system account's admin key. Immutable: changes return a copy."""

    system_key: str
    """Public NKey of the system account's admin user."""
    tenants: Mapping[str, Tenant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_public_key(self.system_key)

    def get(self, tenant: str) -> Tenant:
        """Raises: ConfigError: No such tenant."""
        check_tenant(tenant)
        try:
            return self.tenants[tenant]
        except KeyError:
            raise ConfigError(f"no tenant {tenant!r} in the registry") from None

    def with_tenant(self, tenant: Tenant) -> Registry:
        return replace(self, tenants={**self.tenants, tenant.id: tenant})

    def without(self, tenant: str) -> Registry:
        return replace(self, tenants={k: v for k, v in self.tenants.items() if k != tenant})

    def reserved(self) -> tuple[int, int]:
        """Memory and storage the server reserves for all tenant accounts (disabled ones too)."""
        memory = sum(t.limits.max_memory for t in self.tenants.values())
        storage = sum(t.limits.max_storage for t in self.tenants.values())
        return memory, storage

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REGISTRY_VERSION,
            "system": {"account": SYSTEM_ACCOUNT, "users": {SYSTEM_USER: self.system_key}},
            "tenants": {tid: self.tenants[tid].to_json() for tid in sorted(self.tenants)},
        }

    @classmethod
    def from_json(cls, data: Any) -> Registry:
        if not isinstance(data, Mapping):
            raise ValidationError("the registry must be a JSON object")
        if data.get("version") != REGISTRY_VERSION:
            raise ConfigError(
                f"unsupported tenant registry version {data.get('version')!r} "
                f"(this tickmesh reads version {REGISTRY_VERSION})"
            )
        try:
            system_key = data["system"]["users"][SYSTEM_USER]
        except (KeyError, TypeError):
            raise ConfigError("the tenant registry has no system admin user") from None
        listed = data.get("tenants", {})
        if not isinstance(listed, Mapping):
            raise ValidationError("tenants must map tenant ids to tenants")
        tenants = {tid: Tenant.from_json(tid, t) for tid, t in listed.items()}
        return cls(system_key=system_key, tenants=tenants)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, got {value!r}")
    return value


def _check_public_key(key: object) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"U[A-Z2-7]{55}", key):
        raise ValidationError(f"not a public user NKey: {key!r}")


def new_user_key() -> tuple[str, str]:
    """A fresh user NKey pair: (seed ``SU...``, public key ``U...``).

    Raises:
        ConfigError: The nkeys package is not installed.
    """
    try:
        import nkeys  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ConfigError(
            "tenant users authenticate with NKeys: install the nkeys package "
            "(pip install 'tickmesh[cloud]')"
        ) from exc
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    pair = nkeys.from_seed(bytearray(seed))
    public: bytes = pair.public_key
    return seed.decode(), public.decode()


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TenantDirectory:
    """The files of one tenant directory."""

    path: Path

    @property
    def registry_path(self) -> Path:
        return self.path / REGISTRY_FILE

    @property
    def accounts_path(self) -> Path:
        return self.path / ACCOUNTS_FILE

    def seed_path(self, tenant: str, role: str) -> Path:
        check_tenant(tenant)
        if role not in ROLES:
            raise ValidationError(f"unknown user role {role!r}: expected one of {ROLES}")
        return self.path / CREDS_DIR / tenant / f"{role}.nk"

    @property
    def system_seed_path(self) -> Path:
        return self.path / CREDS_DIR / SYSTEM_CREDS_DIR / f"{SYSTEM_USER}.nk"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (blocks while another command holds it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / LOCK_FILE).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return self.registry_path.is_file()

    def load(self) -> Registry:
        """Raises: ConfigError: There is no registry here, or it cannot be read."""
        if not self.exists():
            raise ConfigError(
                f"no tenant registry at {self.registry_path} "
                "(`tickmesh tenant create` or `tickmesh tenant render` makes one)"
            )
        try:
            data = json.loads(self.registry_path.read_text())
            return Registry.from_json(data)
        except (OSError, json.JSONDecodeError, ValidationError) as exc:
            raise ConfigError(
                f"cannot read the tenant registry {self.registry_path}: {exc}"
            ) from exc

    def load_or_init(self) -> Registry:
        """The registry, or a new empty one with a fresh system admin key (seed written)."""
        if self.exists():
            return self.load()
        seed, public = new_user_key()
        self._write_seed(self.system_seed_path, seed)
        return Registry(system_key=public)

    def save(self, registry: Registry) -> None:
        write_atomic(self.registry_path, json.dumps(registry.to_json(), indent=2) + "\n")

    def new_user(self, tenant: str, role: str) -> str:
        """Generate the NKey of a tenant's user; write its seed; return the public key."""
        seed, public = new_user_key()
        self._write_seed(self.seed_path(tenant, role), seed)
        return public

    def staged_seed_path(self, tenant: str, role: str) -> Path:
        """Where a rotation keeps a new seed until the registry naming its key is saved."""
        path = self.seed_path(tenant, role)
        return path.with_name(f".{path.name}.new")

    def stage_user(self, tenant: str, role: str) -> str:
        """Generate a new NKey for a tenant's user and write its seed next to the current
        one (:meth:`staged_seed_path`), which is left as it is; return the public key.
        :meth:`install_staged` puts it in place, :meth:`discard_staged` drops it."""
        seed, public = new_user_key()
        self._write_seed(self.staged_seed_path(tenant, role), seed)
        return public

    def install_staged(self, tenant: str, role: str) -> None:
        """Replace the user's seed with the staged one, in one step."""
        os.replace(self.staged_seed_path(tenant, role), self.seed_path(tenant, role))

    def discard_staged(self, tenant: str, role: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.staged_seed_path(tenant, role).unlink()

    def _write_seed(self, path: Path, seed: str) -> None:
        creds = self.path / CREDS_DIR
        creds.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(creds, 0o700)
        write_private(path, seed + "\n")

    def remove_seeds(self, tenant: str) -> None:
        check_tenant(tenant)
        shutil.rmtree(self.path / CREDS_DIR / tenant, ignore_errors=True)


def write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` in one step (a reader sees the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_private(path: Path, text: str) -> None:
    """Write a secret: the file is 0600 and its directory 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    write_atomic(path, text, mode=0o600)
