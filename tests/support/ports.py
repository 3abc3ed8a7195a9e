"""Loopback ports for servers the tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port nothing listens on now (bound once, then released).

    Another process may take it before the caller binds it; callers that cannot
    retry should prefer port 0 and read back the port the server chose.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
