"""Feast's Redis online store, ordered by full-precision event time.

Feast 0.49's ``RedisOnlineStore`` skips a write whose event time, truncated to whole seconds,
is not newer than the stored one. Two transactions of one user within the same second would
then leave the second one's features unwritten, and a late event (recomputed at the user's
latest event time) would never reach Redis. This store keeps Feast's Redis layout
(services/shared/feast_layout.py) and read path unchanged and only changes that rule: a row is
written unless it is strictly older, to the nanosecond, than what is stored. Configured in
feature_store.yaml as ``services.shared.feast_online.EventTimeRedisOnlineStore``.

On a plain Redis the comparison and the write run in one Lua script per batch: one round
trip instead of two, and atomic, so two writers of one entity (a worker handing a partition
over to another) can never let an older row overwrite a newer one. Redis Cluster cannot run a
script over keys of different slots, so there the two-step pipeline is used.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from feast import FeatureView, RepoConfig, utils
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from services.shared.feast_layout import event_time_field, feature_field, redis_key


class EventTimeRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    # Feast finds a custom store by this literal; it narrows the base class's "redis"
    type: Literal["services.shared.feast_online.EventTimeRedisOnlineStore"] = (
        "services.shared.feast_online.EventTimeRedisOnlineStore"  # type: ignore[assignment]
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# KEYS: the entities' hashes. ARGV: the event-time field, a TTL (0: none), then per key:
# seconds, nanos, the serialized Timestamp, the number of feature fields, field/value pairs.
# The stored Timestamp is a protobuf message: field 1 (seconds) and 2 (nanos), varints.
_WRITE_UNLESS_OLDER = """
local function stored_time(bytes)
  local seconds, nanos, i = 0, 0, 1
  while i <= #bytes do
    local tag = string.byte(bytes, i)
    i = i + 1
    local value, scale, byte = 0, 1, 128
    while byte >= 128 do
      byte = string.byte(bytes, i)
      i = i + 1
      value = value + (byte % 128) * scale
      scale = scale * 128
    end
    if tag == 8 then seconds = value elseif tag == 16 then nanos = value end
  end
  return seconds, nanos
end
local ts_field, ttl = ARGV[1], tonumber(ARGV[2])
local at, written = 3, 0
for _, key in ipairs(KEYS) do
  local seconds, nanos = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local ts, fields = ARGV[at + 2], tonumber(ARGV[at + 3])
  local first = at + 4
  at = first + 2 * fields
  local stored = redis.call('HGET', key, ts_field)
  local older = false
  if stored then
    local s_seconds, s_nanos = stored_time(stored)
    older = seconds < s_seconds or (seconds == s_seconds and nanos < s_nanos)
  end
  if not older then
    redis.call('HSET', key, ts_field, ts, unpack(ARGV, first, at - 1))
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    written = written + 1
  end
end
return written
"""


# (redis key, event time in epoch microseconds, [(feature name, encoded Value)]): a writer that
# knows its rows' types (the features service) encodes them with feast_layout.encode_value and
# entity_redis_key, skipping the protos per value; the Redis layout is the same either way.
EncodedRow = tuple[bytes, int, list[tuple[str, bytes]]]


class EventTimeRedisOnlineStore(RedisOnlineStore):
    # hashed Redis field names per (view, feature): computed once, not once per row
    _field_names: dict[tuple[str, str], bytes] = {}

    def _field(self, view: str, feature: str) -> bytes:
        name = self._field_names.get((view, feature))
        if name is None:
            name = self._field_names[(view, feature)] = feature_field(view, feature)
        return name

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        rows: list[EncodedRow] = []
        for entity_key, values, event_time, _ in data:
            key = redis_key(config.project, entity_key, config.entity_key_serialization_version)
            delta = utils.make_tzaware(event_time) - _EPOCH
            event_us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            encoded = [(name, value.SerializeToString()) for name, value in values.items()]
            rows.append((key, event_us, encoded))
        self.online_write_encoded(config, table.name, rows)
        if progress:
            progress(len(data))

    def online_write_encoded(self, config: RepoConfig, view: str, rows: list[EncodedRow]) -> None:
        """Write pre-encoded rows of ``view`` (at most one per key), unless strictly older."""
        if not rows:
            return
        store_config = config.online_store
        client = self._get_client(store_config)
        if store_config.redis_type == RedisType.redis_cluster:
            self._write_in_two_steps(client, store_config, view, rows)
            return
        field = self._field
        args: list[Any] = [event_time_field(view), store_config.key_ttl_seconds or 0]
        for _, event_us, values in rows:
            seconds, micros = divmod(event_us, 1_000_000)
            ts = Timestamp(seconds=seconds, nanos=micros * 1000)
            args += [seconds, micros * 1000, ts.SerializeToString(), len(values)]
            for name, value in values:
                args += [field(view, name), value]
        self._script(client)(keys=[key for key, _, _ in rows], args=args)

    def _script(self, client: Any) -> Any:
        script = getattr(self, "_write_script", None)
        if script is None:
            script = self._write_script = client.register_script(_WRITE_UNLESS_OLDER)
        return script

    def _write_in_two_steps(
        self, client: Any, store_config: Any, view: str, rows: list[EncodedRow]
    ) -> None:
        ts_key = event_time_field(view)
        with client.pipeline(transaction=False) as pipe:
            for key, _, _ in rows:
                pipe.hget(key, ts_key)
            previous = pipe.execute()
            for (key, event_us, values), prev in zip(rows, previous, strict=True):
                seconds, micros = divmod(event_us, 1_000_000)
                ts = Timestamp(seconds=seconds, nanos=micros * 1000)
                if prev:
                    prev_ts = Timestamp()
                    prev_ts.ParseFromString(prev)
                    if (ts.seconds, ts.nanos) < (prev_ts.seconds, prev_ts.nanos):
                        continue  # an older state than the stored one: keep the newer
                mapping: dict[str | bytes, bytes] = {ts_key: ts.SerializeToString()}
                for name, value in values:
                    mapping[self._field(view, name)] = value
                pipe.hset(key, mapping=mapping)
                if store_config.key_ttl_seconds:
                    pipe.expire(name=key, time=store_config.key_ttl_seconds)
            pipe.execute()
