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

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

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

    Raises ``InvalidArgument`` (code ``malformed_json``, ``malformed_protobuf``,
    ``not_an_object`` or ``unsupported_content_type``) when it cannot even be read.
    """
    if not value:
        raise InvalidArgument("", "the record has no value", code="empty_record")
    content_type = (header(headers, CONTENT_TYPE) or JSON).split(";")[0].strip().lower()
    if content_type == PROTOBUF:
        message = schema()
        try:
            message.ParseFromString(value)
        except DecodeError as exc:
            raise InvalidArgument(
                "",
                f"not a valid {schema.DESCRIPTOR.full_name} protobuf: {exc}",
                code="malformed_protobuf",
            ) from exc
        return MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    if content_type not in (JSON, "text/json"):
        raise InvalidArgument(
            "",
            f"content-type {content_type!r} is neither {JSON} nor {PROTOBUF}",
            code="unsupported_content_type",
        )
    try:
        # NaN/Infinity are not JSON; Python would accept them silently
        data = json.loads(value.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument("", f"not valid UTF-8 JSON: {exc}", code="malformed_json") from exc
    if not isinstance(data, dict):
        raise InvalidArgument(
            "", f"expected a JSON object, got {type(data).__name__}", code="not_an_object"
        )
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
