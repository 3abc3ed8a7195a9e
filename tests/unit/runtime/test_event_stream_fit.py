"""The event stream's byte limit follows its account's storage (``fit_event_stream``).

A fake JetStream that keeps one stream config; the real server's side (permissions, the
limit trimming the stream) is in tests/integration/test_event_stream_limits.py."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamInfo

from tickmesh.runtime.streams import (
    EVENT_LIMIT_KEY,
    EVENT_STORAGE_SHARE,
    fit_event_stream,
    stream_configs,
)
from tickmesh.runtime.subjects import TenantNames

GIB = 1 << 30
NAMES = TenantNames("acme")
SERVER_METADATA = {"_nats.ver": "2.15.1"}


class OneStream:
    """``stream_info`` and ``update_stream`` of one stream; refuses updates if told to."""

    def __init__(self, config: StreamConfig, *, may_update: bool = True) -> None:
        self.config = config
        self.may_update = may_update
        self.updates = 0

    async def stream_info(self, name: str) -> StreamInfo:
        assert name == self.config.name
        return cast(StreamInfo, SimpleNamespace(config=self.config))

    async def update_stream(self, config: StreamConfig) -> Any:
        if not self.may_update:
            raise PermissionError("Permissions Violation for Publish to $JS.API.STREAM.UPDATE")
        self.updates += 1
        self.config = config
        return SimpleNamespace(config=config)

    @property
    def js(self) -> JetStreamContext:
        return cast(JetStreamContext, self)


def made_with(storage: int | None, *, replicas: int = 1, **changes: Any) -> OneStream:
    """The event stream as the services make it in an account of ``storage`` bytes, as the
    server reports it (with its own metadata), with ``changes``."""
    config = next(
        c
        for c in stream_configs(NAMES, replicas=replicas, storage=storage)
        if c.name == NAMES.evt_stream
    )
    config = replace(
        config,
        max_bytes=config.max_bytes or -1,
        metadata={**SERVER_METADATA, **(config.metadata or {})},
    )
    return OneStream(replace(config, **changes))


async def test_a_stream_made_with_the_share_follows_the_storage_down_and_up() -> None:
    stream = made_with(4 * GIB)
    assert stream.config.max_bytes == GIB
    assert await fit_event_stream(stream.js, NAMES, storage=GIB) == GIB // EVENT_STORAGE_SHARE
    assert stream.config.max_bytes == GIB // EVENT_STORAGE_SHARE
    assert await fit_event_stream(stream.js, NAMES, storage=8 * GIB) == 2 * GIB
    assert stream.config.max_bytes == 2 * GIB
    assert stream.config.metadata == {**SERVER_METADATA, EVENT_LIMIT_KEY: str(2 * GIB)}


async def test_an_unchanged_storage_updates_nothing() -> None:
    stream = made_with(4 * GIB)
    assert await fit_event_stream(stream.js, NAMES, storage=4 * GIB) == GIB
    assert stream.updates == 0


async def test_each_replica_counts_against_the_account() -> None:
    stream = made_with(12 * GIB, replicas=3)
    assert stream.config.max_bytes == GIB
    assert await fit_event_stream(stream.js, NAMES, storage=24 * GIB) == 2 * GIB


async def test_an_account_without_a_storage_limit_gives_the_stream_none() -> None:
    stream = made_with(4 * GIB)
    assert await fit_event_stream(stream.js, NAMES, storage=None) is None
    assert stream.config.max_bytes == -1
    assert stream.config.metadata is not None
    assert stream.config.metadata[EVENT_LIMIT_KEY] == "-1"
    # ...and one when the account gets a limit.
    assert await fit_event_stream(stream.js, NAMES, storage=4 * GIB) == GIB


async def test_a_stream_made_before_the_limit_gets_it() -> None:
    stream = made_with(None, metadata=dict(SERVER_METADATA))
    assert await fit_event_stream(stream.js, NAMES, storage=4 * GIB) == GIB
    assert stream.config.max_bytes == GIB
    assert stream.config.metadata is not None
    assert stream.config.metadata[EVENT_LIMIT_KEY] == str(GIB)


@pytest.mark.parametrize(
    ("max_bytes", "metadata"),
    [
        (100_000, dict(SERVER_METADATA)),  # an operator's on a stream made before the limit
        (100_000, {**SERVER_METADATA, EVENT_LIMIT_KEY: str(GIB)}),  # set over ours
        (-1, {**SERVER_METADATA, EVENT_LIMIT_KEY: str(GIB)}),  # ours lifted
    ],
    ids=["set-before", "set-over-ours", "lifted"],
)
async def test_an_operators_limit_is_kept(max_bytes: int, metadata: dict[str, str]) -> None:
    stream = made_with(4 * GIB, max_bytes=max_bytes, metadata=metadata)
    kept = await fit_event_stream(stream.js, NAMES, storage=GIB)
    assert kept == (max_bytes if max_bytes > 0 else None)
    assert stream.updates == 0


async def test_a_connection_that_may_not_update_says_what_to_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = made_with(4 * GIB)
    stream.may_update = False
    with caplog.at_level(logging.WARNING, logger="tickmesh.runtime.streams"):
        assert await fit_event_stream(stream.js, NAMES, storage=GIB) == GIB  # unchanged
    wanted = GIB // EVENT_STORAGE_SHARE
    assert f"nats stream edit {NAMES.evt_stream} --max-bytes {wanted}" in caplog.text
    assert "can fill more of its JetStream storage" in caplog.text  # the limit is too high
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tickmesh.runtime.streams"):
        await fit_event_stream(stream.js, NAMES, storage=8 * GIB)  # raising: no danger
    assert f"--max-bytes {2 * GIB}" in caplog.text
    assert "can fill" not in caplog.text
