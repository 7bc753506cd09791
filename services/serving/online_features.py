"""Online features for a batch of requests, read from Feast's Redis store in one round trip.

Why not ``FeatureStore.get_online_features(_async)``: measured here (feast 0.49, local Redis),
the SDK spends 2.7 ms on one entity row and ~170 us per row at 256 rows, almost all of it
Python bookkeeping (entity-row dicts, response conversion) on the CPU serving needs for gRPC;
the async variant is no faster (it only makes the Redis call async). Serving reads the same
hashes with one pipelined ``HMGET`` per distinct entity over a pooled ``redis.asyncio``
connection, which costs a few microseconds per row (``loadtests/bench_serving.py`` measures
both side by side).

What it reads is exactly what Feast wrote:
- the feature service, its views, their features and entity join keys are read from the
  Feast registry (``open_store``), not restated here;
- keys, fields and values follow Feast's Redis layout as services/shared/feast_layout.py
  states it (the writer uses the same module; a unit test holds it to Feast's own bytes);
- a missing hash or field reads as ``None`` (an entity Feast has never written), as in the SDK.
The integration tests compare this reader with ``get_online_features`` on values pushed
through the Feast SDK.

Importing Feast takes seconds (4 s measured on the 2-core machine), which a restarted serving
process must not spend before it answers: the layout (views, fields and the checked key
prefix of each view) is kept as JSON (``LayoutCache``, beside the hash of the Feast registry
it came from), and with it nothing here imports Feast.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.shared.errors import Unavailable
from services.shared.feast_layout import EntityKeys, decode_value, event_time_field, feature_field
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
        return [*(feature_field(self.name, f) for f in self.features), event_time_field(self.name)]


@dataclass(frozen=True)
class OnlineFeatureLayout:
    """A feature service's views as stored in Redis under one Feast project."""

    project: str
    entity_key_serialization_version: int
    views: tuple[OnlineView, ...]
    # per view: the checked prefix of its Redis keys (``EntityKeys.head``), once computed
    key_heads: Mapping[str, bytes] = field(default_factory=dict)

    def entity_keys(self, view: OnlineView) -> EntityKeys:
        return EntityKeys(
            self.project,
            self.entity_key_serialization_version,
            view.join_key,
            int_entity=view.int_entity,
            head=self.key_heads.get(view.name),
        )

    def with_key_heads(self) -> OnlineFeatureLayout:
        """This layout with the checked key prefix of each view (needs Feast; what
        ``to_json`` keeps, so that a restart does not)."""
        heads = {}
        for view in self.views:
            head = self.entity_keys(view).head
            if head is not None:
                heads[view.name] = head
        return OnlineFeatureLayout(
            self.project, self.entity_key_serialization_version, self.views, heads
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "project": self.project,
                "entity_key_serialization_version": self.entity_key_serialization_version,
                "views": [
                    {
                        "name": v.name,
                        "join_key": v.join_key,
                        "int_entity": v.int_entity,
                        "features": list(v.features),
                    }
                    for v in self.views
                ],
                "key_heads": {view: head.hex() for view, head in self.key_heads.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> OnlineFeatureLayout:
        data = json.loads(text)
        return cls(
            project=data["project"],
            entity_key_serialization_version=int(data["entity_key_serialization_version"]),
            views=tuple(
                OnlineView(v["name"], v["join_key"], bool(v["int_entity"]), tuple(v["features"]))
                for v in data["views"]
            ),
            key_heads={view: bytes.fromhex(head) for view, head in data["key_heads"].items()},
        )

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
        ).with_key_heads()

    @property
    def join_keys(self) -> list[str]:
        return [v.join_key for v in self.views]

    @property
    def feature_names(self) -> list[str]:
        return [f for v in self.views for f in v.features]


class LayoutCache:
    """The layout resolved from a Feast registry, kept as JSON beside a hash of that registry.

    ``read`` gives the layout only while the registry file is byte for byte the one it was
    resolved from (an apply changes it), so a restart skips Feast without ever serving an
    outdated layout."""

    def __init__(self, path: Path, registry_path: Path, feature_service: str) -> None:
        self.path = path
        self.registry_path = registry_path
        self.feature_service = feature_service

    def _fingerprint(self) -> str | None:
        try:
            registry = self.registry_path.read_bytes()
        except OSError:
            return None
        digest = hashlib.sha256(registry)
        digest.update(self.feature_service.encode())
        return digest.hexdigest()

    def read(self) -> OnlineFeatureLayout | None:
        fingerprint = self._fingerprint()
        if fingerprint is None:
            return None
        try:
            cached = json.loads(self.path.read_text())
            if cached.get("registry_sha256") != fingerprint:
                return None
            return OnlineFeatureLayout.from_json(cached["layout"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or not ours to trust: resolved again

    def write(self, layout: OnlineFeatureLayout) -> None:
        fingerprint = self._fingerprint()
        if fingerprint is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(
            json.dumps({"registry_sha256": fingerprint, "layout": layout.to_json()})
        )
        temporary.replace(self.path)  # atomic: several workers may write it


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
        self._address = settings.address  # never the credentials
        options = settings.client_options()
        # a Redis Cluster spreads a batch's keys over its nodes: no single script can read
        # them; the cluster client pipelines one HMGET per key, grouped by node
        self._cluster: aioredis.RedisCluster | None = None
        if settings.cluster:
            self._cluster = aioredis.RedisCluster(
                host=settings.host,
                port=settings.port,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                socket_keepalive=True,
                max_connections=pool_size,
                **options,
            )
        if options.pop("ssl", False):
            options["connection_class"] = aioredis.SSLConnection
        pool = aioredis.BlockingConnectionPool(
            host=settings.host,
            port=settings.port,
            max_connections=pool_size,
            timeout=timeout_s,  # waiting for a free pooled connection
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            **options,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script_sha = hashlib.sha1(_HMGET_MANY.encode(), usedforsecurity=False).hexdigest()
        self._values: dict[bytes, Any] = {}
        self._keys = {v.name: layout.entity_keys(v) for v in layout.views}

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
        if self._cluster is not None:
            return await self._fetch_from_cluster(plan)
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

    async def _fetch_from_cluster(
        self, plan: list[tuple[OnlineView, list[str], list[int]]]
    ) -> list[Any]:
        """The same replies as the script's, from one pipeline of HMGETs over the cluster
        (one round trip per node that holds keys of the batch)."""
        assert self._cluster is not None
        async with self._cluster.pipeline() as pipe:
            for view, distinct, _ in plan:
                key = self._keys[view.name]
                fields = self._fields[view.name]
                for entity in distinct:
                    pipe.hmget(key(entity), fields)
            flat = await pipe.execute()
        replies: list[Any] = []
        at = 0
        for _, distinct, _ in plan:
            replies.append(flat[at : at + len(distinct)])
            at += len(distinct)
        return replies

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
        if self._cluster is not None:
            await self._cluster.close()
