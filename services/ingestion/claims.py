"""Duplicate detection state in Redis, so that it survives restarts of the service.

A claim maps a key (``<namespace>:<topic tag>:<id>``, or ``<namespace>:archive:...`` for
the archive; ``routing.topic_tag``) to the partition/offset of the first record that claimed
it. Short keys and values matter: Redis reads, parses and stores each claim's bytes, and its
CPU is a fifth of ingestion's cost per event. Claims live in hashes
per time bucket, ``<namespace>:claims:<bucket>`` (field: the key without ``<namespace>:``,
value: the position), ``bucket = claim time // ttl_s``. A claim looks in the current and the
previous bucket and, if the key is in neither, is written to the current one, so an id is
remembered for at least ``ttl_s`` and at most twice that. A bucket is removed (``UNLINK``,
freed in the background) by the first claim two buckets later, and expires a minute after
that in any case.

One Lua script claims a whole batch atomically: two ``HMGET`` and one ``HSET`` for the batch
instead of one ``SET key position NX GET EX ttl`` per id (half the Redis CPU per claim, and
no per-key expiry to keep). Two processes claiming the same id therefore still see one winner:
the script runs alone.

A retried claim is safe: a key it already wrote answers with our own position, which the
router reads as a re-delivery of the same record, and forwards.

Claim time is the clock of the claiming process (bucket boundaries days apart make clock skew
between processes irrelevant). Claims written by earlier layouts (one key per id with its own
TTL; fields naming the whole topic, values topic/partition/offset) are not consulted: after an
upgrade, an event re-sent within the TTL of its first copy is forwarded once more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from services.shared.errors import FailedPrecondition
from services.shared.settings import RedisSettings


def connect(settings: RedisSettings, *, timeout_s: float = 5.0) -> Redis:
    if settings.cluster:
        # the claim script reads and writes keys it computes itself (see below): one node only
        raise FailedPrecondition(
            "ingestion's duplicate detection needs a single Redis node, not a cluster: point "
            "the ingestion service at one (MLOPS_REDIS_HOST, MLOPS_REDIS_CLUSTER=false in its "
            "environment; the prod overlay gives it the Redis `redis`)"
        )
    return Redis(
        host=settings.host,
        port=settings.port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        **settings.client_options(),
    )


# One command per batch, and few arguments: the claims as "field<TAB>position" lines, split by
# the script. Packing thousands of separate arguments costs the client (redis-py encodes each
# in Python) more than the validation of the events themselves. Fields and positions never
# hold tabs or newlines (ids are validated printable text; positions are topic/partition/
# offset). The script touches keys it is not told about in KEYS, so it needs a single Redis
# node, not a cluster.
#
# ARGV: claims, bucket key prefix, bucket width (s), now (epoch s). Returns {n, i, position,
# ...}: the number of claims read, then for each claim that was already held (rare) its index
# (1-based) and the position stored before. A field twice in one batch: the first claims it.
_CLAIM_SCRIPT = r"""
local prefix, width = ARGV[2], tonumber(ARGV[3])
local current = math.floor(tonumber(ARGV[4]) / width)
local fields, positions = {}, {}
local n = 0
for f, p in string.gmatch(ARGV[1], "([^\t\n]+)\t([^\n]+)") do
  n = n + 1
  fields[n] = f
  positions[n] = p
end
local held = {n}
local ask, at = fields, nil
for back = 0, 1 do
  if #ask == 0 then break end
  local got = redis.call('HMGET', prefix .. (current - back), unpack(ask))
  local still, still_at = {}, {}
  for j = 1, #ask do
    local i = at and at[j] or j
    if got[j] then
      held[#held + 1] = i
      held[#held + 1] = got[j]
    else
      still[#still + 1] = ask[j]
      still_at[#still_at + 1] = i
    end
  end
  ask, at = still, still_at
end
local set, first = {}, {}
for j = 1, #ask do
  local i, f = at[j], ask[j]
  if first[f] then
    held[#held + 1] = i
    held[#held + 1] = positions[first[f]]
  else
    first[f] = i
    set[#set + 1] = f
    set[#set + 1] = positions[i]
  end
end
if #set > 0 then
  local key = prefix .. current
  redis.call('HSET', key, unpack(set))
  redis.call('EXPIREAT', key, (current + 2) * width + 60)
end
redis.call('UNLINK', prefix .. (current - 2))
return held
"""

# Lua's unpack() puts every argument on the C stack (LUAI_MAXCSTACK is 8000): batches larger
# than this go as several calls (each atomic on its own; a field in two of them is still
# claimed once, by the first).
_MAX_CLAIMS_PER_CALL = 3000


class RedisClaims:
    """``ClaimStore`` on Redis (a single node). Every key claimed starts with
    ``<namespace>:``."""

    def __init__(
        self,
        client: Redis,
        *,
        ttl_s: int,
        namespace: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1")
        self.client = client
        self.ttl_s = ttl_s
        self.clock = clock
        self._strip = len(namespace) + 1
        self._prefix = f"{namespace}:"
        self._buckets = f"{namespace}:claims:"
        self._script = client.register_script(_CLAIM_SCRIPT)

    def bucket_key(self, moment: float) -> str:
        """The hash holding the claims made at ``moment`` (epoch seconds)."""
        return f"{self._buckets}{int(moment) // self.ttl_s}"

    async def claim(self, claims: Sequence[tuple[str, str]]) -> list[str | None]:
        before: list[str | None] = [None] * len(claims)
        strip, prefix = self._strip, self._prefix
        for start in range(0, len(claims), _MAX_CLAIMS_PER_CALL):
            chunk = claims[start : start + _MAX_CLAIMS_PER_CALL]
            if not all(key.startswith(prefix) for key, _ in chunk):
                raise ValueError(f"a claim key outside the namespace {prefix!r}")
            lines = "\n".join([f"{key[strip:]}\t{position}" for key, position in chunk])
            answer = await self._script(
                keys=[], args=[lines, self._buckets, self.ttl_s, int(self.clock())]
            )
            if answer[0] != len(chunk):  # a tab or newline slipped into a key: never expected
                raise ValueError(f"claimed {answer[0]} of {len(chunk)} ids")
            for n in range(1, len(answer), 2):
                before[start + answer[n] - 1] = answer[n + 1].decode()
        return before
