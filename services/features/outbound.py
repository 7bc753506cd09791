"""Records the features service produces: table changelogs and re-keyed facts, in batches.

Every transaction makes three changelog records and two facts for other agents. Sent one
``send`` at a time (faust's ``send_soon``, or aiokafka's ``send``) they cost more CPU than
everything else the service does per event; here they go through the shared
``RecordSender`` (one record batch per topic partition) at the end of each batch of events,
in the order they were added (so each partition keeps its order), with the dead letters of
events the service could not decode (``add_record``). Facts go
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

from services.features.events import (
    MAX_FACTS_PER_RECORD,
    MerchantFact,
    TransactionRef,
    encode_facts,
)
from services.shared.partitioning import murmur2
from services.shared.sender import OutboundRecord, RecordSender

Fact = TransactionRef | MerchantFact


def partition_for_key(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (Java client and aiokafka alike)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class OutboundRecords:
    def __init__(self, sender: RecordSender, partitions: int, max_queued_sends: int = 256) -> None:
        self._sender = sender
        self._partitions = partitions
        self._pending: list[OutboundRecord] = []
        self._facts: dict[tuple[str, int], list[Any]] = defaultdict(list)
        self._in_flight: list[asyncio.Future[Any]] = []
        self._queue: asyncio.Queue[list[OutboundRecord]] = asyncio.Queue(max_queued_sends)
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        self._pending.append(OutboundRecord(topic, key, value, partition=partition))

    def add_record(self, record: OutboundRecord) -> None:
        """Send ``record`` with the others (a dead letter, say; partitioned by its key when
        it names no partition)."""
        self._pending.append(record)

    def add_fact(self, topic: str, key: bytes, fact: Fact) -> None:
        """Route a fact to the partition of ``key``; sent with others as one record."""
        self._facts[(topic, partition_for_key(key, self._partitions))].append(fact)

    @property
    def pending(self) -> int:
        return sum(len(f) for f in self._facts.values()) + len(self._pending)

    async def send(self) -> None:
        """Hand everything added so far to the sender (which keeps the order of the calls)."""
        self._raise_failure()
        facts, self._facts = self._facts, defaultdict(list)
        for (topic, partition), routed in facts.items():
            for start in range(0, len(routed), MAX_FACTS_PER_RECORD):
                chunk = routed[start : start + MAX_FACTS_PER_RECORD]
                self.add(topic, partition, None, encode_facts(chunk))
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._send_forever())
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
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _send_forever(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                if self._failure is None:  # after a failure nothing more goes out
                    deliveries = await self._sender.submit(pending)
                    self._in_flight.extend(d.future for d in deliveries)
                    self._check_delivered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  # raised by the next send/flush
                self._failure = exc
            finally:
                self._queue.task_done()

    def _check_delivered(self) -> None:
        """Forget delivered batches; a failed delivery raises."""
        still: list[asyncio.Future[Any]] = []
        for future in self._in_flight:
            if not future.done():
                still.append(future)
            elif future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        self._in_flight = still
