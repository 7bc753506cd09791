"""The online reader's pure parts: Feast keys and Feast values (no Redis here)."""

from __future__ import annotations

import random

import pytest
from feast.infra.online_stores.helpers import _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Null, Value

from services.serving.online_features import (
    EntityKeys,
    OnlineFeatureLayout,
    OnlineView,
    decode_value,
)

VIEW = OnlineView(name="user_activity", join_key="user_id", int_entity=False, features=("a", "b"))


def layout(project: str = "mlops", version: int = 3) -> OnlineFeatureLayout:
    return OnlineFeatureLayout(
        project=project, entity_key_serialization_version=version, views=(VIEW,)
    )


def feast_key(project: str, entity: str, version: int = 3) -> bytes:
    key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=entity)])
    return _redis_key(project, key, entity_key_serialization_version=version)


@pytest.mark.parametrize("project", ["mlops", "t0123456789", "ünïcode"])
def test_entity_keys_are_byte_for_byte_feasts(project: str) -> None:
    keys = EntityKeys(layout(project), VIEW)
    rng = random.Random(5)
    alphabet = "abcXYZ019-_.:/ éü中\U0001f600"
    entities = ["", "u", "user-1", "x" * 64] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)
    ]
    for entity in entities:
        assert keys(entity) == feast_key(project, entity), entity


def test_integer_entities_use_feasts_own_helper() -> None:
    view = OnlineView(name="card_activity", join_key="card_id", int_entity=True, features=("a",))
    keys = EntityKeys(layout(), view)
    expected = _redis_key(
        "mlops",
        EntityKey(join_keys=["card_id"], entity_values=[Value(int64_val=42)]),
        entity_key_serialization_version=3,
    )
    assert keys("42") == expected


def test_hash_fields_are_feasts_then_the_event_time() -> None:
    from feast.infra.online_stores.helpers import _mmh3

    assert VIEW.hash_fields == [
        _mmh3("user_activity:a"),
        _mmh3("user_activity:b"),
        "_ts:user_activity",
    ]
    assert layout().join_keys == ["user_id"]
    assert layout().feature_names == ["a", "b"]


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


def test_an_absent_field_is_none() -> None:
    assert decode_value(None) is None
    assert decode_value(b"") is None


def test_refused_connections_open_the_circuit_at_once_slow_reads_only_when_repeated() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from services.serving.online_features import OnlineFeatureReader
    from services.shared.settings import RedisSettings

    reader = OnlineFeatureReader(
        RedisSettings(port=1), layout(), timeout_s=0.1, retry_interval_s=60.0, pool_size=1
    )
    assert reader.available
    for _ in range(OnlineFeatureReader.TIMEOUTS_TO_OPEN - 1):
        reader._failed(TimeoutError())
    assert reader.available  # a busy moment is not an outage
    reader._failed(TimeoutError())
    assert not reader.available

    refused = OnlineFeatureReader(
        RedisSettings(port=1), layout(), timeout_s=0.1, retry_interval_s=60.0, pool_size=1
    )
    refused._failed(RedisConnectionError("Connection refused"))
    assert not refused.available
