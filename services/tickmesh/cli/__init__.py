"""The `tickmesh` command line."""
