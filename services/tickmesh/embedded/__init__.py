"""The embedded profile: the whole mesh in one process, on an embedded nats-server,
SQLite and a local blob folder. Used by `tickmesh dev`, `tickmesh run`, the
end-to-end tests and the benchmark."""

from .mesh import Mesh, MeshConfig

__all__ = ["Mesh", "MeshConfig"]
