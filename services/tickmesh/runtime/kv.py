"""Helpers for NATS KV buckets."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from nats.js.errors import APIError, InvalidKeyError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .nats import Outgoing, publish_each

_WRONG_LAST_SEQUENCE = frozenset({10071, 10164})
"""JSStreamWrongLastSequenceErrF, JSStreamWrongLastSequenceConstantErr."""
_VALID_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_TTL = "Nats-TTL"
"""Per-message time to live, in whole seconds (the bucket's stream must allow it)."""


async def keys_matching(kv: KeyValue, pattern: str) -> list[str]:
    """Keys matching a NATS subject pattern such as ``graph.*.latest`` or ``lt.*``.

    Asked of the bucket's stream (stream info with a subjects filter): exact, one
    request per 100,000 keys (the server answers in pages of at most that many, and
    nats-py's ``stream_info`` reads only the first). Two other ways are wrong: nats-py's
    ``KeyValue.keys(filters=...)`` matches substrings, not wildcards, and its watcher
    can announce "no more values" before the values it should follow, so a listing
    could come back empty. A deleted key keeps its subject (a delete marker), so
    callers that delete keys must check the values they read.
    """
    # KeyValue keeps its stream name, subject prefix and JetStream context privately.
    prefix: str = kv._pre
    js = kv._js
    api = f"{js._prefix}.STREAM.INFO.{kv._stream}"
    found: set[str] = set()
    offset = 0
    while True:
        request = {"subjects_filter": f"{prefix}{pattern}", "offset": offset}
        answer = await js._api_request(api, json.dumps(request).encode(), timeout=js._timeout)
        page = (answer.get("state") or {}).get("subjects") or {}
        known = len(found)
        found.update(subject[len(prefix) :] for subject in page)
        offset += len(page)
        # Done at the last page, or at a page with nothing new (a server that pages
        # no further would otherwise be asked for the same page forever).
        if len(found) == known or offset >= int(answer.get("total") or 0):
            return sorted(found)


def is_wrong_last_sequence(error: BaseException) -> bool:
    """Whether JetStream refused a compare-and-set: the key's last revision was not
    the one expected."""
    return isinstance(error, APIError) and error.err_code in _WRONG_LAST_SEQUENCE


class CasWriter:
    """Compare-and-set writes to one bucket, as ``KeyValue.update`` makes them (a
    publish to the key's subject expecting its last revision), through the runtime's
    batched publisher: no request inbox, timer and PubAck dataclass per write, and a
    write waiting when the connection drops fails at once.
    """

    def __init__(self, kv: KeyValue) -> None:
        # KeyValue keeps its subject prefix and JetStream context privately.
        self._js = kv._js
        self._prefix: str = kv._pre

    async def update(self, key: str, value: bytes, last: int, *, ttl_s: int = 0) -> int:
        """Write ``value`` if the key's newest revision is ``last``; the new revision.
        With ``ttl_s``, the bucket removes the value that many seconds later (unless it
        is written again meanwhile).

        Raises:
            KeyWrongLastSequenceError: The key has another newest revision.
            InvalidKeyError: ``key`` is not a valid KV key.
            Exception: The write was not answered (e.g. ``LinkLostError`` when the
                connection dropped, or ``TimeoutError``): it may or may not have landed.
        """
        (outcome,) = await self.update_many([(key, value, last)], ttl_s=[ttl_s])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def update_many(
        self, writes: Sequence[tuple[str, bytes, int]], *, ttl_s: Sequence[int] | None = None
    ) -> list[int | BaseException]:
        """:meth:`update` for several keys at once (one publish round): for each write,
        its new revision or what :meth:`update` would have raised. Each write stands
        alone: one refused leaves the others as they are. ``ttl_s`` gives each write's
        time to live (0: none)."""
        outcomes: list[int | BaseException] = [InvalidKeyError(key) for key, _, _ in writes]
        valid = [i for i, (key, _, _) in enumerate(writes) if _is_valid_key(key)]
        sent = []
        for i in valid:
            key, value, last = writes[i]
            headers = {_EXPECTED_LAST: str(last)}
            if ttl_s is not None and ttl_s[i]:
                headers[_TTL] = str(ttl_s[i])
            sent.append(Outgoing(self._prefix + key, value, headers))
        for i, answer in zip(valid, await publish_each(self._js, sent), strict=True):
            if isinstance(answer, BaseException):
                outcomes[i] = _as_update_error(answer)
            else:
                outcomes[i] = answer.seq
        return outcomes

    async def put_many(
        self, writes: Sequence[tuple[str, bytes]], *, ttl_s: int = 0
    ) -> list[int | BaseException]:
        """Write each value whatever the key holds (one publish round): for each, its new
        revision, or why it is not known to be written. With ``ttl_s``, each is removed
        that many seconds later."""
        outcomes: list[int | BaseException] = [InvalidKeyError(key) for key, _ in writes]
        valid = [i for i, (key, _) in enumerate(writes) if _is_valid_key(key)]
        headers = {_TTL: str(ttl_s)} if ttl_s else {}
        sent = [Outgoing(self._prefix + writes[i][0], writes[i][1], headers) for i in valid]
        for i, answer in zip(valid, await publish_each(self._js, sent), strict=True):
            outcomes[i] = answer if isinstance(answer, BaseException) else answer.seq
        return outcomes


def _is_valid_key(key: str) -> bool:
    return bool(_VALID_KEY.fullmatch(key)) and key[0] != "." and key[-1] != "."


def _as_update_error(error: BaseException) -> BaseException:
    if is_wrong_last_sequence(error):
        assert isinstance(error, APIError)
        wrong = KeyWrongLastSequenceError(description=error.description)
        wrong.__cause__ = error
        return wrong
    return error
