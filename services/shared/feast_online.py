"""Feast's Redis online store, ordered by full-precision event time.

Feast 0.49's ``RedisOnlineStore`` skips a write whose event time, truncated to whole seconds,
is not newer than the stored one. Two transactions of one user within the same second would
then leave the second one's features unwritten, and a late event (recomputed at the user's
latest event time) would never reach Redis. This store keeps Feast's Redis layout and read
path unchanged and only changes that rule: a row is written unless it is strictly older, to
the nanosecond, than what is stored. Configured in feature_store.yaml as
``services.shared.feast_online.EventTimeRedisOnlineStore``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from feast import FeatureView, RepoConfig, utils
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp


class EventTimeRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    # Feast finds a custom store by this literal; it narrows the base class's "redis"
    type: Literal["services.shared.feast_online.EventTimeRedisOnlineStore"] = (
        "services.shared.feast_online.EventTimeRedisOnlineStore"  # type: ignore[assignment]
    )


class EventTimeRedisOnlineStore(RedisOnlineStore):
    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        store_config = config.online_store
        client = self._get_client(store_config)
        ts_key = f"_ts:{table.name}"
        keys = [
            _redis_key(
                config.project,
                entity_key,
                entity_key_serialization_version=config.entity_key_serialization_version,
            )
            for entity_key, _, _, _ in data
        ]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, ts_key)
            previous = pipe.execute()
            for key, prev, (_, values, event_time, _) in zip(keys, previous, data, strict=True):
                ts = Timestamp()
                ts.FromDatetime(utils.make_tzaware(event_time))
                if prev:
                    prev_ts = Timestamp()
                    prev_ts.ParseFromString(prev)
                    if (ts.seconds, ts.nanos) < (prev_ts.seconds, prev_ts.nanos):
                        continue  # an older state than the stored one: keep the newer
                mapping = {ts_key: ts.SerializeToString()}
                for name, value in values.items():
                    mapping[_mmh3(f"{table.name}:{name}")] = value.SerializeToString()
                pipe.hset(key, mapping=mapping)
                if store_config.key_ttl_seconds:
                    pipe.expire(name=key, time=store_config.key_ttl_seconds)
            pipe.execute()
        if progress:
            progress(len(data))
