"""Fixtures of the end-to-end tests: the session's nats-server and whole meshes on it."""

from tests.support.mesh import start_mesh
from tests.support.nats_server import nats_server

__all__ = ["nats_server", "start_mesh"]
