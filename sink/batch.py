"""The in-memory batch: messages consumed but not yet committed, bounded by size and age."""

from __future__ import annotations

import time

from confluent_kafka import Message, TopicPartition


class Batch:
    def __init__(self, max_events: int, max_ms: int) -> None:
        self.max_events = max_events
        self.max_age_s = max_ms / 1000
        self.messages: list[Message] = []
        self._first_at = 0.0

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, messages: list[Message]) -> None:
        if messages and not self.messages:
            self._first_at = time.monotonic()
        self.messages.extend(messages)

    def room(self) -> int:
        return max(1, self.max_events - len(self.messages))

    def age_left_s(self) -> float:
        """Seconds until the age bound flushes this batch (inf while empty)."""
        if not self.messages:
            return float("inf")
        return max(0.0, self._first_at + self.max_age_s - time.monotonic())

    def due(self) -> bool:
        return bool(self.messages) and (len(self.messages) >= self.max_events or self.age_left_s() == 0.0)

    def take(self) -> list[Message]:
        messages, self.messages = self.messages, []
        return messages

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> int:
        """Forgets messages of partitions this member no longer owns; their new owner re-reads them."""
        before = len(self.messages)
        self.messages = [m for m in self.messages if (m.topic(), m.partition()) not in partitions]
        return before - len(self.messages)


def next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """Per partition, the offset after the last message: what to commit once the messages are durable."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in sorted(last.items())]
