"""One batch of raw events in, enriched events out.

A batch is what `stream.take_events()` hands the agent: raw-topic messages, each one ingest request's
events (a VisitorEventBatch) or a single event. Events are decoded once, as raw Avro values (uuid text,
int µs: EventCodec(logical_types=False)), grouped per visitor (the Kafka key), each visitor's state is read
from the table once, all its events are placed in offset order (see `state.py` for the rules), and the state
is written back once (one changelog record). Each raw message becomes one enriched message: a
VisitorEventBatch of its events, stamped, each preceded by the session_start it opened — or, when that would
exceed the message size limit (session_starts repeat their opener's url and referrer, so the output can be
about twice the input), several such messages with the same key, in order, split deterministically by size
(`wire.frame_messages`). A copy of an event already placed (same event_id) is emitted as its first copy was and
changes nothing (state.py, "Duplicates"). The stamped events
are their raw bytes with the two ids appended (`wire.py`), not a re-encoding.

Outputs are handed to `Outputs` (one confluent-kafka producer) without waiting, and the agent moves on to the
next batch while they are in flight: waiting for the broker's acks after every batch left the worker idle for a
round trip per batch. They are delivered before the offsets of their messages are committed; how, and what a
crash replays (the same records: deterministic ids, written once by the sink): `checkpoint.py`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

from schemas.codec import IDENTITY_LINK, AvroCodec, DecodeError, EventCodec
from site_activity.dead_letters import (
    EXIT_DEAD_LETTER_LIMIT,
    DeadLetterLimit,
    DeadLetterLimitExceeded,
    Reason,
    dead_letter_headers,
    fit_dead_letter,
    reason_text,
)
from site_activity.events import EventType, customer_id_text, session_id_text, session_start_event_id_text
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key, max_event_value_bytes
from stream_processors import erasures, metrics
from stream_processors.checkpoint import exit_without_committing
from stream_processors.erasures import is_erased
from stream_processors.outputs import Source
from stream_processors.state import VisitorState
from stream_processors.wire import EventReader, RawEvent, SessionStartWriter, frame_messages, stamp_bytes

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SLOW_BATCH_S = 1.0
# Event times the logical-type decoding would accept (datetime years 1..9999), in µs since the epoch.
MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
SESSION_START = EventType.SESSION_START.value
IDENTIFY = EventType.IDENTIFY.value


# Events are handled as raw Avro values (EventCodec(logical_types=False): uuids as str, times as int µs);
# the ids derived from them are computed by the very functions of site_activity.events, once per session or
# contact (uuid5 is a SHA-1), and cached as the text that goes on the wire.
@lru_cache(maxsize=16_384)  # bounded: a worker sees millions of visitors (issue 14)
def session_ids(widget_id: str, visitor_id: str, start_us: int) -> tuple[str, str]:
    """(session_id, event_id of its session_start) of the session that started at start_us."""
    session_id = session_id_text(widget_id, visitor_id, start_us)
    return session_id, session_start_event_id_text(session_id)


@lru_cache(maxsize=16_384)
def contact_id(tenant_id: str, user_id: str) -> str:
    return customer_id_text(tenant_id, user_id)


def canonical_uuid(text: str) -> str:
    """uuid text as the logical-type decoding would have produced it (str(uuid.UUID(text)))."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise InvalidEvent(f"not a uuid: {text[:50]!r}") from None


class RawMessage(Protocol):
    """What the processor needs of a consumed message (faust's `Message` has these attributes; read only)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> float: ...  # seconds since the epoch
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class RecordSink(Protocol):
    """Where the processor hands its records (`outputs.Outputs`): sent without waiting, delivered before the commit."""

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        source: Source | None = None,
    ) -> None: ...

    def check(self) -> None: ...


class StateStore(Protocol):
    """Visitor state by Kafka key; `put` also names the partition whose changelog gets the write."""

    def get(self, key: bytes, partition: int) -> dict[str, Any] | None: ...

    def put(self, key: bytes, partition: int, doc: dict[str, Any]) -> None: ...


@dataclass
class VisitorGroup:
    """One visitor's events of a batch: per raw message in offset order, its valid events (raw values, and
    the datum for `wire.restamp`)."""

    key: bytes
    partition: int
    messages: list[list[RawEvent]]
    sources: list[Source]  # (topic, partition, offset) of each raw message


class InvalidEvent(ValueError):
    """A raw message that decodes but can never be processed."""


@dataclass
class Letter:
    """A raw message (or with `value`, one bad event out of a many-event message) to dead-letter."""

    msg: RawMessage
    reason: Reason
    detail: str
    value: bytes | None = None


def validate(record: dict[str, Any], key: bytes | None, known: set[Any] | None = None) -> bool:
    """Rejects what can never be processed, and normalises the raw values the way decoding with logical
    types would have (so ids and output bytes do not depend on the decoding mode). Returns whether the
    record is unchanged (its bytes can be restamped). `known` (one per message): tenant and widget ids
    already found canonical and (widget_id, visitor_id) pairs already found to match `key`, so that the
    events of one request, which share them, are checked once."""
    event_type = record["event_type"]
    if event_type == SESSION_START:
        raise InvalidEvent("session_start events are derived by the processors, not accepted as input")
    if event_type == IDENTIFY and not record["user_id"]:
        raise InvalidEvent("identify event without user_id")
    if not MIN_US <= record["occurred_at"] <= MAX_US or not MIN_US <= record["received_at"] <= MAX_US:
        raise InvalidEvent("timestamp out of range")
    if known is None:
        known = set()
    unchanged = True
    if not _CANONICAL_UUID.match(record["event_id"]):  # the API writes canonical text; others may not
        record["event_id"], unchanged = canonical_uuid(record["event_id"]), False
    for name in ("tenant_id", "widget_id"):
        value = record[name]
        if value in known:
            continue
        if _CANONICAL_UUID.match(value):
            known.add(value)
        else:
            record[name], unchanged = canonical_uuid(value), False
    ids = (record["widget_id"], record["visitor_id"])
    if ids not in known:
        if key != event_key(*ids):
            # State lives on the key's partition; a message keyed otherwise would read another visitor's state.
            raise InvalidEvent("message key is not <widget_id>:<visitor_id>")
        known.add(ids)
    return unchanged


class BatchProcessor:
    def __init__(self, settings: Settings, store: StateStore, outputs: RecordSink) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.store = store
        self.outputs = outputs
        self.codec = EventCodec(logical_types=False)
        self.reader = EventReader(self.codec)
        self.session_starts = SessionStartWriter(self.codec)
        self.links = AvroCodec(IDENTITY_LINK, logical_types=False)
        self.gap_us = int(settings.session_gap_s * 1_000_000)
        # Room for the key and the record framing below the producer's message.max.bytes.
        self.max_value_bytes = max_event_value_bytes(settings)
        self.dead_letter_limit = DeadLetterLimit.from_settings(settings)
        # Per batch: whether a partition's state holds any erased contact (erasures.any_contact_erased). Nothing
        # writes state while a batch runs but the batch itself (visitor keys only), so the answer holds for it.
        self._contacts_erased_in: dict[int, bool] = {}

    # --- the batch --------------------------------------------------------------------------------

    def process(self, messages: Sequence[RawMessage]) -> None:
        """Processes one batch of raw messages: outputs, dead letters and state writes are handed to `Outputs`
        (delivered before the next offset commit). Ends the process without committing (exit status 65) if the
        batch's invalid messages pass the dead-letter limit, before any of them is dead-lettered; and (75) if
        `Outputs` reports a record lost for good."""
        started = time.perf_counter()
        if messages:
            metrics.INPUT_AGE.observe(max(0.0, time.time() - min(m.timestamp for m in messages)))
        self._contacts_erased_in = {}
        visitors, letters = self._group(messages)
        invalid = len({id(letter.msg) for letter in letters})  # messages with anything dead-lettered
        self._check_dead_letter_limit(messages, len(messages) - invalid, invalid)
        for letter in letters:
            self._dead_letter(letter)
        events = out = 0
        fresh = getattr(self.store, "fresh_docs", False)  # a document read is ours to change (no copy needed)
        for visitor in visitors:
            doc = self.store.get(visitor.key, visitor.partition)
            if is_erased(doc):  # an erased visitor: nothing of theirs is placed, linked or emitted again
                metrics.EVENTS_DROPPED.inc(sum(map(len, visitor.messages)))
                continue
            state = VisitorState.from_doc(doc, copy=not fresh)
            out += self._enrich(state, visitor)
            events += sum(map(len, visitor.messages))
            self.store.put(visitor.key, visitor.partition, state.to_doc())
        metrics.MESSAGES_IN.inc(len(messages))
        metrics.EVENTS_IN.inc(events)
        metrics.EVENTS_OUT.inc(out)
        self.outputs.check()
        # Counted once processed rather than once committed: faust hands a message to the agent once per process
        # (a redelivery comes after a restart, or a rebalance that committed the batch or gave it to another
        # worker), and a batch never committed means the process exited, taking these counts with it.
        self.dead_letter_limit.add(len(messages) - invalid, invalid)
        elapsed = time.perf_counter() - started
        metrics.BATCH_EVENTS.observe(events)
        metrics.BATCH_SECONDS.observe(elapsed)
        if elapsed > SLOW_BATCH_S:  # the event loop (heartbeats included) was blocked all that time
            log.warning("slow batch", extra={"seconds": round(elapsed, 3), "messages": len(messages), "events": events})

    def _check_dead_letter_limit(self, messages: Sequence[RawMessage], valid: int, invalid: int) -> None:
        """Ends the process, committing nothing of this batch, if its invalid messages pass the limit."""
        try:
            self.dead_letter_limit.check(valid, invalid)
        except DeadLetterLimitExceeded as exc:
            first = messages[0]
            exit_without_committing(
                EXIT_DEAD_LETTER_LIMIT,
                "dead-letter limit reached; exiting without committing the batch",
                error=str(exc),
                topic=first.topic,
                partition=first.partition,
                offset=first.offset,
                messages=len(messages),
                invalid=invalid,
            )

    def _group(self, messages: Iterable[RawMessage]) -> tuple[list[VisitorGroup], list[Letter]]:
        """The valid events per visitor, and what to dead-letter (not sent yet: the limit is checked first)."""
        by_key: dict[bytes, VisitorGroup] = {}
        letters: list[Letter] = []
        for msg in messages:
            try:
                events = self.reader.read(msg.value)
            except DecodeError as exc:
                letters.append(Letter(msg, Reason.UNDECODABLE, str(exc)))
                continue
            valid: list[RawEvent] = []
            known: set[Any] = set()
            # (tenant_id, widget_id, visitor_id) of an event of this message that `validate` found canonical and
            # keyed right: the lean reader hands the next events of a request the very same str objects, and for
            # those the checks below are what `validate` would do (a function call and three lookups less).
            checked: tuple[Any, ...] = ()
            for item in events:
                record, datum = item
                if (
                    checked
                    and record["tenant_id"] is checked[0]
                    and record["widget_id"] is checked[1]
                    and record["visitor_id"] is checked[2]
                    and (event_type := record["event_type"]) != SESSION_START
                    and (record["user_id"] or event_type != IDENTIFY)
                    and MIN_US <= record["occurred_at"] <= MAX_US
                    and MIN_US <= record["received_at"] <= MAX_US
                    and _CANONICAL_UUID.match(record["event_id"])
                ):
                    valid.append(item)
                    continue
                try:
                    unchanged = validate(record, msg.key, known)
                except InvalidEvent as exc:
                    letters.append(Letter(msg, Reason.INVALID_EVENT, str(exc), self.codec.encode_event(record)))
                    continue
                if unchanged:
                    checked = (record["tenant_id"], record["widget_id"], record["visitor_id"])
                valid.append((record, datum if unchanged else None))
            if valid:
                key = msg.key
                assert key is not None  # validate() checked it is <widget_id>:<visitor_id>
                group = by_key.get(key)
                if group is None:
                    group = by_key[key] = VisitorGroup(key, msg.partition, [], [])
                group.messages.append(valid)
                group.sources.append((msg.topic, msg.partition, msg.offset))
        return list(by_key.values()), letters

    # --- one visitor's events ---------------------------------------------------------------------

    def _enrich(self, state: VisitorState, visitor: VisitorGroup) -> int:
        """Places the visitor's events, stamps session and contact ids and produces one enriched message per
        raw message (several when it would exceed the message size limit). Returns the number of enriched events (with session_starts). The hot loop: ~all events
        pass here."""
        s, key, topic = self.settings, visitor.key, self.topics.enriched_events
        tenant_id = visitor.messages[0][0][0]["tenant_id"]
        if state.links:  # links learned before their contact was erased are forgotten
            state.links = [x for x in state.links if not self._contact_erased(visitor.partition, tenant_id, x[1])]
        header, datum_of, start_datum = (
            self.codec.batch.header,
            self.codec.event.encode_datum,
            self.session_starts.stamped,
        )
        produced = starts = 0
        max_value = self.max_value_bytes - len(key)
        # The hot loop below inlines VisitorState.seen/remember (entries [event_id, t, session start]) and keeps
        # the last session and contact ids with their encoding: a visitor's events mostly share them.
        gap, max_sessions, place = self.gap_us, s.processors_max_sessions, state.place_start
        sessions = state.sessions  # changed in place by place_start, never replaced
        index, remembered = state.index(), state.events
        state.max_events = s.processors_max_recent_events
        links = state.links
        last_user: str | None = None
        last_tenant = tenant_id
        last_start = -1 << 64  # no event time is this small (MIN_US)
        customer_id: str | None = None
        session_id = start_event_id = ""
        stamps: bytes | None = None
        for events, source in zip(visitor.messages, visitor.sources, strict=True):
            # A message's links first: its events before the identify (the usual request: anonymous page views,
            # then the login) are stamped with the contact right away instead of being written anonymous and
            # updated by the sink's retro-link. Per message, so the output never depends on how messages were
            # grouped into batches. A copy of an identify already seen links nothing.
            for record, _ in events:
                if (
                    record["event_type"] == IDENTIFY
                    and state.seen(record["event_id"]) is None
                    and not self._refuse_link(visitor.partition, record)
                    and state.link(record["occurred_at"], record["user_id"], s.processors_max_links)
                ):
                    self._publish_link(key, record)
            out: list[bytes] = []
            for record, datum in events:
                event_id = record["event_id"]
                first = index.get(event_id)
                if first is None:
                    t = record["occurred_at"]
                    # VisitorState.place_start's usual case inline (at or after the latest session's lo, within
                    # the gap of its hi: rules 1 and 2), else the call
                    if sessions and (latest := sessions[-1])[1] <= t <= latest[2] + gap:
                        if t > latest[2]:
                            latest[2] = t
                        start_us = latest[0]
                    else:
                        start_us = place(t, gap, max_sessions)
                    entry = [event_id, t, start_us]
                    remembered.append(entry)
                    index[event_id] = entry
                else:  # a copy: stamped like its first copy, derives nothing new, changes nothing
                    t, start_us = first[1], first[2]
                    if record["occurred_at"] != t:  # a re-send whose clock correction differed: the first time
                        record["occurred_at"], datum = t, None
                if (
                    record["event_type"] == IDENTIFY
                ):  # an identify of an erased contact names nobody (nor its session_start)
                    user = (
                        None
                        if self._contact_erased(visitor.partition, record["tenant_id"], record["user_id"])
                        else record["user_id"]
                    )
                elif links and t >= links[-1][0]:  # the usual case: after the latest link (state.user_at)
                    user = links[-1][1]
                else:
                    user = state.user_at(t)
                if user != last_user or record["tenant_id"] != last_tenant:
                    last_user, last_tenant, stamps = user, record["tenant_id"], None
                    customer_id = contact_id(last_tenant, user) if user else None
                if start_us != last_start:
                    last_start, stamps = start_us, None
                    session_id, start_event_id = session_ids(record["widget_id"], record["visitor_id"], start_us)
                if stamps is None:  # the encoded ids, shared by a run of events of one session and contact
                    stamps = stamp_bytes(session_id, customer_id)
                if t == start_us:  # the event opened its session
                    out.append(start_datum(record, datum, start_event_id, stamps))
                    starts += 1
                if datum is not None:
                    out.append(datum[:-2] + stamps)
                else:
                    record["session_id"], record["customer_id"] = session_id, customer_id
                    out.append(datum_of(record))
            for value in frame_messages(header, out, max_value):
                self.outputs.send(topic, key, value, source=source)
            produced += len(out)
        if starts:
            metrics.SESSION_STARTS.inc(starts)
        return produced

    def _contact_erased(self, partition: int, tenant_id: str, user_id: str) -> bool:
        any_erased = self._contacts_erased_in.get(partition)
        if any_erased is None:
            any_erased = self._contacts_erased_in[partition] = erasures.any_contact_erased(self.store, partition)
        return any_erased and erasures.is_contact_erased(self.store, partition, contact_id(tenant_id, user_id))

    def _refuse_link(self, partition: int, identify: dict[str, Any]) -> bool:
        if self._contact_erased(partition, identify["tenant_id"], identify["user_id"]):
            metrics.LINKS_REFUSED.inc()
            return True
        return False

    def _publish_link(self, key: bytes, identify: dict[str, Any]) -> None:
        link = {
            "tenant_id": identify["tenant_id"],
            "widget_id": identify["widget_id"],
            "visitor_id": identify["visitor_id"],
            "user_id": identify["user_id"],
            "customer_id": contact_id(identify["tenant_id"], identify["user_id"]),
            "linked_at": identify["occurred_at"],
        }
        self.outputs.send(self.topics.identity_links, key, self.links.encode(link))
        metrics.IDENTITY_LINKS.inc()

    # --- output -----------------------------------------------------------------------------------

    def _dead_letter(self, letter: Letter) -> None:
        """Dead-letters a raw message, or with `letter.value` just one bad event out of a VisitorEventBatch message."""
        msg, reason = letter.msg, reason_text(letter.reason, letter.detail)
        log.warning(
            "dead-lettered a raw message",
            extra={"reason": reason, "topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
        )
        headers = dead_letter_headers("processors", reason, msg.topic, msg.partition, msg.offset)
        key, payload = msg.key or b"", letter.value if letter.value is not None else msg.value or b""
        value, headers = fit_dead_letter(key, payload, headers, self.settings.kafka_max_message_bytes)
        self.outputs.send(self.topics.dead_letter, key, value or b"", headers=headers)
        metrics.DEAD_LETTERS.labels(letter.reason).inc()
