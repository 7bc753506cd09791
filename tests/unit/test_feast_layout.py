"""services/shared/feast_layout.py against Feast itself: the bytes of keys, fields and values
must be the ones Feast's own helpers and Feast's stock ``RedisOnlineStore`` write. A Feast
upgrade that changes the Redis layout fails here, before the features service (the writer)
and serving (the reader) drift apart."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Null, Value

from services.shared.feast_layout import (
    EntityKeys,
    decode_value,
    encode_value,
    entity_key,
    entity_redis_key,
    event_time_field,
    feature_field,
    redis_key,
)

ALPHABET = "abcXYZ019-_.:/ éü中\U0001f600"
_PROTO_FIELD = {"int64": "int64_val", "float64": "double_val", "string": "string_val"}


def _entities() -> list[str]:
    rng = random.Random(5)
    return ["", "u", "user-1", "x" * 64] + [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 80))) for _ in range(300)
    ]


def _feast_key(project: str, join_key: str, value: Value, version: int = 3) -> bytes:
    key = EntityKey(join_keys=[join_key], entity_values=[value])
    return _redis_key(project, key, entity_key_serialization_version=version)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("project", ["mlops", "t0123456789", "ünïcode"])
def test_keys_are_byte_for_byte_feasts(project: str, version: int) -> None:
    fast = EntityKeys(project, version, "user_id", int_entity=False)
    for entity in _entities():
        expected = _feast_key(project, "user_id", Value(string_val=entity), version)
        assert redis_key(project, entity_key("user_id", entity), version) == expected, entity
        assert fast(entity) == expected, entity
    config = SimpleNamespace(project=project, entity_key_serialization_version=version)
    assert entity_redis_key(config, "user_id", "u42") == _feast_key(  # type: ignore[arg-type]
        project, "user_id", Value(string_val="u42"), version
    )


def test_integer_entity_keys_are_feasts() -> None:
    keys = EntityKeys("mlops", 3, "card_id", int_entity=True)
    for number in (0, 42, -7, 2**40):
        assert keys(str(number)) == _feast_key("mlops", "card_id", Value(int64_val=number))


def test_feature_fields_are_feasts() -> None:
    for view, feature in [("user_activity", "txn_count_1h"), ("v", ""), ("ü", "中"), ("a", "b")]:
        assert feature_field(view, feature) == _mmh3(f"{view}:{feature}")


@pytest.mark.parametrize(
    ("kind", "value", "proto"),
    [
        *(("int64", v, {"int64_val": v}) for v in (0, 1, -1, 127, 128, 300, 2**40, -(2**63))),
        *(("float64", v, {"double_val": v}) for v in (0.0, 1.5, -3.25, 1e300, math.inf)),
        *(("string", v, {"string_val": v}) for v in ("", "DE", "é" * 200)),
    ],
)
def test_encoded_values_are_the_bytes_of_feast_value_protos(
    kind: str, value: Any, proto: dict[str, Any]
) -> None:
    assert encode_value(kind, value) == Value(**proto).SerializeToString()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Value(int64_val=7), 7),
        (Value(int64_val=0), 0),
        (Value(double_val=0.25), 0.25),
        (Value(string_val="FR"), "FR"),
        (Value(string_val=""), ""),
        (Value(bool_val=True), True),
        (Value(null_val=Null.NULL), None),
        (Value(), None),
    ],
)
def test_values_decode_as_feast_returns_them(value: Value, expected: object) -> None:
    decoded = decode_value(value.SerializeToString())
    assert decoded == expected
    assert type(decoded) is type(expected)
    assert decode_value(None) is None and decode_value(b"") is None


class _RecordingPipeline:
    """What Feast's RedisOnlineStore sends to Redis, recorded instead of sent (no network in
    unit tests): the layout as Feast writes it."""

    def __init__(self) -> None:
        self.written: dict[bytes, dict[Any, bytes]] = {}
        self._replies: list[Any] = []

    def __enter__(self) -> _RecordingPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def hmget(self, key: bytes, *fields: Any) -> None:
        self._replies.append([None for _ in fields])  # nothing stored yet

    def hset(self, key: bytes, mapping: dict[Any, bytes]) -> None:
        self.written[key] = dict(mapping)
        self._replies.append(len(mapping))

    def expire(self, name: bytes, time: int) -> None:
        self._replies.append(True)

    def execute(self) -> list[Any]:
        replies, self._replies = self._replies, []
        return replies


def test_feasts_own_online_store_writes_this_layout() -> None:
    pipeline = _RecordingPipeline()
    store = RedisOnlineStore()
    store._client = SimpleNamespace(pipeline=lambda transaction: pipeline)
    config = SimpleNamespace(
        project="mlops",
        entity_key_serialization_version=3,
        online_store=RedisOnlineStoreConfig(connection_string="localhost:1"),
    )
    view = SimpleNamespace(name="user_activity")
    rows = {"u1": {"txn_count_1h": ("int64", 3), "country": ("string", "FR")}, "ü2": {}}
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    data = [
        (
            entity_key("user_id", entity),
            {name: Value(**{_PROTO_FIELD[kind]: v}) for name, (kind, v) in features.items()},
            at,
            None,
        )
        for entity, features in rows.items()
    ]
    store.online_write_batch(config, view, data, None)  # type: ignore[arg-type]

    for entity, features in rows.items():
        written = pipeline.written.pop(redis_key("mlops", entity_key("user_id", entity), 3))
        expected_fields = {feature_field("user_activity", name) for name in features}
        assert set(written) == expected_fields | {event_time_field("user_activity")}
        for name, (kind, value) in features.items():
            stored = written[feature_field("user_activity", name)]
            assert stored == encode_value(kind, value)
            assert decode_value(stored) == value
    assert pipeline.written == {}  # no key this module would not compute


def test_the_wire_decoder_reads_every_value_as_feasts_value_message() -> None:
    from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List, StringList

    rng = random.Random(11)
    values = [Value(int64_val=rng.randint(-(2**63), 2**63 - 1)) for _ in range(200)]
    values += [Value(int32_val=rng.randint(-(2**31), 2**31 - 1)) for _ in range(100)]
    values += [Value(double_val=rng.uniform(-1e12, 1e12)) for _ in range(100)]
    values += [Value(float_val=rng.uniform(-1e6, 1e6)) for _ in range(50)]
    values += [
        Value(string_val="".join(rng.choice("aé中\U0001f600") for _ in range(n))) for n in range(40)
    ]
    values += [Value(bytes_val=bytes(rng.randrange(256) for _ in range(n))) for n in range(20)]
    values += [
        Value(unix_timestamp_val=1_700_000_000),
        Value(bool_val=False),
        Value(double_val=float("inf")),
        Value(int64_list_val=Int64List(val=[1, -2])),
        Value(double_list_val=DoubleList(val=[0.5])),
        Value(string_list_val=StringList(val=["a", "b"])),
    ]
    for value in values:
        kind = value.WhichOneof("val")
        expected = getattr(value, kind) if kind else None
        assert decode_value(value.SerializeToString()) == expected, value
    # two fields of the oneof on the wire: the last wins, as for Feast's message
    twice = Value(int64_val=1).SerializeToString() + Value(double_val=2.0).SerializeToString()
    assert decode_value(twice) == 2.0


def test_entity_keys_from_a_checked_prefix_are_feasts_without_serialising() -> None:
    checked = EntityKeys("mlops", 3, "user_id", int_entity=False)
    assert checked.head is not None
    given = EntityKeys("mlops", 3, "user_id", int_entity=False, head=checked.head)
    for entity in ("", "user-9", "ü中" * 20):
        key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=entity)])
        assert given(entity) == _redis_key("mlops", key, entity_key_serialization_version=3)
