"""The SDK's public surface is explicit and changes only on purpose."""

from __future__ import annotations

import tickmesh.sdk

EXPECTED_SDK_EXPORTS = {
    "EVENT_KINDS",
    "BODY_KINDS",
    "MAX_ENVELOPE_BYTES",
    "MAX_STRUCT_DEPTH",
    "BlobResolver",
    "BodyKind",
    "ChannelSecurity",
    "Client",
    "ClientUsageError",
    "ConfigError",
    "DeadlineExceededError",
    "Decision",
    "Divergence",
    "FileBlobResolver",
    "GraphBuilder",
    "GuardrailRejectedError",
    "Issue",
    "LifetimeEvent",
    "LifetimeFailedError",
    "LifetimeHandle",
    "LifetimeInfo",
    "NotFoundError",
    "Plan",
    "PlanContext",
    "PlanFailedError",
    "PlanInputView",
    "PoolBlobResolver",
    "RPCError",
    "ReplayResult",
    "Retry",
    "SignalView",
    "StatusCode",
    "Step",
    "Task",
    "TaskContext",
    "TaskError",
    "TickmeshError",
    "TransportError",
    "ValidationError",
    "Worker",
    "body_kind",
    "check_envelope_size",
    "codecs",
    "complete",
    "decode_envelope",
    "dispatch",
    "encode_envelope",
    "events_of",
    "execution_id",
    "fail",
    "decisions_of",
    "encode_event_batch",
    "graph_digest",
    "graph_to_yaml",
    "load_graph_file",
    "load_graph_yaml",
    "plan",
    "step",
    "task",
    "uuid7",
    "validate_envelope",
    "validate_graph",
    "wait_for",
}


def test_sdk_exports_are_pinned() -> None:
    assert set(tickmesh.sdk.__all__) == EXPECTED_SDK_EXPORTS
    assert len(tickmesh.sdk.__all__) == len(set(tickmesh.sdk.__all__))


def test_every_export_exists() -> None:
    for name in tickmesh.sdk.__all__:
        assert hasattr(tickmesh.sdk, name), name


def test_every_error_derives_from_the_root() -> None:
    for name in tickmesh.sdk.__all__:
        value = getattr(tickmesh.sdk, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, tickmesh.sdk.TickmeshError), name
            assert name.endswith("Error"), name
