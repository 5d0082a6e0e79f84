"""Everything the processors write to Kafka goes through one confluent-kafka producer: enriched events,
identity links, dead letters and the visitor-state changelog.

Records are handed over without waiting and without a Python callback per success (librdkafka reports only
failures). `deliver()` is the commit barrier (see `transport.py`): it blocks until everything produced so
far is acknowledged, and faust commits offsets only after it returned. If librdkafka gives up on a record,
the process exits without committing, so a restarted worker redoes the uncommitted messages, outputs and
state included: at-least-once, with deterministic records that downstream writes deduplicate.

faust's own producer (aiokafka, pure Python, one future and one queue hop per record) used to write the
changelog and cost about a quarter of a worker's throughput; the changelog records written here are the
same bytes (key as is, the state document as JSON) and faust's table recovery reads them back unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orjson
from confluent_kafka import KafkaError, Producer

from site_activity.kafka import producer_config
from site_activity.settings import Settings

log = logging.getLogger(__name__)

# Exit code when records could not be delivered: the process must die without committing their offsets.
EXIT_DELIVERY_FAILED = 75


class Outputs:
    def __init__(self, settings: Settings) -> None:
        self._failed: list[str] = []
        self.producer = Producer(producer_config(
            settings,
            **{"delivery.report.only.error": True, "on_delivery": self._on_delivery,
               "linger.ms": 2, "batch.size": settings.processors_producer_batch_bytes},
        ))

    def send(self, topic: str, key: bytes, value: bytes, partition: int | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        options: dict[str, Any] = {"headers": headers} if headers else {}
        if partition is not None:
            options["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, value, key, **options)
                return
            except BufferError:  # local queue full: let librdkafka drain some, then retry
                self.producer.poll(0.05)

    def send_state(self, changelog_topic: str, partition: int, key: bytes, doc: dict[str, Any]) -> None:
        """A table changelog record, on the partition of the key's input (the table is co-partitioned)."""
        self.send(changelog_topic, key, orjson.dumps(doc), partition)

    def check(self) -> None:
        """Non-blocking: serves pending failure reports; exits if a record was lost for good."""
        self.producer.poll(0)
        self._exit_if_failed()

    def deliver(self) -> None:
        """Blocks until every record produced so far is delivered, or exits if one cannot be."""
        while self.producer.flush(1.0) > 0:
            pass  # librdkafka retries until message.timeout.ms, then reports failures below
        self._exit_if_failed()

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._failed.append(str(err))

    def _exit_if_failed(self) -> None:
        if self._failed:
            log.critical("records not delivered; exiting before their offsets are committed",
                         extra={"errors": self._failed[:5], "failed": len(self._failed)})
            logging.shutdown()
            os._exit(EXIT_DELIVERY_FAILED)
