"""Fixtures shared by these tests: a real nats-server for the session."""

from tests.support.nats_server import nats_server

__all__ = ["nats_server"]
