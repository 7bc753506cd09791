"""Online features for a batch of requests, read from Feast's Redis store in one round trip.

Why not ``FeatureStore.get_online_features(_async)``: measured here (feast 0.49, local Redis),
the SDK spends 2.7 ms on one entity row and ~170 us per row at 256 rows, almost all of it
Python bookkeeping (entity-row dicts, response conversion) on the CPU serving needs for gRPC;
the async variant is no faster (it only makes the Redis call async). Serving reads the same
hashes with one pipelined ``HMGET`` per distinct entity over a pooled ``redis.asyncio``
connection, which costs a few microseconds per row (``loadtests/bench_serving.py`` measures
both side by side).

What it reads is exactly what Feast wrote, because the layout comes from Feast itself:
- the feature service, its views, their features and entity join keys are read from the
  Feast registry (``open_store``), not restated here;
- keys are ``feast.infra.online_stores.helpers._redis_key`` (entity key serialised with the
  store's ``entity_key_serialization_version`` + project), fields are ``_mmh3("view:feature")``
  and ``_ts:view``, values are Feast ``ValueProto`` messages: Feast's own helpers and types,
  the same ones ``RedisOnlineStore.online_read`` uses;
- a missing hash or field reads as ``None`` (an entity Feast has never written), as in the SDK.
The integration tests compare this reader with ``get_online_features`` on values pushed
through the Feast SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hiredis
import redis.asyncio as aioredis
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.shared.errors import Unavailable
from services.shared.logging import get_logger
from services.shared.settings import RedisSettings

if TYPE_CHECKING:
    from feast import FeatureStore

log = get_logger("serving.features")

_VALUE_CACHE_SIZE = 100_000
# HMGET of many keys as one command: the Redis client's per-command cost in Python
# (packing, reply dispatch) is paid once per batch instead of once per entity. ARGV holds,
# per view, its key count, its field count and its fields; KEYS the views' keys in order.
# All keys of a batch must live on one node (true of Feast's single-node Redis store).
_HMGET_MANY = """
local out = {}
local k = 1
local a = 1
while a <= #ARGV do
  local nkeys = tonumber(ARGV[a])
  local nfields = tonumber(ARGV[a + 1])
  local fields = {unpack(ARGV, a + 2, a + 1 + nfields)}
  local view = {}
  for i = 1, nkeys do
    view[i] = redis.call('HMGET', KEYS[k], unpack(fields))
    k = k + 1
  end
  out[#out + 1] = view
  a = a + 2 + nfields
end
return out
"""


@dataclass(frozen=True)
class OnlineView:
    """One feature view as it lies in Redis."""

    name: str
    join_key: str
    int_entity: bool  # entity values are int64 (else strings)
    features: tuple[str, ...]

    @property
    def hash_fields(self) -> list[bytes | str]:
        """The hash fields of the features, then the view's event-time field (Feast's order)."""
        return [*(_mmh3(f"{self.name}:{f}") for f in self.features), f"_ts:{self.name}"]


@dataclass(frozen=True)
class OnlineFeatureLayout:
    """A feature service's views as stored in Redis under one Feast project."""

    project: str
    entity_key_serialization_version: int
    views: tuple[OnlineView, ...]

    @classmethod
    def from_store(cls, store: FeatureStore, feature_service: str) -> OnlineFeatureLayout:
        """The layout of ``feature_service`` from the Feast registry the store reads."""
        from feast import ValueType

        service = store.get_feature_service(feature_service)
        views = []
        for projection in service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            if len(view.entities) != 1:
                raise ValueError(f"view {view.name}: serving reads single-entity views only")
            entity = store.get_entity(view.entities[0])
            if entity.value_type not in (ValueType.STRING, ValueType.INT64):
                raise ValueError(f"entity {entity.name}: unsupported key type {entity.value_type}")
            views.append(
                OnlineView(
                    name=view.name,
                    join_key=entity.join_key,
                    int_entity=entity.value_type == ValueType.INT64,
                    features=tuple(f.name for f in projection.features),
                )
            )
        return cls(
            project=store.config.project,
            entity_key_serialization_version=store.config.entity_key_serialization_version,
            views=tuple(views),
        )

    @property
    def join_keys(self) -> list[str]:
        return [v.join_key for v in self.views]

    @property
    def feature_names(self) -> list[str]:
        return [f for v in self.views for f in v.features]


def decode_value(raw: bytes | None) -> Any:
    """A stored Feast ``ValueProto`` as a Python value; ``None`` when absent or unset."""
    if not raw:
        return None
    value = ValueProto.FromString(raw)
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    return getattr(value, kind)


class EntityKeys:
    """Feast's Redis key for each entity of one view, at a fraction of Feast's cost.

    Feast's ``_redis_key`` (serialise an ``EntityKey`` proto, append the project) costs about
    25 us per entity, more than the rest of a read. For a single string join key the key is
    ``head + <uint32 length> + utf-8 value + project``: ``head`` is taken from Feast's own
    output for the empty string, and the rule is checked against Feast for a set of probe
    values when the view is loaded. If Feast's layout ever differs, every key comes from
    ``_redis_key`` itself.
    """

    _PROBES = ("", "u", "user-12345", "ü-é-中", "x" * 300)

    def __init__(self, layout: OnlineFeatureLayout, view: OnlineView) -> None:
        self._project = layout.project
        self._version = layout.entity_key_serialization_version
        self._view = view
        self._head: bytes | None = None
        self._tail = layout.project.encode()
        if not view.int_entity:
            empty = self.feast_key("")
            head = empty[: len(empty) - 4 - len(self._tail)]
            self._head = head
            if any(self._fast(p) != self.feast_key(p) for p in self._PROBES):
                self._head = None
                log.warning("feast_key_layout_unknown", view=view.name, using="feast helper")

    def feast_key(self, entity: str) -> bytes:
        """The key exactly as Feast builds it."""
        value = (
            ValueProto(int64_val=int(entity))
            if self._view.int_entity
            else ValueProto(string_val=entity)
        )
        key = EntityKeyProto(join_keys=[self._view.join_key], entity_values=[value])
        return _redis_key(self._project, key, entity_key_serialization_version=self._version)

    def _fast(self, entity: str) -> bytes:
        assert self._head is not None
        encoded = entity.encode()
        return b"".join((self._head, len(encoded).to_bytes(4, "little"), encoded, self._tail))

    def __call__(self, entity: str) -> bytes:
        if self._head is None:
            return self.feast_key(entity)
        return self._fast(entity)


class OnlineFeatureReader:
    """Reads every view of the layout for a batch of entity rows in one Redis command.

    When Redis refuses or drops connections (or a read times out ``TIMEOUTS_TO_OPEN`` times
    in a row) it does not try Redis again for ``retry_interval_s``: requests in between
    fail fast (the caller degrades to defaults) instead of each waiting for a connection
    attempt; the next read after the interval finds out whether Redis is back. A single slow
    read (this process was busy, not Redis) fails only its own batch.
    """

    TIMEOUTS_TO_OPEN = 3

    def __init__(
        self,
        settings: RedisSettings,
        layout: OnlineFeatureLayout,
        *,
        timeout_s: float,
        retry_interval_s: float,
        pool_size: int,
    ) -> None:
        self.layout = layout
        self._timeout_s = timeout_s
        self._retry_interval_s = retry_interval_s
        self._fields = {v.name: v.hash_fields for v in layout.views}
        self._retry_at = 0.0
        self._timeouts_in_a_row = 0
        self._last_warning = 0.0
        self._address = settings.connection_string
        pool = aioredis.BlockingConnectionPool(
            host=settings.host,
            port=settings.port,
            max_connections=pool_size,
            timeout=timeout_s,  # waiting for a free pooled connection
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script_sha = hashlib.sha1(_HMGET_MANY.encode(), usedforsecurity=False).hexdigest()
        self._values: dict[bytes, Any] = {}
        self._keys = {v.name: EntityKeys(layout, v) for v in layout.views}

    @property
    def available(self) -> bool:
        """False while inside the retry interval after a failure."""
        return time.monotonic() >= self._retry_at

    async def read(
        self, entities: Mapping[str, Sequence[str]], timeout_s: float | None = None
    ) -> dict[str, list[Any]]:
        """Feature name -> one value per row (``None``: never written) for the given rows.

        ``entities`` maps each view's join key to the rows' entity ids. Raises
        ``Unavailable`` when Redis cannot answer within the timeout.
        """
        if not self.available:
            raise Unavailable(f"online store {self._address} unavailable (retrying shortly)")
        budget = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)
        if budget <= 0:
            raise Unavailable("no time left to read online features")
        plan: list[tuple[OnlineView, list[str], list[int]]] = []
        for view in self.layout.views:
            ids = entities[view.join_key]
            # each distinct entity is read once, however many rows name it
            positions: dict[str, int] = {}
            row_index = [positions.setdefault(e, len(positions)) for e in ids]
            plan.append((view, list(positions), row_index))
        try:
            async with asyncio.timeout(budget):
                replies = await self._fetch(plan)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise Unavailable(f"online store {self._address} unavailable: {exc!r}") from exc
        self._timeouts_in_a_row = 0
        columns: dict[str, list[Any]] = {}
        decode = self._decode
        for (view, _, row_index), hashes in zip(plan, replies, strict=True):
            # the last field of each hash is the event time, which serving does not use
            decoded = [[decode(raw) for raw in fields[:-1]] for fields in hashes]
            for position, name in enumerate(view.features):
                column = [row[position] for row in decoded]
                columns[name] = [column[i] for i in row_index]
        return columns

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            self._timeouts_in_a_row += 1
            opened = self._timeouts_in_a_row >= self.TIMEOUTS_TO_OPEN
        else:
            opened = True
        if opened:
            self._retry_at = now + self._retry_interval_s
        if opened or now - self._last_warning >= 1.0:  # at most a line a second otherwise
            self._last_warning = now
            log.warning(
                "online_store_unavailable",
                address=self._address,
                error=repr(exc),
                retry_in_ms=round(self._retry_interval_s * 1000) if opened else 0,
            )

    def _decode(self, raw: bytes | None) -> Any:
        """``decode_value`` through a cache: counts, rates and countries repeat endlessly."""
        if raw is None:
            return None
        cache = self._values
        try:
            return cache[raw]
        except KeyError:
            if len(cache) >= _VALUE_CACHE_SIZE:
                cache.clear()
            value = cache[raw] = decode_value(raw)
            return value

    async def _fetch(self, plan: list[tuple[OnlineView, list[str], list[int]]]) -> list[Any]:
        """One command for the whole batch: HMGET of every entity of every view."""
        keys: list[bytes] = []
        args: list[Any] = []
        for view, distinct, _ in plan:
            key = self._keys[view.name]
            keys += [key(entity) for entity in distinct]
            fields = self._fields[view.name]
            args += [len(distinct), len(fields), *fields]
        command = ("EVALSHA", self._script_sha, len(keys), *keys, *args)
        try:
            return list(await self._execute(command))
        except NoScriptError:
            # a restarted Redis has forgotten the script: load it again, once
            await self._redis.script_load(_HMGET_MANY)
            return list(await self._execute(command))

    async def _execute(self, command: tuple[Any, ...]) -> Any:
        """Send one command on a pooled connection, packed by hiredis (C) rather than by
        redis-py's Python packer, which costs ~0.3 ms for a batch's key list."""
        pool = self._redis.connection_pool
        connection = await pool.get_connection(command[0])
        try:
            await connection.send_packed_command(hiredis.pack_command(command), check_health=False)
            return await connection.read_response()
        except ResponseError:
            raise  # an error reply (NOSCRIPT): the connection is fine
        except BaseException:
            # a timeout or cancellation mid-reply leaves the connection unusable
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def close(self) -> None:
        await self._redis.close(close_connection_pool=True)
