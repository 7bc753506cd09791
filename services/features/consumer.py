"""faust's Kafka consumer with a cheaper hand-over of fetched records to the streams.

faust-streaming 0.15.3 delivers every fetched record with
``await self.wait_first(callback(record), self.suspend_flow.wait())``: four tasks (the
delivery, the suspend-flow wait, and mode's stopped and crashed waits), an ``asyncio.wait``
and three cancellations, per record. At 2,000 events/s that is about 10,000 tasks a second
on the worker's one event loop, and each record takes several loop iterations to reach its
stream, interleaved with everything else the loop runs: records reached the agents
~100 ms older (median) than a plain aiokafka consumer saw them on the same broker at the
same time, more than the service's own processing and Redis write.

``FeaturesConsumer`` races the *delivery of a fetched batch* against the same events,
once per batch: records within it are handed to the streams with a plain ``await``. What
the race protects is unchanged: when the flow is suspended (a rebalance), the consumer
stops, or the app crashes, the delivery is cancelled where it is, the records not yet
delivered are dropped and their read offsets are not advanced (faust then seeks back to
the committed offsets, as before). The fetch itself is not part of the race (a fetch
cancelled after aiokafka handed its records over would lose them from the position).
Everything else is faust's code of the same method (offset gaps, ``commit_every``, the
generation check, the partitions filter, yielding to the loop every 100 records).

``forget_partition`` drops what faust remembers of a partition's offsets (read offset,
acknowledgements, gaps, last commit) when the client moved its position back because the topic
started over (a restart of the in-memory local broker, services/shared/broker_compat.py): faust
would otherwise drop every record of the new topic below the old read offset as already seen
and ignore their acknowledgements as already committed, and the features service stood still,
with a lag, until the next rebalance (about 5 minutes in loadtests/chaos.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.types.tuples import ack_lock
from mode import ServiceT

from services.shared.logging import get_logger

log = get_logger("features.consumer")


class FeaturesConsumer(aiokafka_driver.Consumer):
    async def _drain_messages(self, fetcher: ServiceT) -> None:
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set  # type: ignore[attr-defined]
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag("FETCHING")
                records, active_partitions = await self._wait_next_records(1.0)
                # getmany may be called in a loop that would never release the event loop
                await asyncio.sleep(0)
                if records is not None and not self.should_stop:
                    if self.flow_active:
                        await self.wait_first(
                            self._deliver(records, active_partitions),
                            self.suspend_flow.wait(),
                        )
                    else:
                        await self._seek_back()
                self.diag.unset_flag("FETCHING")
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag("FETCHING")

    async def _deliver(self, records: Any, active_partitions: set[TP] | None) -> None:
        """Hand one fetch's records to the streams, in faust's order and with its checks."""
        callback = self.callback
        generation_id = self.app.consumer_generation_id
        read_offset = self._read_offset
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        since_yield = 0
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active:
                break
            if self.app.consumer_generation_id != generation_id:
                self.log.dev("Generation id changed; the rest of the fetch is dropped.")
                break
            if not (
                active_partitions is None
                or tp in active_partitions
                or tp in self._buffered_partitions
            ):
                continue
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            message = self._to_message(tp, record)
            since_yield += 1
            if since_yield > 100:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
            r_offset = read_offset[tp]
            if r_offset is not None and offset < r_offset:
                self.log.dev("DROPPED MESSAGE ROFF %r", offset)
                continue
            if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                await self._add_gap(tp, r_offset + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await callback(message)
            read_offset[tp] = offset

    def forget_partition(self, partition: Any) -> None:
        """Forget ``partition``'s offsets (a topic that started over; module docstring). Safe
        from the client's thread: the acknowledgement lock is faust's, and the next records
        of the partition are fetched only after this returns."""
        tp = TP(partition.topic, partition.partition)
        with ack_lock:
            self._read_offset[tp] = None
            self._committed_offset[tp] = None
            self._acked.pop(tp, None)
            self._acked_index.pop(tp, None)
            self._gap.pop(tp, None)
        log.info("partition_offsets_forgotten", topic=tp.topic, partition=tp.partition)

    async def _seek_back(self) -> None:
        self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
        try:
            await self.perform_seek()
        except Exception as exc:  # noqa: BLE001  # faust's own handling of this case
            self.log.warning(f"exception performing seek when flow not active {exc}")


class FeaturesTransport(aiokafka_driver.Transport):
    """faust's aiokafka transport with ``FeaturesConsumer``."""

    Consumer = FeaturesConsumer
