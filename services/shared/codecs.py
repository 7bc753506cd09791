"""Encoding of events on Kafka.

Product services publish JSON (UTF-8) unless the record header ``content-type`` is
``application/x-protobuf``; the platform's own topics carry protobuf with that header and a
``message-type`` header naming the message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from services.shared.errors import InvalidArgument

CONTENT_TYPE = "content-type"
MESSAGE_TYPE = "message-type"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"

Headers = Sequence[tuple[str, bytes]]
M = TypeVar("M", bound=Message)


def header(headers: Headers | None, name: str) -> str | None:
    """The first header named ``name`` (case-insensitive), decoded, or None."""
    for key, value in headers or ():
        if key.lower() == name:
            return value.decode("utf-8", errors="replace") if value is not None else None
    return None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def decode_external(
    value: bytes | None, headers: Headers | None, schema: type[M]
) -> dict[str, Any]:
    """A product service's event as a plain dict, whatever its encoding.

    Raises ``InvalidArgument`` when it cannot even be read, with code ``empty_record`` (no
    value), ``unsupported_content_type``, ``malformed_json`` (not UTF-8, not JSON, NaN or
    Infinity, nested too deeply), ``duplicate_field`` (a key given twice), ``not_an_object``,
    ``malformed_protobuf`` or ``unknown_field`` (a protobuf field number the schema lacks).
    """
    if not value:
        raise InvalidArgument("", "the record has no value", code="empty_record")
    given = header(headers, CONTENT_TYPE) if headers else None  # JSON senders often send none
    if given:  # absent or empty: JSON
        content_type = given.split(";")[0].strip().lower()
        if content_type == PROTOBUF:
            return _decode_protobuf_fields(value, schema)
        if content_type not in (JSON, "text/json"):
            raise InvalidArgument(
                "",
                f"content-type {content_type[:64]!r} is neither {JSON} nor {PROTOBUF}",
                code="unsupported_content_type",
            )
    data = _plain_json_object(value)
    if data is not None:
        return data
    try:
        # NaN/Infinity are not JSON; Python would accept them silently. A repeated key is
        # ambiguous (which value did the sender mean?), so it is refused too.
        data = _JSON_DECODER.decode(value.decode("utf-8"))
    except _RepeatedKey as exc:
        raise InvalidArgument(exc.key, "appears more than once", code="duplicate_field") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument("", f"not valid UTF-8 JSON: {exc}", code="malformed_json") from exc
    except RecursionError:  # "[[[[...": deeper than the parser can go
        raise InvalidArgument("", "JSON nested too deeply", code="malformed_json") from None
    if not isinstance(data, dict):
        raise InvalidArgument(
            "", f"expected a JSON object, got {type(data).__name__}", code="not_an_object"
        )
    return data


def _plain_json_object(value: bytes) -> dict[str, Any] | None:
    """The common case, read by msgspec (several times faster than the json module): a flat
    JSON object, no escapes. None means "not sure": the json module then reads the record
    and names what is wrong with it.

    msgspec takes the last of a repeated key silently, so this returns only when the record
    provably has none: without a backslash every quote delimits a string, and a flat object
    whose keys are all distinct holds exactly two quotes per key and per string value. A
    repeated key (or any string or key inside a nested value) adds quotes the dict does not
    account for. msgspec refuses what the json module refuses (NaN, Infinity, control
    characters, invalid UTF-8), and numbers beyond a double, which the json module reads as
    infinity. tests/unit/test_schemas.py checks both give the same dict on what it accepts.
    """
    if b"\\" in value:
        return None
    try:
        data = _read_object(value)
    except msgspec.MsgspecError:  # not JSON, not an object, a number out of range...
        return None
    strings = list(map(type, data.values())).count(str)
    return data if value.count(b'"') == 2 * (len(data) + strings) else None


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key.encode("utf-8", "backslashreplace").decode("utf-8")[:64]


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return data


_read_object = msgspec.json.Decoder(dict).decode
# built once: json.loads with options builds a decoder per call
_JSON_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, object_pairs_hook=_object_without_repeated_keys
)


def _decode_protobuf_fields(value: bytes, schema: type[M]) -> dict[str, Any]:
    """A flat protobuf event as a dict of its fields, values as protobuf holds them.

    Field values are read directly (not through MessageToDict, which would turn a NaN amount
    into the string "NaN" and so report the wrong rule). Unknown field numbers are refused as
    JSON's unknown keys are: the sender and the platform disagree on the schema.
    """
    message = schema()
    try:
        message.ParseFromString(value)
    except DecodeError as exc:
        raise InvalidArgument(
            "",
            f"not a valid {schema.DESCRIPTOR.full_name} protobuf: {exc}",
            code="malformed_protobuf",
        ) from exc
    unknown = [field.field_number for field in UnknownFieldSet(message)]
    if unknown:
        raise InvalidArgument(
            f"#{unknown[0]}",
            f"field number {unknown[0]} is not a field of {schema.DESCRIPTOR.full_name}",
            code="unknown_field",
        )
    data: dict[str, Any] = {}
    for field in schema.DESCRIPTOR.fields:
        if field.message_type is not None:
            data[field.name] = MessageToDict(
                getattr(message, field.name), preserving_proto_field_name=True
            )
        else:
            data[field.name] = getattr(message, field.name)
    return data


def protobuf_headers(message: Message) -> list[tuple[str, bytes]]:
    return [
        (CONTENT_TYPE, PROTOBUF.encode()),
        (MESSAGE_TYPE, message.DESCRIPTOR.full_name.encode()),
    ]


def encode_json(data: dict[str, Any]) -> bytes:
    """JSON as product services publish it (compact, UTF-8, finite numbers only)."""
    for key, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} is not finite")
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_protobuf(value: bytes, schema: type[M]) -> M:
    message = schema()
    message.ParseFromString(value)
    return message
