"""The router's durable state, in the tenant's router KV bucket.

    graph.<id>.<version 8 digits>   AgentGraph (immutable)
    graph.<id>.latest               AgentGraph of the newest version (updated by CAS)
    lt.<lifetime id>                RouterLifetime (updated only by compare-and-set)
    req.<sha256 of client request>  the lifetime id a StartLifetime request created
                                    (a ForkLifetime request: of "fork:" + its id)
    wt.<lifetime id>                the lifetime waits (or lately waited) with a deadline:
                                    the index the wait timers rescan (see timers.py)

Every write of a lifetime is a compare-and-set against the revision it was read
at, so two router replicas never both decide from the same state: the loser
reloads and decides again. Lifetimes are cached per replica with their revision;
a failed CAS evicts the entry.

A finished lifetime is kept for ``finished_ttl_s`` after its last write, then the
bucket removes it (a per-message TTL: no delete marker is left), and with it the
start request that created it, so the bucket holds the lifetimes running and
lately finished rather than every lifetime ever run. Its record stays in the state
service.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tickmesh.internal.v1 import router_state_pb2 as rs
from tickmesh.runtime.kv import CasWriter, is_wrong_last_sequence, keys_matching
from tickmesh.runtime.subjects import TenantNames, check_token
from tickmesh.sdk import NotFoundError, ValidationError
from tickmesh.sdk._graph import GRAPH_ID_PATTERN
from tickmesh.v1 import graph_pb2, lifetime_pb2

logger = logging.getLogger(__name__)


class ConflictError(Exception):
    """Someone else wrote the lifetime since it was read."""


STATE_HEADROOM_BYTES = 16 << 10
"""What a state write leaves of the server's max_payload for its subject and headers."""
DEFAULT_MAX_STATE_BYTES = (1 << 20) - STATE_HEADROOM_BYTES
"""nats-server's default max_payload (1 MiB), less the headroom."""


class StateTooLargeError(ValidationError):
    """A lifetime's state would not fit in one NATS message: the write cannot succeed,
    however often it is tried."""

    def __init__(self, state: rs.RouterLifetime, size: int, limit: int) -> None:
        super().__init__(
            f"the lifetime's state would be {size:,} bytes, over the {limit:,} one NATS "
            f"message may carry here ({len(state.in_flight):,} executions in flight, "
            f"{sum(len(e.messages) for e in state.outbox):,} messages in its outbox)"
        )
        self.lifetime_id = state.lifetime.lifetime_id
        self.size = size
        self.limit = limit


_FINISHED = frozenset(
    {
        lifetime_pb2.LIFETIME_STATE_COMPLETED,
        lifetime_pb2.LIFETIME_STATE_FAILED,
        lifetime_pb2.LIFETIME_STATE_ABORTED,
    }
)
"""Lifetime states after which the router decides nothing (core.TERMINAL)."""


@dataclass
class Versioned:
    state: rs.RouterLifetime
    revision: int


@dataclass(frozen=True, slots=True)
class _Cached:
    """A lifetime as this replica last wrote or read it: the bytes the bucket holds at
    ``revision``. Each load parses its own copy, so no caller shares a state with the
    cache or with another caller (and the bytes are the write's own, made once)."""

    data: bytes
    revision: int


def lifetime_key(lifetime_id: str) -> str:
    """The lifetime's key; an id a key cannot hold (dots, wildcards, spaces: never one the
    router made) is a ValidationError naming it, not the bucket's InvalidKeyError."""
    return f"lt.{check_token(lifetime_id, 'lifetime id')}"


def wait_key(lifetime_id: str) -> str:
    return f"wt.{check_token(lifetime_id, 'lifetime id')}"


@dataclass(frozen=True, slots=True)
class WaitIndexEntry:
    """One entry of the index of waiting lifetimes, as read."""

    lifetime_id: str
    revision: int
    indexed_at: float
    """When it was written, in seconds since the epoch (0: unreadable)."""


def request_key(client_request_id: str) -> str:
    return "req." + hashlib.sha256(client_request_id.encode()).hexdigest()[:40]


FORK_CLAIM_PREFIX = "fork:"
"""What a fork's client_request_id is claimed under, apart from the start ids (which are
claimed as they are, so none may begin with it)."""


def claim_of(view: lifetime_pb2.AgentLifetime) -> str:
    """The request id ``view``'s creator claimed (see :meth:`RouterStore.claim_request`);
    empty when it was created without one."""
    if not view.client_request_id:
        return ""
    if view.HasField("fork_origin"):
        return FORK_CLAIM_PREFIX + view.client_request_id
    return view.client_request_id


class Updater(Protocol):
    """What writes a lifetime by compare-and-set (``KeyValue.update``'s shape)."""

    async def update(self, key: str, value: bytes, last: int) -> int: ...


class RouterStore:
    """One tenant's router bucket."""

    def __init__(
        self,
        kv: KeyValue,
        *,
        cache_size: int = 20_000,
        writer: Updater | None = None,
        finished_ttl_s: int = 0,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
    ) -> None:
        """``writer`` makes the lifetime writes of the step loop (default: ``kv``;
        services pass a :class:`~tickmesh.runtime.kv.CasWriter` on the bucket).
        ``finished_ttl_s`` (whole seconds; 0 keeps them for ever) is how long a finished
        lifetime and its start request stay in the bucket: it needs a ``CasWriter`` and
        a bucket that allows per-message TTLs. A state larger than ``max_state_bytes``
        is not sent: its write is a :class:`StateTooLargeError`.

        Raises:
            ValueError: ``finished_ttl_s`` without a ``CasWriter``.
        """
        if finished_ttl_s and not isinstance(writer, CasWriter):
            raise ValueError("finished_ttl_s needs a CasWriter (KeyValue.update sets no TTL)")
        self._kv = kv
        self._writer: Updater = writer if writer is not None else kv
        self._finished_ttl_s = finished_ttl_s
        self._max_state_bytes = max_state_bytes
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._graphs: dict[tuple[str, int], graph_pb2.AgentGraph] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, names: TenantNames) -> RouterStore:
        kv = await js.key_value(names.router_bucket)
        return cls(kv, writer=CasWriter(kv))

    # --- lifetimes -------------------------------------------------------
    async def load(self, lifetime_id: str, *, fresh: bool = False) -> Versioned | None:
        if not fresh:
            cached = self._cache.get(lifetime_id)
            if cached is not None:
                self._cache.move_to_end(lifetime_id)
                return Versioned(rs.RouterLifetime.FromString(cached.data), cached.revision)
        try:
            entry = await self._kv.get(lifetime_key(lifetime_id))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        state = rs.RouterLifetime.FromString(entry.value)
        self._remember(lifetime_id, state, entry.revision, entry.value)
        return Versioned(state, entry.revision)

    async def create(self, state: rs.RouterLifetime) -> int:
        lifetime_id = state.lifetime.lifetime_id
        data = self._fitting(state)
        ttl = self._ttl_of(state)
        try:
            if ttl:
                revision = await self._kv.create(lifetime_key(lifetime_id), data, msg_ttl=ttl)
            else:
                revision = await self._kv.create(lifetime_key(lifetime_id), data)
        except KeyWrongLastSequenceError as exc:
            raise ConflictError(lifetime_id) from exc
        self._remember(lifetime_id, state, revision, data)
        if ttl:
            await self._expire_claims([state])
        return revision

    async def update(self, state: rs.RouterLifetime, revision: int) -> int:
        lifetime_id = state.lifetime.lifetime_id
        data = self._fitting(state)
        key = lifetime_key(lifetime_id)
        ttl = self._ttl_of(state)
        try:
            if ttl:
                assert isinstance(self._writer, CasWriter)  # checked in __init__
                new_revision = await self._writer.update(key, data, last=revision, ttl_s=ttl)
            else:
                new_revision = await self._writer.update(key, data, last=revision)
        except KeyWrongLastSequenceError as exc:
            self._cache.pop(lifetime_id, None)
            raise ConflictError(lifetime_id) from exc
        except Exception:
            # Unanswered (e.g. the connection dropped): the write may have landed, so the
            # cached revision is no longer known to be the latest; the retry reads afresh.
            self._cache.pop(lifetime_id, None)
            raise
        self._remember(lifetime_id, state, new_revision, data)
        if ttl:
            await self._expire_claims([state])
        return new_revision

    async def update_many(
        self, writes: Sequence[tuple[rs.RouterLifetime, int]]
    ) -> list[int | Exception]:
        """:meth:`update` for lifetimes of different ids in one round of writes: for each,
        its new revision, a :class:`ConflictError`, or why it is not known to be written.
        Each write stands alone."""
        if not isinstance(self._writer, CasWriter):  # a writer of one key at a time
            results = await asyncio.gather(
                *(self.update(state, revision) for state, revision in writes),
                return_exceptions=True,
            )
            for result in results:
                if not isinstance(result, int | Exception):
                    raise result
            return cast(list[int | Exception], results)
        values = [state.SerializeToString() for state, _ in writes]
        limit = self._max_state_bytes
        too_large = {
            i: StateTooLargeError(state, len(data), limit)
            for i, ((state, _), data) in enumerate(zip(writes, values, strict=True))
            if len(data) > limit
        }
        if too_large:  # never sent; the others go on as one round
            kept = [i for i in range(len(writes)) if i not in too_large]
            # (RouterStore's own, not a subclass's: that one has done its part already)
            sent = await RouterStore.update_many(self, [writes[i] for i in kept]) if kept else []
            merged: dict[int, int | Exception] = dict(too_large)
            merged.update(zip(kept, sent, strict=True))
            return [merged[i] for i in range(len(writes))]
        ttls = [self._ttl_of(state) for state, _ in writes] if self._finished_ttl_s else None
        answers = await self._writer.update_many(
            [
                (lifetime_key(state.lifetime.lifetime_id), data, revision)
                for (state, revision), data in zip(writes, values, strict=True)
            ],
            ttl_s=ttls,
        )
        outcomes: list[int | Exception] = []
        finished: list[rs.RouterLifetime] = []
        for (state, _), data, answer in zip(writes, values, answers, strict=True):
            lifetime_id = state.lifetime.lifetime_id
            if isinstance(answer, int):
                self._remember(lifetime_id, state, answer, data)
                outcomes.append(answer)
                if ttls is not None and state.lifetime.state in _FINISHED:
                    finished.append(state)
                continue
            # Refused or unanswered: the cached revision is no longer known to be the
            # latest (see update).
            self._cache.pop(lifetime_id, None)
            if isinstance(answer, KeyWrongLastSequenceError):
                conflict = ConflictError(lifetime_id)
                conflict.__cause__ = answer
                outcomes.append(conflict)
            elif isinstance(answer, Exception):
                outcomes.append(answer)
            else:
                raise answer
        if finished:
            await self._expire_claims(finished)
        return outcomes

    def _fitting(self, state: rs.RouterLifetime) -> bytes:
        """``state`` serialized, if it fits in one write.

        Raises:
            StateTooLargeError: It does not.
        """
        data = state.SerializeToString()
        if len(data) > self._max_state_bytes:
            raise StateTooLargeError(state, len(data), self._max_state_bytes)
        return data

    def _ttl_of(self, state: rs.RouterLifetime) -> int:
        """The time to live of a write of ``state``: finished lifetimes expire."""
        return self._finished_ttl_s if state.lifetime.state in _FINISHED else 0

    async def _expire_claims(self, states: Sequence[rs.RouterLifetime]) -> None:
        """Write the start requests of these finished lifetimes again with their TTL, so
        a request is deduplicated for as long as its lifetime is kept, and not after.

        A request whose write fails is kept for ever: a later start with its id finds no
        lifetime in the bucket, and the router then answers from the state service's
        record (see ``RouterServicer.StartLifetime``) rather than starting it again.
        """
        claims = [
            (request_key(claim), state.lifetime.lifetime_id.encode())
            for state in states
            if (claim := claim_of(state.lifetime))
        ]
        if not claims:
            return
        assert isinstance(self._writer, CasWriter)  # checked in __init__
        try:
            outcomes = await self._writer.put_many(claims, ttl_s=self._finished_ttl_s)
        except Exception as exc:  # e.g. the connection is closed
            outcomes = [exc] * len(claims)
        for (_, lifetime_id), outcome in zip(claims, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                logger.warning(
                    "the start request of finished lifetime %s does not expire: %s",
                    lifetime_id.decode(),
                    outcome,
                )

    def is_cached(self, lifetime_id: str) -> bool:
        return lifetime_id in self._cache

    @property
    def cache_size(self) -> int:
        """Most lifetimes this replica holds in memory."""
        return self._cache_size

    @property
    def cached_lifetimes(self) -> int:
        """How many lifetimes this replica holds in memory."""
        return len(self._cache)

    def _remember(
        self, lifetime_id: str, state: rs.RouterLifetime, revision: int, data: bytes
    ) -> None:
        """Keep ``data`` (``state`` serialized, as written at ``revision``) for the next
        load of the lifetime."""
        if state.lifetime.state in _FINISHED:
            # Nothing decides on a finished lifetime again; keeping it would fill the cache
            # with lifetimes no one routes (a redelivered ref or a GetLifetime reads the KV).
            self._cache.pop(lifetime_id, None)
            return
        cached = self._cache.get(lifetime_id)
        if cached is not None and cached.revision > revision:
            # A read that began before this replica's own newer write (a rescan of every
            # lifetime, a GetLifetime) must not put the older state back: a ref decided on
            # it would find its step not in flight, change nothing, and be acked unapplied.
            return
        self._cache[lifetime_id] = _Cached(data, revision)
        self._cache.move_to_end(lifetime_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def forget(self, lifetime_id: str) -> None:
        self._cache.pop(lifetime_id, None)

    async def lifetime_ids(self) -> list[str]:
        return [k.removeprefix("lt.") for k in await keys_matching(self._kv, "lt.*")]

    # --- the index of waiting lifetimes ----------------------------------
    async def index_wait(self, lifetime_id: str) -> None:
        """Enter the lifetime in the index of waiting lifetimes (again: a new revision,
        written now). Called before a state that waits with a deadline is written, so
        every such lifetime has an entry."""
        await self._kv.put(wait_key(lifetime_id), repr(time.time()).encode())

    async def wait_index(self) -> list[WaitIndexEntry]:
        """Every entry of the index, each read at its latest revision."""
        entries: list[WaitIndexEntry] = []
        for key in await keys_matching(self._kv, "wt.*"):
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:  # removed meanwhile (a delete marker keeps the key)
                continue
            if entry.value is None or entry.revision is None:
                continue
            try:
                indexed_at = float(entry.value.decode())
            except (UnicodeDecodeError, ValueError):
                indexed_at = 0.0
            entries.append(WaitIndexEntry(key.removeprefix("wt."), entry.revision, indexed_at))
        return entries

    async def unindex_wait(self, entry: WaitIndexEntry) -> bool:
        """Remove ``entry`` from the index, unless it was written again since it was read
        (the lifetime entered another wait meanwhile): False then."""
        try:
            await self._kv.delete(wait_key(entry.lifetime_id), last=entry.revision)
        except APIError as exc:  # nats-py's delete passes JetStream's refusal on as is
            if is_wrong_last_sequence(exc):
                return False
            raise
        return True

    # --- start-request idempotency --------------------------------------
    async def claim_request(self, client_request_id: str, lifetime_id: str) -> str:
        """Bind a client request id to a lifetime id; return the id already bound, if any."""
        key = request_key(client_request_id)
        try:
            await self._kv.create(key, lifetime_id.encode())
            return lifetime_id
        except KeyWrongLastSequenceError:
            entry = await self._kv.get(key)
            assert entry.value is not None
            return entry.value.decode()

    # --- graphs ----------------------------------------------------------
    async def put_graph(self, graph: graph_pb2.AgentGraph) -> tuple[graph_pb2.AgentGraph, bool]:
        """Store ``graph`` (digest filled in) as its next version, unless it equals the newest.

        Raises:
            ValidationError: The graph does not fit in one NATS message.
        """
        size = graph.ByteSize() + 8  # its version, written in below
        if size > self._max_state_bytes:
            raise ValidationError(
                f"graph {graph.id!r} is {size:,} bytes, over the {self._max_state_bytes:,} one "
                f"NATS message may carry here ({len(graph.nodes):,} nodes, "
                f"{len(graph.edges):,} edges)"
            )
        for _ in range(10):
            latest = await self._latest_entry(graph.id)
            if latest is not None and latest[0].digest == graph.digest:
                return latest[0], False
            stored = graph_pb2.AgentGraph()
            stored.CopyFrom(graph)
            stored.version = (latest[0].version if latest else 0) + 1
            try:
                await self._kv.create(
                    _graph_key(graph.id, stored.version), stored.SerializeToString()
                )
            except KeyWrongLastSequenceError:
                continue  # a concurrent registration took this version number
            data = stored.SerializeToString()
            try:
                if latest is None:
                    await self._kv.create(_latest_key(graph.id), data)
                else:
                    await self._kv.update(_latest_key(graph.id), data, last=latest[1])
            except KeyWrongLastSequenceError:
                await self._repair_latest(graph.id)
            self._graphs[(graph.id, stored.version)] = stored
            return stored, True
        raise ConflictError(f"graph {graph.id}: too many concurrent registrations")

    async def _repair_latest(self, graph_id: str) -> None:
        # Another registration moved `latest`; keep whichever version is newer.
        for _ in range(10):
            latest = await self._latest_entry(graph_id)
            versions = await self._versions(graph_id)
            if latest is None or not versions or latest[0].version >= versions[-1]:
                return
            newest = await self.get_graph(graph_id, versions[-1])
            try:
                await self._kv.update(
                    _latest_key(graph_id), newest.SerializeToString(), last=latest[1]
                )
                return
            except KeyWrongLastSequenceError:
                continue

    async def _latest_entry(self, graph_id: str) -> tuple[graph_pb2.AgentGraph, int] | None:
        try:
            entry = await self._kv.get(_latest_key(graph_id))
        except KeyNotFoundError:
            return None
        assert entry.value is not None
        assert entry.revision is not None
        return graph_pb2.AgentGraph.FromString(entry.value), entry.revision

    async def _versions(self, graph_id: str) -> list[int]:
        keys = await keys_matching(self._kv, f"graph.{_token(graph_id)}.*")
        return sorted(int(k.rsplit(".", 1)[1]) for k in keys if k.rsplit(".", 1)[1].isdigit())

    async def get_graph(self, graph_id: str, version: int = 0) -> graph_pb2.AgentGraph:
        """Return one version (0 = newest). Versions are immutable, so they are cached.

        Raises:
            NotFoundError: No such graph or version.
        """
        if version:
            cached = self._graphs.get((graph_id, version))
            if cached is not None:
                return cached
            try:
                entry = await self._kv.get(_graph_key(graph_id, version))
            except KeyNotFoundError as exc:
                raise NotFoundError(f"graph {graph_id!r} has no version {version}") from exc
            assert entry.value is not None
            graph = graph_pb2.AgentGraph.FromString(entry.value)
            self._graphs[(graph_id, version)] = graph
            return graph
        latest = await self._latest_entry(graph_id)
        if latest is None:
            raise NotFoundError(f"no graph {graph_id!r}")
        return latest[0]

    async def graph_ids(self) -> list[str]:
        keys = await keys_matching(self._kv, "graph.*.latest")
        return sorted(k[len("graph.") : -len(".latest")].replace("=", ".") for k in keys)


def _token(graph_id: str) -> str:
    # Graph ids may contain dots; KV keys use dots as separators. An id no graph can have
    # (a registered graph's is checked against the same pattern) is refused by name.
    if not GRAPH_ID_PATTERN.fullmatch(graph_id):
        raise ValidationError(f"invalid graph id {graph_id!r}: expected {GRAPH_ID_PATTERN.pattern}")
    return graph_id.replace(".", "=")


def _graph_key(graph_id: str, version: int) -> str:
    return f"graph.{_token(graph_id)}.{version:08d}"


def _latest_key(graph_id: str) -> str:
    return f"graph.{_token(graph_id)}.latest"
