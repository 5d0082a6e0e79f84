"""The in-memory batch: messages consumed but not yet committed, bounded by size and age."""

from __future__ import annotations

import io
import time

from confluent_kafka import Message

from schemas.codec import HEADER_LEN, MAGIC, DecodeError, EventCodec, read_long

_VISITOR_EVENT_BATCH_HEADERS = tuple(MAGIC + fp for fp in EventCodec(logical_types=False).batch.versions)


def events_in(value: bytes | None) -> int:
    """Events in a message without decoding it: a VisitorEventBatch starts with its array's item count (the
    first block's; our writers write one block); anything else counts as one."""
    if not value or not value.startswith(_VISITOR_EVENT_BATCH_HEADERS):
        return 1
    buf = io.BytesIO(value)
    buf.seek(HEADER_LEN)
    try:
        return max(1, abs(read_long(buf)))
    except DecodeError:  # truncated: the decoder dead-letters it later
        return 1


class Batch:
    """Bounded by events (rows), not messages: a message holds one event or a whole request's events."""

    def __init__(self, max_events: int, max_age_s: float) -> None:
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.messages: list[Message] = []
        self.events = 0
        self._first_at = 0.0

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, messages: list[Message]) -> None:
        if messages and not self.messages:
            self._first_at = time.monotonic()
        self.messages.extend(messages)
        self.events += sum(events_in(m.value()) for m in messages)

    def room(self) -> int:
        """How many more messages to ask the consumer for: the events still wanted, at the events per message
        seen so far."""
        left = self.max_events - self.events
        if left <= 0:
            return 1
        # Until messages tell, assume the largest (an ingest request holds at most 100 events).
        per_message = self.events / len(self.messages) if self.messages else 100.0
        return max(1, int(left / per_message))

    def age_left_s(self) -> float:
        """Seconds until the age bound flushes this batch (inf while empty)."""
        if not self.messages:
            return float("inf")
        return max(0.0, self._first_at + self.max_age_s - time.monotonic())

    def due(self) -> bool:
        return bool(self.messages) and (self.events >= self.max_events or self.age_left_s() == 0.0)

    def take(self) -> list[Message]:
        messages, self.messages, self.events = self.messages, [], 0
        return messages

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> int:
        """Forgets messages of partitions this member no longer owns; their new owner re-reads them."""
        before = len(self.messages)
        self.messages = [m for m in self.messages if (m.topic(), m.partition()) not in partitions]
        self.events = sum(events_in(m.value()) for m in self.messages)
        return before - len(self.messages)
