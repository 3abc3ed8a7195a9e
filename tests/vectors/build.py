"""Writes the golden vectors: `python -m tests.vectors.build` (or `make vectors`).

Vectors are the contract other languages prove themselves against, so this is
run only when the contract deliberately changes; the tests check that the
committed files still match what the factories build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

from google.protobuf import json_format, struct_pb2

from tests.support.factories import make_envelope
from tickmesh.sdk import BODY_KINDS, MAX_STRUCT_DEPTH, execution_id
from tickmesh.v1 import envelope_pb2

HERE = Path(__file__).parent
VALID_DIR = HERE / "envelopes"
INVALID_DIR = HERE / "invalid"


class ExecutionIdCase(TypedDict):
    tenant: str
    lifetime: str
    parents: list[str]
    node: str
    iteration: int


EXECUTION_ID_CASES: list[ExecutionIdCase] = [
    {
        "tenant": "acme",
        "lifetime": "019a0000-0000-7000-8000-000000000001",
        "parents": [],
        "node": "plan",
        "iteration": 1,
    },
    {
        "tenant": "acme",
        "lifetime": "019a0000-0000-7000-8000-000000000001",
        "parents": ["bbbb", "aaaa"],
        "node": "generate_code",
        "iteration": 2,
    },
    {"tenant": "t_2", "lifetime": "l", "parents": ["x"], "node": "n", "iteration": 10},
]


def envelope_json(env: envelope_pb2.ExecutionEnvelope) -> str:
    return json.dumps(json_format.MessageToDict(env), indent=2, sort_keys=True) + "\n"


def deep_struct(levels: int) -> struct_pb2.Struct:
    root = struct_pb2.Struct()
    cur = root
    for _ in range(levels - 1):
        cur = cur.fields["nested"].struct_value
    cur.fields["leaf"].bool_value = True
    return root


def invalid_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a phrase the decoder's error must contain)."""
    good = make_envelope("task_execution").SerializeToString(deterministic=True)
    bad_utf8 = bytearray(good)
    at = bad_utf8.index(b"acme")
    bad_utf8[at] = 0xFF
    deep = make_envelope("execution_ref")
    deep.execution_ref.task_execution.result.error.details.CopyFrom(
        deep_struct(MAX_STRUCT_DEPTH + 2)
    )
    no_header = make_envelope("signal")
    no_header.ClearField("header")
    from google.protobuf import timestamp_pb2

    wrong_type = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5).SerializeToString(
        deterministic=True
    )
    return {
        "empty": (b"", "empty message"),
        "truncated": (good[:-3], "corrupt or truncated"),
        "bad_utf8": (bytes(bad_utf8), "invalid UTF-8"),
        "deep_struct": (deep.SerializeToString(deterministic=True), "depth limit"),
        "no_header": (no_header.SerializeToString(deterministic=True), "no header"),
        "wrong_message_type": (wrong_type, "no header"),
        "random_bytes": (bytes(range(7, 250, 3)), "malformed ExecutionEnvelope"),
    }


def main() -> None:
    VALID_DIR.mkdir(exist_ok=True)
    INVALID_DIR.mkdir(exist_ok=True)
    for kind in BODY_KINDS:
        env = make_envelope(kind)
        (VALID_DIR / f"{kind}.binpb").write_bytes(env.SerializeToString(deterministic=True))
        (VALID_DIR / f"{kind}.json").write_text(envelope_json(env))
    manifest = {}
    for name, (data, expect) in invalid_cases().items():
        (INVALID_DIR / f"{name}.binpb").write_bytes(data)
        manifest[name] = expect
    (INVALID_DIR / "expected_errors.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    )
    cases = [
        {
            **case,
            "execution_id": execution_id(
                case["tenant"], case["lifetime"], case["parents"], case["node"], case["iteration"]
            ),
        }
        for case in EXECUTION_ID_CASES
    ]
    (HERE / "execution_ids.json").write_text(json.dumps(cases, indent=2) + "\n")


if __name__ == "__main__":
    main()
