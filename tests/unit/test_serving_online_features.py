"""The online reader's pure parts: the layout of a feature service and the circuit breaker
(no Redis here; Feast's keys and values: test_feast_layout.py)."""

from __future__ import annotations

from pathlib import Path

from services.serving.online_features import OnlineFeatureLayout, OnlineView

VIEW = OnlineView(name="user_activity", join_key="user_id", int_entity=False, features=("a", "b"))


def layout(project: str = "mlops", version: int = 3) -> OnlineFeatureLayout:
    return OnlineFeatureLayout(
        project=project, entity_key_serialization_version=version, views=(VIEW,)
    )


def test_hash_fields_are_feasts_then_the_event_time() -> None:
    from feast.infra.online_stores.helpers import _mmh3

    # what serving asks Redis for, in its order: the features, the event time last
    assert VIEW.hash_fields == [
        _mmh3("user_activity:a"),
        _mmh3("user_activity:b"),
        "_ts:user_activity",
    ]
    assert layout().join_keys == ["user_id"]
    assert layout().feature_names == ["a", "b"]


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


def test_a_layout_is_cached_while_the_registry_it_came_from_is_unchanged(tmp_path: Path) -> None:
    from services.serving.online_features import LayoutCache

    registry = tmp_path / "registry.db"
    cache = LayoutCache(tmp_path / "serving" / "layout.json", registry, "fraud_model_v1")
    resolved = layout().with_key_heads()
    assert resolved.key_heads["user_activity"]
    cache.write(resolved)  # no registry yet: nothing to tie it to, nothing kept
    assert cache.read() is None
    registry.write_bytes(b"applied once")
    cache.write(resolved)
    again = cache.read()
    assert again == resolved
    assert again is not None
    # keys from the cached prefix equal those of a layout checked afresh
    assert again.entity_keys(VIEW)("user-9") == layout().entity_keys(VIEW)("user-9")
    registry.write_bytes(b"applied twice")  # an apply: resolved from the registry again
    assert cache.read() is None
    assert LayoutCache(cache.path, registry, "another_service").read() is None
