"""Worker and channel settings that gRPC cannot take fail where they are given, and a
Worker whose run failed before serving still shuts down."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tickmesh.sdk import _worker
from tickmesh.sdk._task import TaskContext, task
from tickmesh.sdk._transport import ChannelSecurity
from tickmesh.sdk._worker import Worker
from tickmesh.sdk.errors import ConfigError


@task
async def idle(ctx: TaskContext, value: Any) -> None:
    return None


@pytest.mark.parametrize("size", [0, -1, 2**31, 4 * 1024**3])
def test_a_message_limit_grpc_cannot_take_is_refused(size: int) -> None:
    # gRPC takes the limit as a C int: 4 GiB made run() fail after it had marked the
    # worker running, and shutdown() then waited for ever.
    with pytest.raises(ConfigError, match="max_message_bytes"):
        Worker("127.0.0.1:1", tenant="acme", tasks=[idle], max_message_bytes=size)


@pytest.mark.parametrize("fields", [{"certificate_chain": b"cert"}, {"private_key": b"key"}])
def test_a_client_certificate_without_its_key_is_refused(fields: dict[str, Any]) -> None:
    # gRPC aborts the process on a certificate chain without a private key.
    with pytest.raises(ConfigError, match="go together"):
        ChannelSecurity(**fields)


async def test_shutdown_returns_after_run_failed_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no channel")

    monkeypatch.setattr(_worker, "create_channel", refuse)
    worker = Worker("127.0.0.1:1", tenant="acme", tasks=[idle])
    with pytest.raises(OSError, match="no channel"):
        await worker.run()
    # Bounded only so that the failure is reported rather than the test hanging.
    async with asyncio.timeout(5):
        await worker.shutdown(grace=0.0)
    with pytest.raises(OSError, match="no channel"):
        await worker.run()  # not "already running"
