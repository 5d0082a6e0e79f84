"""Everything the processors write to Kafka goes through one confluent-kafka producer: enriched events,
identity links, dead letters and the visitor-state changelog.

A record that can never be written (bigger than the message size limit, or refused by the broker as invalid:
`site_activity.dead_letters.is_unwritable`) goes to the dead-letter topic with the reason, whether the producer
refuses it at once or the broker refuses it later; everything else flows on. Only a record that cannot even be
dead-lettered makes the process exit.

Records are handed over without waiting and without a Python callback per success (librdkafka reports only
failures). `deliver()` blocks until everything produced so far is acknowledged; it is the first half of the
checkpoint before every offset commit, and a record lost for good ends the process without committing (the
commit story: `checkpoint.py`).

The table changelog is written here too rather than by faust's own producer (aiokafka: pure Python, one future
and one queue hop per record, a large share of a worker: bench/README.md); the records are the same bytes (key
as is, the state document as JSON) and faust's table recovery reads them back unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from site_activity.dead_letters import (
    Reason,
    dead_letter_headers,
    fit_dead_letter,
    is_unwritable,
    reason_text,
    without_payload,
)
from site_activity.kafka import produce_waiting, producer_config
from site_activity.settings import Settings
from site_activity.topics import Topics
from stream_processors import metrics
from stream_processors.checkpoint import EXIT_DELIVERY_FAILED, exit_without_committing

log = logging.getLogger(__name__)


Source = tuple[str, int, int]  # (topic, partition, offset) of the input a record was derived from


class Outputs:
    def __init__(self, settings: Settings) -> None:
        self._failed: list[str] = []
        # (topic, partition, key, value, headers, reason) of records the broker refused for good
        self._refused: list[tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]] | None, str]] = []
        self.dead_letter_topic = Topics.from_settings(settings).dead_letter
        self.max_message_bytes = settings.kafka_max_message_bytes
        self.producer = Producer(
            producer_config(
                settings,
                **{
                    "delivery.report.only.error": True,
                    "on_delivery": self._on_delivery,
                    "linger.ms": 2,
                    "batch.size": settings.processors_producer_batch_size,
                },
            )
        )
        # The table changelog has its own producer, with a report per record: the offsets delivered tell the
        # RocksDB store where recovery may start (store.py). Records of both are flushed by deliver().
        self._state_offsets: dict[tuple[str, int], int] = {}
        self.state_producer = Producer(
            producer_config(
                settings,
                **{
                    "on_delivery": self._on_state_delivery,
                    "linger.ms": 2,
                    "batch.size": settings.processors_producer_batch_size,
                },
            )
        )

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        source: Source | None = None,
    ) -> None:
        """Hands a record to the producer. One that can never be written is dead-lettered instead, with
        `source` (else the record's own topic and partition, offset -1) in the dead-letter headers."""
        if partition is None and not headers:  # the hot path (enriched events): no options to build
            try:
                self.producer.produce(topic, value, key)
                return
            except (BufferError, KafkaException):
                pass  # not enqueued: the general path below waits, retries or dead-letters
        options: dict[str, Any] = {"headers": headers} if headers else {}
        if partition is not None:
            options["partition"] = partition
        while True:
            try:
                produce_waiting(self.producer, topic, value, key, **options)  # waits while the queue is full
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not is_unwritable(err) or _dropped(headers):
                    raise
                if topic == self.dead_letter_topic:  # keep the headers (reason, source), drop the payload
                    value, headers = without_payload(value, headers)
                    options["headers"] = headers
                    continue
                src = source or (topic, -1 if partition is None else partition, -1)
                self._dead_letter(key, value, f"{topic}: {err.name()} {err.str()}", src)
                return

    def _dead_letter(self, key: bytes | None, value: bytes | None, detail: str, source: Source) -> None:
        """Dead-letters a record the broker can never take (`detail`: its topic and the error)."""
        reason = reason_text(Reason.UNWRITABLE_OUTPUT, detail)
        log.warning(
            "dead-lettered an output record",
            extra={"reason": reason, "topic": source[0], "partition": source[1], "offset": source[2]},
        )
        headers = dead_letter_headers("processors", reason, *source)
        value, headers = fit_dead_letter(key, value, headers, self.max_message_bytes)
        self.send(self.dead_letter_topic, key or b"", value or b"", headers=headers)
        metrics.DEAD_LETTERS.labels(Reason.UNWRITABLE_OUTPUT).inc()

    def _dead_letter_refused(self) -> None:
        """Dead-letters the records the broker refused for good (reported by delivery callbacks)."""
        refused, self._refused = self._refused, []
        for topic, partition, key, value, headers, reason in refused:
            if topic == self.dead_letter_topic:  # a dead letter refused: keep its headers, drop the payload
                empty, headers = without_payload(value, headers)
                self.send(topic, key or b"", empty, headers=headers)
            else:
                self._dead_letter(key, value, f"{topic}: {reason}", (topic, partition, -1))

    def send_state(self, changelog_topic: str, partition: int, key: bytes, value: bytes | None) -> None:
        """A table changelog record (the state document's JSON bytes, or None: a tombstone), on the partition
        of the key's input (the table is co-partitioned). A state record never exceeds the message limit
        (bounded lists of short values), so there is no dead-letter path: a failure ends the process."""
        produce_waiting(self.state_producer, changelog_topic, value, key, partition=partition)

    def take_state_offsets(self) -> dict[tuple[str, int], int]:
        """The highest delivered changelog offset per (topic, partition) since the last call."""
        offsets, self._state_offsets = self._state_offsets, {}
        return offsets

    def _on_state_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._failed.append(f"changelog: {err}")
            return
        tp = (msg.topic(), msg.partition())
        if msg.offset() > self._state_offsets.get(tp, -1):
            self._state_offsets[tp] = msg.offset()

    def check(self) -> None:
        """Non-blocking: serves pending failure reports; exits if a record was lost for good."""
        self.producer.poll(0)
        self.state_producer.poll(0)
        self._dead_letter_refused()
        self._exit_if_failed()

    def deliver(self) -> None:
        """Blocks until every record produced so far is delivered or dead-lettered, or exits if one cannot be."""
        while True:
            while self.producer.flush(1.0) > 0:
                pass  # librdkafka retries until message.timeout.ms, then reports failures below
            while self.state_producer.flush(1.0) > 0:
                pass
            if not self._refused:
                break
            self._dead_letter_refused()  # then flush those too
        self._exit_if_failed()

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            return
        if is_unwritable(err) and not _dropped(msg.headers()):
            self._refused.append(
                (msg.topic(), msg.partition(), msg.key(), msg.value(), msg.headers(), f"{err.name()} {err.str()}")
            )
        else:
            self._failed.append(str(err))

    def _exit_if_failed(self) -> None:
        if self._failed:
            exit_without_committing(
                EXIT_DELIVERY_FAILED,
                "records not delivered; exiting before their offsets are committed",
                errors=self._failed[:5],
                failed=len(self._failed),
            )


def _dropped(headers: list[tuple[str, bytes]] | None) -> bool:
    """Whether a record is a dead letter already stripped of its payload (the last resort)."""
    return any(k == "x-dropped-bytes" for k, _ in headers or [])
