"""Fixtures for the end-to-end suite: every test that starts a mesh runs in both profiles."""

from tests.support.mesh import mesh_profile, start_mesh
from tests.support.nats_configs import servers
from tests.support.nats_server import nats_server
from tests.support.postgres import postgres_dsn, postgres_server, start_postgres
from tests.support.redis_server import redis_server, redis_url
from tests.support.s3_server import s3_bucket, s3_server

__all__ = [
    "mesh_profile",
    "nats_server",
    "postgres_dsn",
    "postgres_server",
    "redis_server",
    "redis_url",
    "s3_bucket",
    "s3_server",
    "servers",
    "start_mesh",
    "start_postgres",
]
