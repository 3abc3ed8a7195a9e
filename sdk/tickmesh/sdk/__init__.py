"""tickmesh SDK: author tasks and plans, run executors, start and watch lifetimes.

The public surface is what this module exports; everything in a module whose
name starts with an underscore is private.
"""

from ._convert import (
    BODY_KINDS,
    MAX_ENVELOPE_BYTES,
    MAX_STRUCT_DEPTH,
    BodyKind,
    body_kind,
    decode_envelope,
    encode_envelope,
    validate_envelope,
)
from .errors import (
    ConfigError,
    DeadlineExceededError,
    GuardrailRejectedError,
    Issue,
    LifetimeFailedError,
    NotFoundError,
    PlanFailedError,
    RPCError,
    StatusCode,
    TaskError,
    TickmeshError,
    TransportError,
    ValidationError,
)
from .ids import execution_id, uuid7

__all__ = [
    "BODY_KINDS",
    "MAX_ENVELOPE_BYTES",
    "MAX_STRUCT_DEPTH",
    "BodyKind",
    "ConfigError",
    "DeadlineExceededError",
    "GuardrailRejectedError",
    "Issue",
    "LifetimeFailedError",
    "NotFoundError",
    "PlanFailedError",
    "RPCError",
    "StatusCode",
    "TaskError",
    "TickmeshError",
    "TransportError",
    "ValidationError",
    "body_kind",
    "decode_envelope",
    "encode_envelope",
    "execution_id",
    "uuid7",
    "validate_envelope",
]
