"""Shared runtime of the tickmesh services: settings, NATS, gRPC wiring, logging."""
