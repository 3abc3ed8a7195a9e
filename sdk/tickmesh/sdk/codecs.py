"""Payload codecs: how Python values become (content type, bytes) and back.

Every task input and output, plan goal, step input and signal payload travels
as bytes plus a MIME content type. The rules:

* ``dict``, ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool`` and ``None``
  are JSON (``application/json``; compact, UTF-8, ``ensure_ascii=False``).
* ``bytes`` are ``application/octet-stream``.
* A protobuf message is ``application/x-protobuf; messageType=<full name>``.
* :class:`Payload` sets the content type explicitly.

Decoding follows the content type, refined by what the receiving function
annotates: ``bytes`` gets the raw bytes, :class:`Payload` gets bytes plus
content type, a protobuf message class gets a parsed message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from .errors import ValidationError

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
PROTOBUF = "application/x-protobuf"
TEXT = "text/plain; charset=utf-8"

__all__ = [
    "JSON",
    "OCTET_STREAM",
    "PROTOBUF",
    "TEXT",
    "Payload",
    "decode",
    "encode",
    "parse_content_type",
    "protobuf_content_type",
]


@dataclass(frozen=True, slots=True)
class Payload:
    """Bytes with an explicit content type, passed through unchanged.

    Return one from a task to choose the content type of its output, or
    annotate a parameter with ``Payload`` to receive the raw bytes and type.
    """

    data: bytes
    """The encoded bytes."""
    content_type: str = OCTET_STREAM
    """A MIME type such as ``text/csv`` or ``application/json``."""


def protobuf_content_type(message_type: str) -> str:
    """Return the content type of a serialized protobuf message of ``message_type``."""
    return f"{PROTOBUF}; messageType={message_type}"


def parse_content_type(content_type: str) -> tuple[str, dict[str, str]]:
    """Split a content type into its lowercased MIME type and its parameters."""
    mime, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    for part in rest.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return mime.strip().lower(), params


def _is_json(mime: str) -> bool:
    return mime == JSON or mime.endswith("+json")


def encode(value: Any) -> tuple[str, bytes]:
    """Encode a Python value as ``(content_type, data)``.

    Raises:
        ValidationError: The value has no encoding (e.g. an arbitrary object, or
            a float that is not finite).
    """
    if isinstance(value, Payload):
        return value.content_type, bytes(value.data)
    if isinstance(value, bytes | bytearray | memoryview):
        return OCTET_STREAM, bytes(value)
    if isinstance(value, Message):
        return (
            protobuf_content_type(value.DESCRIPTOR.full_name),
            value.SerializeToString(deterministic=True),
        )
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"cannot encode a {type(value).__name__} as a payload: {exc}; return JSON-like "
            "data, bytes, a protobuf message or a tickmesh.sdk.codecs.Payload"
        ) from exc
    return JSON, text.encode()


def decode(content_type: str, data: bytes, annotation: Any = None) -> Any:
    """Decode payload bytes into a Python value.

    Args:
        content_type: The payload's content type.
        data: The payload's bytes.
        annotation: What the receiver asked for: ``bytes``, :class:`Payload`, a
            protobuf message class, or anything else (decode by content type).

    Raises:
        ValidationError: The bytes are not valid for their content type.
    """
    if annotation is Payload:
        return Payload(data=data, content_type=content_type)
    if annotation is bytes:
        return data
    mime, params = parse_content_type(content_type)
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return _decode_message(annotation, mime, params, data)
    if not mime and not data:
        return None
    if _is_json(mime):
        if not data:
            return None
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValidationError(f"payload is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise ValidationError("payload is JSON nested too deeply to decode") from exc
    if mime.startswith("text/"):
        try:
            return data.decode(params.get("charset", "utf-8"))
        except (LookupError, UnicodeDecodeError) as exc:
            raise ValidationError(f"payload is not valid {content_type}: {exc}") from exc
    return data


def _decode_message(cls: type[Message], mime: str, params: dict[str, str], data: bytes) -> Message:
    expected = cls.DESCRIPTOR.full_name
    if _is_json(mime):
        try:
            return json_format.Parse(data, cls())
        except json_format.ParseError as exc:
            raise ValidationError(f"payload is not a JSON {expected}: {exc}") from exc
    declared = params.get("messagetype", "")
    if declared and declared != expected:
        raise ValidationError(f"payload holds a {declared}, not the {expected} asked for")
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise ValidationError(f"payload is not a serialized {expected}: {exc}") from exc
