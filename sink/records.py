"""Step 1 of a batch: Kafka messages -> rows for Postgres, or dead letters for what cannot be decoded.

Events are decoded without Avro logical types (uuid fields stay str, timestamps int µs since the epoch):
building uuid.UUID and datetime objects cost as much as the decoding itself, and Postgres parses the text
anyway (a malformed uuid is then a row the database rejects, dead-lettered like any other).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from schemas.codec import DecodeError, EventCodec, EventDecoder
from schemas.fields import check_event_fields
from site_activity.dead_letters import Reason, reason_text
from site_activity.kafka import position

# The event fields a row carries, in this order (the COPY column order, see sink.writer). The first two are
# the table's primary key.
FIELDS: tuple[str, ...] = (
    "widget_id",
    "event_id",
    "tenant_id",
    "visitor_id",
    "event_type",
    "name",
    "url",
    "referrer",
    "properties",
    "user_id",
    "customer_id",
    "session_id",
    "occurred_at",
    "received_at",
)
check_event_fields(FIELDS, "sink.records.FIELDS")
EVENT_TYPE = FIELDS.index("event_type")
CUSTOMER_ID = FIELDS.index("customer_id")
_pick = operator.itemgetter(*FIELDS)
_identity = operator.itemgetter(0, 1)  # (widget_id, event_id) of a row's values
_EVENT = EventCodec(logical_types=False).event


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
        topic, partition, offset = position(msg)
        return cls(topic, partition, offset, msg.key(), msg.value())


@dataclass(slots=True)  # one per event: kept lean, the Source is only built for dead letters
class Row:
    message: Message
    values: tuple[Any, ...]  # in FIELDS order, raw Avro values

    @property
    def source(self) -> Source:
        return Source.of(self.message)

    def as_message(self) -> bytes:
        """This row's event alone, as a single-event message: a dead letter must not carry the other events
        of its VisitorEventBatch message, which were written."""
        return _EVENT.encode(dict(zip(FIELDS, self.values, strict=True)))

    @property
    def is_identify(self) -> bool:
        """An identify the processors linked to a contact (on the raw topic customer_id is still null)."""
        return self.values[EVENT_TYPE] == "identify" and self.values[CUSTOMER_ID] is not None


@dataclass(frozen=True)
class DeadLetter:
    source: Source
    reason: str
    value: bytes | None = None  # what to dead-letter if not the whole source message (one event out of a batch)

    @property
    def payload(self) -> bytes | None:
        return self.value if self.value is not None else self.source.value


def decode(messages: Iterable[Message], codec: EventDecoder) -> tuple[list[Row], list[DeadLetter]]:
    """Decodes a batch (a message holds one event, or one request's events on the raw topic); the same event
    twice in one batch (a producer retry) keeps only the first copy."""
    rows: list[Row] = []
    letters: list[DeadLetter] = []
    append = rows.append
    for msg in messages:
        try:
            records = codec.decode_events(msg.value())
        except DecodeError as exc:
            letters.append(DeadLetter(Source.of(msg), reason_text(Reason.UNDECODABLE, str(exc))))
            continue
        for record in records:
            append(Row(msg, _pick(record)))
    return _first_copies(rows), letters


def _first_copies(rows: list[Row]) -> list[Row]:
    # Duplicates are rare: one set() over the event ids (C speed) tells whether the dict pass is needed.
    # Ids are compared as written; a copy spelled differently (upper case) is caught by ON CONFLICT instead.
    if len({row.values[1] for row in rows}) == len(rows):
        return rows
    first: dict[tuple[str, str], Row] = {}
    for row in rows:
        first.setdefault(_identity(row.values), row)
    return list(first.values())


@dataclass
class DecodedBatch:
    """A batch after step 1: what to write, what to dead-letter, and the messages whose offsets it covers."""

    messages: list[Message]
    rows: list[Row]
    letters: list[DeadLetter]

    @classmethod
    def of(cls, messages: list[Message], codec: EventDecoder) -> DecodedBatch:
        rows, letters = decode(messages, codec)
        return cls(messages, rows, letters)

    def without(self, partitions: set[tuple[str, int]]) -> DecodedBatch:
        def kept(msg: Message) -> bool:
            return (msg.topic(), msg.partition()) not in partitions

        return DecodedBatch(
            [m for m in self.messages if kept(m)],
            [r for r in self.rows if kept(r.message)],
            [d for d in self.letters if (d.source.topic, d.source.partition) not in partitions],
        )
