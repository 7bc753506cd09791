"""In-memory stand-ins for the stores of pure domain classes, for unit tests only (integration
tests use the real ones: Redis, the faust table).

- ``InMemoryClaims``: the ingestion ``ClaimStore`` (services/ingestion/routing.py) in a dict;
  the service uses ``RedisClaims``.
- ``SourceRecord``: a ``ConsumedRecord`` built by hand; the service reads aiokafka's.
- ``MemoryRecordLog``: the features ``RecordLog`` (services/features/windows.py) in a dict;
  rebuilding state from it checks persistence. The service uses a faust table.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

RecordKey = tuple[str, ...]


@dataclass(slots=True)
class SourceRecord:
    """What the ingestion router reads from Kafka, built by hand."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int | None = None


class InMemoryClaims:
    """The first position claimed for each key is kept; a claim answers what was there."""

    def __init__(self) -> None:
        self.positions: dict[str, str] = {}

    async def claim(self, claims: Sequence[tuple[str, str]]) -> list[str | None]:
        before: list[str | None] = []
        for key, position in claims:
            before.append(self.positions.get(key))
            self.positions.setdefault(key, position)
        return before


class MemoryRecordLog:
    """One value per key, with the partition it was written to."""

    def __init__(self) -> None:
        self.records: dict[RecordKey, tuple[list[Any], int]] = {}

    def put(self, key: RecordKey, value: list[Any], partition: int) -> None:
        self.records[key] = (value, partition)

    def remove(self, key: RecordKey, partition: int) -> None:
        self.records.pop(key, None)

    def items(self) -> Iterator[tuple[Hashable, list[Any]]]:
        for key, (value, _) in self.records.items():
            yield key, value
