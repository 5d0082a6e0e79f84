"""The repair of skipped offsets (step 3 of the commit story, `checkpoint.py`): faust would commit past offsets
it never handed to an agent (`transport.py` explains how); `SkippedReader` reads those messages straight from
Kafka and processes them before the commit, or ends the process so nothing is committed past them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

from site_activity.kafka import consumer_config, position
from site_activity.settings import Settings
from stream_processors.checkpoint import EXIT_DELIVERY_FAILED, exit_without_committing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedMessage:
    """A raw message read outside faust, with the attributes `BatchProcessor` reads (`processor.RawMessage`)."""

    topic: str
    partition: int
    offset: int
    timestamp: float  # seconds since the epoch
    key: bytes | None
    value: bytes | None


def _give_up() -> None:
    exit_without_committing(EXIT_DELIVERY_FAILED, "exiting without committing past the skipped messages")


class SkippedReader:
    """Reads the messages faust would commit past without processing them straight from Kafka and processes them,
    before faust commits. A group-less consumer: it never commits anything. `processes` maps each topic an agent
    consumes (raw events, erasure markers) to the function that agent applies; offsets of other topics are left
    to faust.

    It reads from the first offset asked for until it has seen an offset at or past the last one (the log
    answers which offsets hold messages), retrying fetch errors; if that takes longer than `timeout_s` the
    process exits without committing (`on_give_up`, 75), so a restarted worker redoes those messages: never a
    commit past an unprocessed offset."""

    def __init__(
        self,
        settings: Settings,
        processes: dict[str, Callable[[list[FetchedMessage]], None]],
        timeout_s: float,
        on_give_up: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.timeout_s = timeout_s
        self.on_give_up = on_give_up or _give_up

    def handles(self, topic: str) -> bool:
        return topic in self.processes

    def __call__(self, topic: str, partition: int, offsets: list[int]) -> None:
        process = self.processes[topic]
        messages = self.read(topic, partition, offsets)
        if messages is None:
            log.critical(
                "could not read the messages faust skipped; exiting without committing past them",
                extra={
                    "topic": topic,
                    "partition": partition,
                    "first": offsets[0],
                    "last": offsets[-1],
                    "timeout_s": self.timeout_s,
                },
            )
            self.on_give_up()
            raise RuntimeError("skipped messages not processed")  # on_give_up must not return
        if messages:
            process(messages)
        log.warning(
            "processed skipped messages",
            extra={
                "topic": topic,
                "partition": partition,
                "first": offsets[0],
                "last": offsets[-1],
                "offsets": len(offsets),
                "messages": len(messages),
            },
        )

    def read(self, topic: str, partition: int, offsets: list[int]) -> list[FetchedMessage] | None:
        """The messages at `offsets` (sorted) that exist, or None if the log could not be read in time."""
        wanted, last = set(offsets), offsets[-1]
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.processors_app_id}-skipped"))
        consumer.assign([TopicPartition(topic, partition, offsets[0])])
        messages: list[FetchedMessage] = []
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error() is not None:
                    log.warning("reading skipped messages", extra={"error": str(msg.error())})
                    continue
                _, _, offset = position(msg)
                if offset in wanted:
                    messages.append(
                        FetchedMessage(topic, partition, offset, msg.timestamp()[1] / 1000, msg.key(), msg.value())
                    )
                if offset >= last:
                    return messages
            return None
        finally:
            consumer.close()
