"""Records the features service produces: table changelogs and re-keyed facts, in batches.

Every transaction makes three changelog records and two facts for other agents. Sent one
``send`` at a time (faust's ``send_soon``, or aiokafka's ``send``) they cost more CPU than
everything else the service does per event; here they are appended to one aiokafka
``BatchBuilder`` per topic partition and submitted with ``send_batch`` at the end of each
batch of events, in the order they were added (so each partition keeps its order). Facts go
further: all the facts of a batch bound for one partition travel as one record
(events.encode_facts), so the receiving agent handles one faust event, not one per fact.

Facts are routed like Kafka's default partitioner places a key (murmur2 of the key bytes),
which is how the ingestion service's producer places the labels that the transaction
references must meet (co-partitioning).

Sending happens in a task of its own, in the order ``send`` was called: an agent hands its
batch's records over and goes on (it waits only when ``max_queued_sends`` hand-overs wait:
backpressure). aiokafka keeps one produce request in flight per broker and one pending batch
per partition, and waits in ``send_batch`` until the previous one left, so an agent awaiting
its sends waited about one broker round trip per batch, and so did every event behind it,
before its feature rows could go online.

Delivery: ``flush`` waits until the broker has acknowledged everything sent; the sink calls
it before acknowledging input events, so an input offset is never committed before what it
produced is durable. A failed delivery is raised by the next ``send`` or ``flush`` (the
worker must not go on).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaProducer

from services.features.events import (
    MAX_FACTS_PER_RECORD,
    MerchantFact,
    TransactionRef,
    encode_facts,
)
from services.shared.partitioning import murmur2

Fact = TransactionRef | MerchantFact
Record = tuple[bytes | None, bytes | None]  # key, value (None: a tombstone)


def partition_for_key(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (Java client and aiokafka alike)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


Pending = dict[tuple[str, int], list[Record]]


class OutboundRecords:
    def __init__(
        self, producer: AIOKafkaProducer, partitions: int, max_queued_sends: int = 256
    ) -> None:
        self._producer = producer
        self._partitions = partitions
        self._pending: Pending = defaultdict(list)
        self._facts: dict[tuple[str, int], list[Any]] = defaultdict(list)
        self._in_flight: list[asyncio.Future[Any]] = []
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(max_queued_sends)
        self._sender: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        self._pending[(topic, partition)].append((key, value))

    def add_fact(self, topic: str, key: bytes, fact: Fact) -> None:
        """Route a fact to the partition of ``key``; sent with others as one record."""
        self._facts[(topic, partition_for_key(key, self._partitions))].append(fact)

    @property
    def pending(self) -> int:
        facts = sum(len(f) for f in self._facts.values())
        return facts + sum(len(records) for records in self._pending.values())

    async def send(self) -> None:
        """Hand everything added so far to the sender (which keeps the order of the calls)."""
        self._raise_failure()
        facts, self._facts = self._facts, defaultdict(list)
        for (topic, partition), routed in facts.items():
            for start in range(0, len(routed), MAX_FACTS_PER_RECORD):
                chunk = routed[start : start + MAX_FACTS_PER_RECORD]
                self.add(topic, partition, None, encode_facts(chunk))
        pending, self._pending = self._pending, defaultdict(list)
        if not pending:
            return
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_forever())
        await self._queue.put(pending)

    async def flush(self) -> None:
        """Send what is pending and wait until the broker acknowledged all of it."""
        await self.send()
        await self._queue.join()
        self._raise_failure()
        in_flight, self._in_flight = self._in_flight, []
        if in_flight:
            await asyncio.gather(*in_flight)  # a delivery error propagates: nothing is acked

    async def close(self) -> None:
        """Stop the sender (what it has not sent yet is not sent)."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _send_forever(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                if self._failure is None:  # after a failure nothing more goes out
                    await self._submit_all(pending)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # raised by the next send/flush
                self._failure = exc
            finally:
                self._queue.task_done()

    async def _submit_all(self, pending: Pending) -> None:
        for (topic, partition), records in pending.items():
            batch = self._producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    await self._submit(batch, topic, partition)
                    batch = self._producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a record for {topic} exceeds the producer batch size")
            await self._submit(batch, topic, partition)
        self._check_delivered()

    async def _submit(self, batch: Any, topic: str, partition: int) -> None:
        if batch.record_count():
            future = await self._producer.send_batch(batch, topic, partition=partition)
            self._in_flight.append(future)

    def _check_delivered(self) -> None:
        """Forget delivered batches; a failed delivery raises."""
        still: list[asyncio.Future[Any]] = []
        for future in self._in_flight:
            if not future.done():
                still.append(future)
            elif future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._in_flight = still
