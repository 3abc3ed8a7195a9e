"""The golden vectors still say what the contract says, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from tests.support.factories import make_envelope
from tests.vectors.build import EXECUTION_ID_CASES, INVALID_DIR, VALID_DIR, invalid_cases
from tickmesh.sdk import BODY_KINDS, BodyKind, ValidationError, decode_envelope, encode_envelope
from tickmesh.sdk import execution_id as make_execution_id
from tickmesh.v1 import envelope_pb2

HERE = Path(__file__).parent


@pytest.mark.parametrize("kind", BODY_KINDS)
def test_vector_bytes_match_the_factory(kind: BodyKind) -> None:
    golden = (VALID_DIR / f"{kind}.binpb").read_bytes()
    assert encode_envelope(make_envelope(kind)) == golden


@pytest.mark.parametrize("kind", BODY_KINDS)
def test_vector_decodes_and_reencodes_byte_for_byte(kind: BodyKind) -> None:
    golden = (VALID_DIR / f"{kind}.binpb").read_bytes()
    envelope = decode_envelope(golden, expected_kind=kind)
    assert envelope.WhichOneof("body") == kind
    assert encode_envelope(envelope) == golden


@pytest.mark.parametrize("kind", BODY_KINDS)
def test_vector_json_form_is_the_same_message(kind: BodyKind) -> None:
    golden = decode_envelope((VALID_DIR / f"{kind}.binpb").read_bytes())
    from_json = json_format.Parse(
        (VALID_DIR / f"{kind}.json").read_text(), envelope_pb2.ExecutionEnvelope()
    )
    assert from_json == golden
    assert json_format.MessageToDict(golden) == json.loads((VALID_DIR / f"{kind}.json").read_text())


def test_every_body_kind_has_a_vector() -> None:
    oneof = envelope_pb2.ExecutionEnvelope.DESCRIPTOR.oneofs_by_name["body"]
    assert sorted(f.name for f in oneof.fields) == sorted(BODY_KINDS)
    assert sorted(p.stem for p in VALID_DIR.glob("*.binpb")) == sorted(BODY_KINDS)


def test_invalid_vectors_match_the_builder() -> None:
    expected = json.loads((INVALID_DIR / "expected_errors.json").read_text())
    built = invalid_cases()
    assert sorted(expected) == sorted(built)
    for name, (data, phrase) in built.items():
        assert (INVALID_DIR / f"{name}.binpb").read_bytes() == data, name
        assert expected[name] == phrase


@pytest.mark.parametrize("name", sorted(invalid_cases()))
def test_invalid_vector_is_refused_with_a_clear_error(name: str) -> None:
    expected = json.loads((INVALID_DIR / "expected_errors.json").read_text())[name]
    with pytest.raises(ValidationError) as info:
        decode_envelope((INVALID_DIR / f"{name}.binpb").read_bytes())
    assert expected in str(info.value)


def test_execution_id_vectors() -> None:
    cases = json.loads((HERE / "execution_ids.json").read_text())
    assert len(cases) == len(EXECUTION_ID_CASES)
    for case in cases:
        got = make_execution_id(
            case["tenant"], case["lifetime"], case["parents"], case["node"], case["iteration"]
        )
        assert got == case["execution_id"]
