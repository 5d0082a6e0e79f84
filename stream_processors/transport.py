"""faust's aiokafka transport with three additions: a fetch wait from our settings, commit barriers, and a
repair for offsets faust would commit without having processed them.

* faust creates its worker consumer with a fixed `fetch_max_wait_ms=1500`. Kafka answers a fetch as soon as
  data is there, so on a busy Kafka cluster that number only bounds idle polling; a broker that holds
  fetches for part of the wait (the embedded Tansu does) turns it straight into latency on the
  raw -> enriched hop. `consumer_fetch_wait_max_ms` is the same bound the sink's consumer uses.
* faust flushes its own producer before it commits offsets, but knows nothing of the processors'
  confluent-kafka producer. `App.commit_barriers` run right before every offset commit (periodic,
  rebalance, shutdown), so offsets are never committed ahead of the outputs of their messages.
* faust computes the offset to commit from the offsets its streams acked, but compares the first acked
  offset with the committed one off by one (`min(acked) - committed > 1`, faust 0.11-0.15): when the message
  *at* the committed offset never reached the agent and the ones after it did, faust commits past it and
  the message is lost for good. That happened in about one restart in ten here (a message fetched right
  after the worker's start-up rebalance never reached the stream). `Consumer._new_offset` hands such
  offsets to `App.skipped_offsets_handler` (the processors read and process them directly) before faust
  computes the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

log = logging.getLogger(__name__)

# (topic, partition, first offset, end offset): processes the messages in [first, end) of that partition.
SkippedOffsetsHandler = Callable[[str, int, int, int], None]


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher; no constructor hook is left to us.
        consumer._fetch_max_wait_ms = self.app.fetch_wait_max_ms  # type: ignore[attr-defined]
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _commit(self, offsets: Mapping[Any, int]) -> bool:
        for barrier in self.app.commit_barriers:  # type: ignore[attr-defined]
            barrier()
        return await super()._commit(offsets)  # type: ignore[no-any-return]

    def _new_offset(self, tp: TP) -> int | None:
        acked, committed = self._acked[tp], self._committed_offset[tp]
        if acked and committed is not None and min(acked) > committed:
            head = min(acked)
            gaps = self._gap[tp]  # offsets the fetcher saw missing from the log (compaction, markers)
            if any(not gaps.overlaps(offset) for offset in range(committed, head)):
                handler: SkippedOffsetsHandler | None = self.app.skipped_offsets_handler  # type: ignore[attr-defined]
                log.warning("faust skipped messages that were never processed; processing them now",
                            extra={"topic": tp.topic, "partition": tp.partition, "first": committed, "end": head})
                if handler is not None:
                    handler(tp.topic, tp.partition, committed, head)
                acked.extend(range(committed, head))
                acked.sort()
        return super()._new_offset(tp)  # type: ignore[no-any-return]


class Transport(driver.Transport):
    Consumer = Consumer


class App(faust.App):
    """A faust App whose Kafka consumer fetches with `fetch_wait_max_ms`, honours `commit_barriers` and
    hands skipped offsets to `skipped_offsets_handler`."""

    def __init__(self, *args: Any, fetch_wait_max_ms: int, **kwargs: Any) -> None:
        self.fetch_wait_max_ms = fetch_wait_max_ms
        # Called, in order, before every offset commit; each must return only once the outputs of all the
        # messages processed so far are durable (or end the process).
        self.commit_barriers: list[Callable[[], None]] = []
        self.skipped_offsets_handler: SkippedOffsetsHandler | None = None
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
