"""faust's aiokafka transport, with the worker consumer's fetch wait taken from our settings.

faust creates its worker consumer with a fixed `fetch_max_wait_ms=1500`. Kafka answers a fetch as soon as
data is there, so on a busy Kafka cluster that number only bounds idle polling; a broker that holds fetches
for part of the wait (the embedded Tansu does) turns it straight into latency on the raw -> enriched hop.
`consumer_fetch_wait_max_ms` is the same bound the sink's consumer uses.
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as driver


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher; no constructor hook is left to us.
        consumer._fetch_max_wait_ms = self.app.fetch_wait_max_ms  # type: ignore[attr-defined]
        return consumer


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer


class App(faust.App):
    """A faust App whose Kafka consumer fetches with `fetch_wait_max_ms`."""

    def __init__(self, *args: Any, fetch_wait_max_ms: int, **kwargs: Any) -> None:
        self.fetch_wait_max_ms = fetch_wait_max_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
