"""Step 3 of a batch: publish what can never be written to the dead-letter topic, durably, before committing."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, Message, Producer

from sink.records import DeadLetter
from site_activity.dead_letters import dead_letter_headers
from site_activity.kafka import producer_config
from site_activity.settings import Settings

log = logging.getLogger(__name__)


class DeadLetterError(Exception):
    """The dead-letter topic did not confirm delivery: the batch must not be committed yet."""


class DeadLetterPublisher:
    def __init__(self, settings: Settings, topic: str, timeout_s: float = 15.0) -> None:
        self._producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self._topic = topic
        self._timeout_s = timeout_s

    def publish(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        failures: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(err)

        for letter in letters:
            src = letter.source
            self._producer.produce(
                self._topic, key=src.key, value=letter.payload, on_delivery=delivered,
                headers=dead_letter_headers("sink", letter.reason, src.topic, src.partition, src.offset),
            )
        remaining = self._producer.flush(self._timeout_s)
        if failures or remaining:
            raise DeadLetterError(f"{len(failures)} dead letter(s) failed, {remaining} unconfirmed: {failures[:1]}")
        for letter in letters:
            log.warning("dead-lettered message", extra={
                "reason": letter.reason, "topic": letter.source.topic, "partition": letter.source.partition,
                "offset": letter.source.offset})

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
