"""One batch of raw events in, enriched events out.

A batch is what `stream.take_events()` hands the agent. Its events are decoded once, grouped per visitor
(the Kafka key), each visitor's state is read from the table once, all its events are placed in offset
order (see `state.py` for the rules), the state is written back once, and every output record is handed
to a confluent-kafka producer without waiting. The batch ends with one flush: only after every output is
confirmed does the agent return, and only then does faust ack (and later commit) the batch's offsets.
At-least-once: a crash before that replays the batch, and replays produce the same records (deterministic
ids), which the sink writes idempotently.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from confluent_kafka import KafkaError, Producer

from schemas.codec import IDENTITY_LINK, AvroCodec, DecodeError, EventCodec
from site_activity.dead_letters import dead_letter_headers
from site_activity.events import EventType, customer_id_for, session_id_for, session_start_event_id
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key
from stream_processors import metrics
from stream_processors.state import VisitorState

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
# Exit code when outputs could not be delivered: the process must die without committing the batch.
EXIT_DELIVERY_FAILED = 75


# A visitor's events share a few session and contact ids; deriving them (uuid5 = SHA-1) once is measurably
# cheaper per event.
@lru_cache(maxsize=65_536)
def session_id_at(widget_id: uuid.UUID, visitor_id: str, start_us: int) -> uuid.UUID:
    return session_id_for(widget_id, visitor_id, from_us(start_us))


@lru_cache(maxsize=65_536)
def contact_id(tenant_id: uuid.UUID, user_id: str) -> uuid.UUID:
    return customer_id_for(tenant_id, user_id)


def to_us(ts: datetime) -> int:
    return (ts - EPOCH) // ONE_US


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


class RawMessage(Protocol):
    """What the processor needs of a consumed message (faust's `Message` has these attributes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class StateStore(Protocol):
    """Visitor state by Kafka key; `put` also names the partition whose changelog gets the write."""

    def get(self, key: bytes) -> dict[str, Any] | None: ...

    def put(self, key: bytes, partition: int, doc: dict[str, Any]) -> None: ...


@dataclass
class VisitorBatch:
    """One visitor's events of a batch, in offset order."""

    key: bytes
    partition: int
    records: list[dict[str, Any]]


class InvalidEvent(ValueError):
    """A raw message that decodes but can never be processed."""


def validate(record: dict[str, Any], key: bytes | None) -> None:
    if record["event_type"] == EventType.SESSION_START:
        raise InvalidEvent("session_start events are derived by the processors, not accepted as input")
    if record["event_type"] == EventType.IDENTIFY and not record.get("user_id"):
        raise InvalidEvent("identify event without user_id")
    if key != event_key(str(record["widget_id"]), record["visitor_id"]):
        # State lives on the key's partition; a message keyed otherwise would read another visitor's state.
        raise InvalidEvent("message key is not <widget_id>:<visitor_id>")


class BatchProcessor:
    def __init__(self, settings: Settings, store: StateStore, producer: Producer) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.store = store
        self.producer = producer
        self.codec = EventCodec()
        self.links = AvroCodec(IDENTITY_LINK)
        self.gap_us = int(settings.session_gap_s * 1_000_000)
        self._failed: list[str] = []

    # --- the batch --------------------------------------------------------------------------------

    def process(self, messages: Sequence[RawMessage]) -> None:
        started = time.perf_counter()
        metrics.EVENTS_IN.inc(len(messages))
        for visitor in self._group(messages):
            state = VisitorState.from_doc(self.store.get(visitor.key))
            for record in visitor.records:
                self._enrich(state, visitor.key, record)
            self.store.put(visitor.key, visitor.partition, state.to_doc())
        self._flush()
        metrics.BATCH_EVENTS.observe(len(messages))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def _group(self, messages: Iterable[RawMessage]) -> list[VisitorBatch]:
        by_key: dict[bytes, VisitorBatch] = {}
        for msg in messages:
            try:
                records = self.codec.decode_events(msg.value)
            except DecodeError as exc:
                self._dead_letter(msg, f"DecodeError: {exc}")
                continue
            for record in records:
                try:
                    validate(record, msg.key)
                except InvalidEvent as exc:
                    self._dead_letter(msg, f"InvalidEvent: {exc}", self.codec.encode_event(record))
                    continue
                batch = by_key.get(msg.key)  # type: ignore[arg-type]  # validate() checked the key
                if batch is None:
                    batch = by_key[msg.key] = VisitorBatch(msg.key, msg.partition, [])  # type: ignore[index,arg-type]
                batch.records.append(record)
        return list(by_key.values())

    # --- one event --------------------------------------------------------------------------------

    def _enrich(self, state: VisitorState, key: bytes, record: dict[str, Any]) -> None:
        s = self.settings
        t = to_us(record["occurred_at"])
        if record["event_type"] == EventType.IDENTIFY:
            if state.link(t, record["user_id"], s.processors_max_links):
                self._publish_link(key, record)
        placed = state.place(t, self.gap_us, s.processors_max_sessions)
        user = record["user_id"] if record["event_type"] == EventType.IDENTIFY else state.user_at(t)
        record["customer_id"] = contact_id(record["tenant_id"], user) if user else None
        record["session_id"] = session_id_at(record["widget_id"], record["visitor_id"], placed.session_start_us)
        if placed.opens_session:
            self._send(self.topics.enriched_events, key, self.codec.encode_event(session_start_for(record)))
            metrics.SESSION_STARTS.inc()
        self._send(self.topics.enriched_events, key, self.codec.encode_event(record))

    def _publish_link(self, key: bytes, identify: dict[str, Any]) -> None:
        link = {
            "tenant_id": identify["tenant_id"],
            "widget_id": identify["widget_id"],
            "visitor_id": identify["visitor_id"],
            "user_id": identify["user_id"],
            "customer_id": contact_id(identify["tenant_id"], identify["user_id"]),
            "linked_at": identify["occurred_at"],
        }
        self._send(self.topics.identity_links, key, self.links.encode(link))
        metrics.IDENTITY_LINKS.inc()

    # --- output -----------------------------------------------------------------------------------

    def _send(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka drain some, then retry
                self.producer.poll(0.05)
        if topic == self.topics.enriched_events:
            metrics.EVENTS_OUT.inc()

    def _dead_letter(self, msg: RawMessage, reason: str, value: bytes | None = None) -> None:
        """Dead-letters a raw message, or with `value` just one bad event out of a batch message."""
        log.warning("dead-lettered a raw message", extra={
            "reason": reason, "topic": msg.topic, "partition": msg.partition, "offset": msg.offset})
        headers = dead_letter_headers("processors", reason, msg.topic, msg.partition, msg.offset)
        self._send(self.topics.dead_letter, msg.key or b"", value if value is not None else msg.value or b"", headers)
        metrics.DEAD_LETTERS.inc()

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._failed.append(str(err))

    def _flush(self) -> None:
        """Blocks until every output of the batch is delivered. Deliberately synchronous: the batch then has
        no await point, so a shutdown can never cancel it half-way and have faust ack undelivered events."""
        while self.producer.flush(1.0) > 0:
            pass  # librdkafka retries until message.timeout.ms, then reports failures below
        if self._failed:
            # Exiting without a commit is the at-least-once answer: a restarted worker redoes this batch.
            log.critical("outputs not delivered; exiting so the batch is not committed",
                         extra={"errors": self._failed[:5], "failed": len(self._failed)})
            logging.shutdown()
            os._exit(EXIT_DELIVERY_FAILED)


def session_start_for(opener: dict[str, Any]) -> dict[str, Any]:
    """The derived event that marks a session: the opener's who, where and when, with a deterministic id."""
    session_id = opener["session_id"]
    if not isinstance(session_id, uuid.UUID):
        session_id = uuid.UUID(str(session_id))
    return {
        **opener,
        "event_id": session_start_event_id(session_id),
        "event_type": EventType.SESSION_START.value,
        "name": None,
        "properties": "{}",
        "user_id": None,
    }
