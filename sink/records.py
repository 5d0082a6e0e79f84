"""Step 1 of a batch: Kafka messages -> rows for Postgres, or dead letters for what cannot be decoded."""

from __future__ import annotations

import operator
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from schemas.codec import DecodeError, EventCodec

# Column layout of the per-connection temp table the batch is COPYed into (see sink.writer).
# `ord` is the position in the batch: it breaks ties between identify calls with the same occurred_at.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("ord", "int8"),
    ("widget_id", "uuid"),
    ("event_id", "uuid"),
    ("tenant_id", "uuid"),
    ("visitor_id", "text"),
    ("event_type", "text"),
    ("name", "text"),
    ("url", "text"),
    ("referrer", "text"),
    ("properties", "text"),  # cast to jsonb by the INSERT, so the server validates it
    ("user_id", "text"),
    ("customer_id", "uuid"),
    ("session_id", "uuid"),
    ("occurred_at", "timestamptz"),
    ("received_at", "timestamptz"),
)
_FIELDS = [name for name, _ in COLUMNS[1:]]
_EVENT_TYPE = [name for name, _ in COLUMNS].index("event_type")
_CUSTOMER_ID = [name for name, _ in COLUMNS].index("customer_id")


@dataclass(frozen=True)
class Source:
    """Where a record came from: enough to dead-letter it verbatim and to commit past it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def of(cls, msg: Message) -> Source:
        return cls(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())


@dataclass(slots=True)  # one per event: kept lean, the Source is only built for dead letters
class Row:
    message: Message
    values: tuple[Any, ...]  # in COLUMNS order

    @property
    def source(self) -> Source:
        return Source.of(self.message)

    @property
    def identity(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self.values[1], self.values[2]  # (widget_id, event_id): the table's primary key

    @property
    def is_identify(self) -> bool:
        """An identify the processors linked to a contact (on the raw topic customer_id is still null)."""
        return self.values[_EVENT_TYPE] == "identify" and self.values[_CUSTOMER_ID] is not None


@dataclass(frozen=True)
class DeadLetter:
    source: Source
    reason: str


_pick = operator.itemgetter(*_FIELDS)


def to_row(ord_: int, record: dict[str, Any], message: Message) -> Row:
    # fastavro already yields uuid.UUID and aware datetimes, exactly what binary COPY wants; no per-field work.
    return Row(message, (ord_, *_pick(record)))


def decode(messages: Iterable[Message], codec: EventCodec) -> tuple[list[Row], list[DeadLetter]]:
    """Decodes a batch (a message holds one event, or one request's events on the raw topic); the same event
    twice in one batch (a producer retry) keeps only the first copy."""
    rows: dict[tuple[uuid.UUID, uuid.UUID], Row] = {}
    letters: list[DeadLetter] = []
    ord_ = 0
    for msg in messages:
        try:
            records = codec.decode_events(msg.value())
        except DecodeError as exc:
            letters.append(DeadLetter(Source.of(msg), f"undecodable: {exc}"))
            continue
        for record in records:
            row = to_row(ord_, record, msg)
            rows.setdefault(row.identity, row)
            ord_ += 1
    return list(rows.values()), letters


@dataclass
class DecodedBatch:
    """A batch after step 1: what to write, what to dead-letter, and the messages whose offsets it covers."""

    messages: list[Message]
    rows: list[Row]
    letters: list[DeadLetter]

    @classmethod
    def of(cls, messages: list[Message], codec: EventCodec) -> DecodedBatch:
        rows, letters = decode(messages, codec)
        return cls(messages, rows, letters)

    def without(self, partitions: set[tuple[str, int]]) -> DecodedBatch:
        def kept(msg: Message) -> bool:
            return (msg.topic(), msg.partition()) not in partitions

        return DecodedBatch([m for m in self.messages if kept(m)], [r for r in self.rows if kept(r.message)],
                            [d for d in self.letters if (d.source.topic, d.source.partition) not in partitions])

