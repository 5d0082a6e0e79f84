"""Step 3 of a batch: publish what can never be written to the dead-letter topic, durably, before committing.

A dead letter too big to be a message itself is published without its payload (`x-dropped-bytes`; the source
headers point at the original message), so no dead letter can stall the sink."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from sink.records import DeadLetter
from site_activity.dead_letters import dead_letter_headers, fit_dead_letter, is_unwritable, without_payload
from site_activity.kafka import produce_waiting, producer_config
from site_activity.settings import Settings

log = logging.getLogger(__name__)


class DeadLetterError(Exception):
    """The dead-letter topic did not confirm delivery: the batch must not be committed yet."""


class DeadLetterPublisher:
    def __init__(self, settings: Settings, topic: str, timeout_s: float = 15.0) -> None:
        self._producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        self._max_bytes = settings.kafka_max_message_bytes
        self._topic = topic
        self._timeout_s = timeout_s

    def publish(self, letters: list[DeadLetter]) -> None:
        """Publishes each letter to the dead-letter topic (value: the original message bytes; headers: stage, reason,
        source topic/partition/offset, see `site_activity.dead_letters`) and waits until the broker confirmed all
        of them (up to `timeout_s` seconds per flush). A letter the broker refuses for its size or content is sent
        again without its payload (`x-dropped-bytes` says how much), so no letter can block the stage. Raises
        `DeadLetterError` when any letter is not confirmed: the caller must not commit the batch's offsets."""
        if not letters:
            return
        failures: list[KafkaError] = []
        refused: list[tuple[bytes | None, list[tuple[str, bytes]]]] = []

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                return
            if is_unwritable(err) and msg.value():  # refused for its size/content: again without the payload
                ours = cast("list[tuple[str, bytes]] | None", msg.headers())  # the headers _produce gave it
                refused.append((msg.key(), without_payload(msg.value(), ours)[1]))
            else:
                failures.append(err)

        for letter in letters:
            src = letter.source
            headers = dead_letter_headers("sink", letter.reason, src.topic, src.partition, src.offset)
            value, headers = fit_dead_letter(src.key, letter.payload, headers, self._max_bytes)
            self._produce(src.key, value, headers, delivered)
        remaining = self._producer.flush(self._timeout_s)
        for key, headers in refused:
            self._produce(key, b"", headers, delivered)
        if refused:
            remaining = self._producer.flush(self._timeout_s)
        if failures or remaining:
            raise DeadLetterError(f"{len(failures)} dead letter(s) failed, {remaining} unconfirmed: {failures[:1]}")
        for letter in letters:
            log.warning(
                "dead-lettered message",
                extra={
                    "reason": letter.reason,
                    "topic": letter.source.topic,
                    "partition": letter.source.partition,
                    "offset": letter.source.offset,
                },
            )

    def _produce(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        delivered: Callable[[KafkaError | None, Message], None],
    ) -> None:
        while True:
            try:
                produce_waiting(
                    self._producer,
                    self._topic,
                    value,
                    key,
                    on_delivery=delivered,
                    headers=cast("list[tuple[str, str | bytes | None]]", headers),
                )
                return
            except KafkaException as exc:
                if not is_unwritable(exc.args[0]) or not value:
                    raise DeadLetterError(str(exc)) from exc
                value, headers = without_payload(value, headers)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
