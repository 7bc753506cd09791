"""Duplicate detection state in Redis, so that it survives restarts of the service.

One key per event id (``<namespace>:<source topic>:<id>``) holds the source position of the
first record forwarded with that id, for ``ttl_s`` (8 days by default: longer than any
producer retries or replays we expect). ``SET key position NX GET EX ttl`` claims and reads in
one atomic step (Redis >= 7.0); a Lua script does it for a whole batch in one command.

A retried pipeline is safe: a key it already set answers with our own position, which the
router reads as a re-delivery of the same record, and forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from services.shared.settings import RedisSettings


def connect(settings: RedisSettings, *, timeout_s: float = 5.0) -> Redis:
    return Redis(
        host=settings.host,
        port=settings.port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )


# One command per batch, and one argument: the claims as "key<TAB>position" lines, split by
# the script. Packing thousands of separate arguments costs the client (redis-py encodes each
# in Python) more than the validation of the events themselves. Keys and positions never
# hold tabs or newlines (ids are validated printable text; positions are topic/partition/
# offset). The script touches keys it is not told about in KEYS, so it needs a single Redis
# node, not a cluster.
_CLAIM_SCRIPT = r"""
local ttl = ARGV[2]
local before = {}
local n = 0
for key, position in string.gmatch(ARGV[1], "([^\t\n]+)\t([^\n]+)") do
  n = n + 1
  before[n] = redis.call('SET', key, position, 'NX', 'GET', 'EX', ttl)
end
return before
"""


class RedisClaims:
    """``ClaimStore`` on Redis (>= 7.0, a single node)."""

    def __init__(self, client: Redis, *, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._script = client.register_script(_CLAIM_SCRIPT)

    async def claim(self, claims: Sequence[tuple[str, str]]) -> list[str | None]:
        if not claims:
            return []
        lines = "\n".join(f"{key}\t{position}" for key, position in claims)
        answers = await self._script(keys=[], args=[lines, self.ttl_s])
        if len(answers) != len(claims):  # a tab or newline slipped into a key: never expected
            raise ValueError(f"claimed {len(answers)} of {len(claims)} ids")
        return [a.decode() if isinstance(a, bytes) else None for a in answers]
