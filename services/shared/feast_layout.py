"""Feast's Redis online-store layout, in one place: how a feature row lies in Redis.

One hash per entity: the key is Feast's serialised ``EntityKey`` (``serialize_entity_key`` at
the store's ``entity_key_serialization_version``) followed by the project name; each feature
is a field named by the 32-bit murmur3 hash (little endian) of ``"<view>:<feature>"``, its
value a serialised Feast ``Value``; the field ``_ts:<view>`` holds the row's event time as a
serialised protobuf ``Timestamp``.

The features service writes this layout (services/shared/feast_online.py) and serving reads it
(services/serving/online_features.py) without Feast's per-row bookkeeping, so neither leans on
Feast's private helpers; tests/unit/test_feast_layout.py holds every function here equal to the
bytes Feast's own ``RedisOnlineStore`` writes, so a Feast upgrade that changes the layout fails
that test instead of silently splitting writer and reader.

Nothing here imports Feast at module level (``import feast`` takes seconds: serving must
answer within two of a restart): values are decoded from the wire format, field names come
from murmur3 directly, and an ``EntityKeys`` given the checked key prefix of its view (kept
by serving's layout cache) never serialises a key with Feast.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import mmh3

from services.shared.logging import get_logger
from services.shared.protowire import DOUBLE, length_delimited, varint

if TYPE_CHECKING:
    from feast import RepoConfig
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto

log = get_logger("shared.feast_layout")


def entity_key(join_key: str, entity: str, *, int_entity: bool = False) -> EntityKeyProto:
    """Feast's ``EntityKey`` of a single-key entity (an int64 key given as its digits)."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    value = ValueProto(int64_val=int(entity)) if int_entity else ValueProto(string_val=entity)
    return EntityKeyProto(join_keys=[join_key], entity_values=[value])


def redis_key(project: str, key: EntityKeyProto, serialization_version: int) -> bytes:
    """The Redis key of an entity's hash."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    return (
        serialize_entity_key(key, entity_key_serialization_version=serialization_version)
        + project.encode()
    )


def entity_redis_key(config: RepoConfig, join_key: str, entity: str) -> bytes:
    """The Redis key of a single-key string entity under ``config``'s project."""
    return redis_key(
        config.project, entity_key(join_key, entity), config.entity_key_serialization_version
    )


def feature_field(view: str, feature: str) -> bytes:
    """The hash field of one feature of one view."""
    return int(mmh3.hash(f"{view}:{feature}", signed=False)).to_bytes(4, "little")


def event_time_field(view: str) -> str:
    """The hash field holding the view's event time (a serialised ``Timestamp``)."""
    return f"_ts:{view}"


def encode_value(kind: str, value: Any) -> bytes:
    """The serialised Feast ``Value`` of a feature of type ``kind`` (int64/float64/string),
    written directly: the same bytes as ``Value(<kind>_val=v).SerializeToString()`` at a
    fraction of the cost."""
    if kind == "int64":
        return b"\x20" + varint(int(value))  # field 4 (int64_val), varint
    if kind == "float64":
        return b"\x29" + DOUBLE.pack(float(value))  # field 5 (double_val), fixed64
    data = str(value).encode()
    return length_delimited(0x12, data)  # field 2 (string_val)


_FLOAT = struct.Struct("<f")


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def decode_value(raw: bytes | None) -> Any:
    """A stored Feast ``Value`` as a Python value; ``None`` when absent or unset.

    The scalar kinds (one field of the ``val`` oneof, what ``encode_value`` writes and more)
    are read from the wire format directly; anything else (lists, several fields, bytes
    that are no ``Value``) through Feast's own ``Value`` message."""
    if not raw:
        return None
    try:
        tag, at = _varint(raw, 0)
        number, wire = tag >> 3, tag & 7
        value: Any
        if wire == 0 and number in (3, 4, 7, 8, 19):  # int32, int64, bool, unix ts, null
            value, at = _varint(raw, at)
            if number == 7:
                value = bool(value)
            elif number == 19:
                value = None
            elif value >= 1 << 63:
                value -= 1 << 64
        elif wire == 1 and number == 5:  # double
            (value,), at = DOUBLE.unpack_from(raw, at), at + 8
        elif wire == 5 and number == 6:  # float
            (value,), at = _FLOAT.unpack_from(raw, at), at + 4
        elif wire == 2 and number in (1, 2):  # bytes, string
            length, at = _varint(raw, at)
            value, at = raw[at : at + length], at + length
            if number == 2:
                value = value.decode()
        else:
            at = -1
        if at == len(raw):
            return value
    except (IndexError, UnicodeDecodeError, struct.error):
        pass
    return _decode_with_feast(raw)


def _decode_with_feast(raw: bytes) -> Any:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    value = ValueProto.FromString(raw)
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    return getattr(value, kind)


class EntityKeys:
    """The Redis key of each entity of one single-key view, at a fraction of the cost.

    Serialising an ``EntityKey`` proto costs about 25 us per entity, more than the rest of a
    read. For a string join key the key is ``head + <uint32 length> + utf-8 value + project``:
    ``head`` is taken from the full serialisation of the empty string, and the rule is checked
    against the full serialisation for a set of probe values on construction. If that check
    ever fails, every key is serialised in full.
    """

    _PROBES = ("", "u", "user-12345", "ü-é-中", "x" * 300)

    def __init__(
        self,
        project: str,
        serialization_version: int,
        join_key: str,
        *,
        int_entity: bool,
        head: bytes | None = None,
    ) -> None:
        """``head``: the prefix a previous construction checked (``head``), taken as is."""
        self._project = project
        self._version = serialization_version
        self._join_key = join_key
        self._int_entity = int_entity
        self._head: bytes | None = head
        self._tail = project.encode()
        if head is None and not int_entity:
            empty = self.full_key("")
            self._head = empty[: len(empty) - 4 - len(self._tail)]
            if any(self._fast(p) != self.full_key(p) for p in self._PROBES):
                self._head = None
                log.warning("feast_key_layout_unknown", join_key=join_key, using="full")

    @property
    def head(self) -> bytes | None:
        """The checked prefix of the keys; None when every key is serialised in full."""
        return self._head

    def full_key(self, entity: str) -> bytes:
        """The key from the full serialisation of the entity key."""
        key = entity_key(self._join_key, entity, int_entity=self._int_entity)
        return redis_key(self._project, key, self._version)

    def _fast(self, entity: str) -> bytes:
        assert self._head is not None
        encoded = entity.encode()
        return b"".join((self._head, len(encoded).to_bytes(4, "little"), encoded, self._tail))

    def __call__(self, entity: str) -> bytes:
        if self._head is None:
            return self.full_key(entity)
        return self._fast(entity)
