"""A TCP fault proxy: one loopback port in front of one upstream (RELIABILITY.md §4.1).

Modes, switchable at any time with :meth:`FaultProxy.set`:

- ``pass``: forward both ways.
- ``delay``: forward, holding every chunk ``delay_ms`` before it goes on.
- ``drop_new``: refuse new connections (accepted, then closed at once); open ones carry on.
- ``blackhole``: accept new connections and never forward; open ones stop forwarding
  too and hold what they read (nothing is lost in the proxy: it flows on when the mode
  goes back to ``pass``, unless the peer gave up).
- ``reset_all`` is an action, not a mode: :meth:`FaultProxy.reset_all` closes every open
  connection now (with RST) and leaves the mode as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Literal

Mode = Literal["pass", "delay", "drop_new", "blackhole"]


class FaultProxy:
    """``async with FaultProxy(host, port) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.delay_ms = 0.0
        self.accepted = 0
        """Connections accepted so far (refused ones included)."""
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def set(self, mode: Mode, *, delay_ms: float = 0.0) -> None:
        """Switch mode; ``delay_ms`` applies to ``delay``."""
        self.mode, self.delay_ms = mode, delay_ms
        if mode == "blackhole":
            self._open.clear()
        else:
            self._open.set()

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    def reset_all(self) -> int:
        """Close every open connection with RST, both sides; returns how many."""
        links = list(self._links)
        for client, upstream in links:
            for writer in (client, upstream):
                if writer is not None:
                    _abort(writer)
        self._links.clear()
        return len(links)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        try:
            if self.mode == "drop_new":
                _abort(writer)
                return
            self._links.add(link)
            await self._open.wait()  # a blackholed connection is held here, never forwarded
            if link not in self._links:
                return  # reset while held
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._links.discard(link)
            link = (writer, up_writer)
            self._links.add(link)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # closing the proxy: the link ends below (asyncio logs a cancelled handler)
        finally:
            self._links.discard(link)
            for w in link:
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                await self._open.wait()
                if self.mode == "delay" and self.delay_ms > 0:
                    await asyncio.sleep(self.delay_ms / 1000)
                writer.write(chunk)
                await writer.drain()
        except OSError:
            _abort(writer)
        else:
            writer.close()  # EOF one way: pass it on (the other pump sees it in turn)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox reset would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
