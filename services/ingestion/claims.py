"""Duplicate detection state in Redis, so that it survives restarts of the service.

One key per event id (``<namespace>:<source topic>:<id>``) holds the source position of the
first record forwarded with that id, for ``ttl_s`` (8 days by default: longer than any
producer retries or replays we expect). ``SET key position NX GET EX ttl`` claims and reads in
one atomic step (Redis >= 7.0), pipelined for a whole batch: one round trip per batch.

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


class RedisClaims:
    """``ClaimStore`` on Redis."""

    def __init__(self, client: Redis, *, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    async def claim(self, claims: Sequence[tuple[str, str]]) -> list[str | None]:
        if not claims:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for key, position in claims:
                pipe.set(key, position, nx=True, get=True, ex=self.ttl_s)
            answers = await pipe.execute()
        return [a.decode() if isinstance(a, bytes) else a for a in answers]
