"""Topic -> queue: reads the sink's source topic in the webhooks' own consumer group and queues a delivery for
each event that was actually stored, then commits its offsets.

"Stored" is decided by Postgres, not by the message: a consumed message waits (in memory, fetching goes on)
until the sink's consumer group has committed past its offset (the sink commits only after its transaction
committed); then its events are looked up in visitor_events. A duplicate the sink skipped finds its delivery
already queued (unique key); an event of a deleted widget, an erased person or past retention is no row and
queues nothing. Commit last, and never past a message still waiting: a crash re-reads what was not queued,
and enqueueing is idempotent. The sink's offsets are read every 50 ms while messages wait, so the reader adds
about that to the sink's own latency. The enqueue itself runs on the dispatcher's loop (Dispatcher.enqueue), which
sends the new deliveries that fit at once: a fresh event is not waiting for a claim or a poll.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.codec import DecodeError, EventDecoder
from site_activity.kafka import consumer_config, next_offsets, position
from site_activity.metrics import Liveness
from site_activity.settings import Settings
from site_activity.topics import Topics
from webhooks import queue
from webhooks.metrics import WebhookMetrics

log = logging.getLogger(__name__)

_POLL_S = 0.5  # idle: how long one consume() waits for messages
_SINK_POLL_S = 0.05  # while messages wait for the sink: how often its committed offsets are read
_DB_BACKOFF_S = 1.0


@dataclass(slots=True)
class Pending:
    """A consumed message waiting for the sink to commit past it, with the keys of its events to look up."""

    message: Message
    keys: list[tuple[uuid.UUID, uuid.UUID]]


class Feeder:
    def __init__(
        self,
        settings: Settings,
        metrics: WebhookMetrics,
        enqueue: Callable[[list[tuple[uuid.UUID, uuid.UUID]], Callable[[], bool]], int | None],
    ) -> None:
        """`enqueue(keys, stopping)` queues (and commits) the deliveries of these stored events' (widget_id,
        event_id) keys and returns how many were new, or None when the stage stops first; it raises
        psycopg.Error when the database fails (Dispatcher.enqueue_from_thread)."""
        self.settings = settings
        self.metrics = metrics
        self.enqueue = enqueue
        topics = Topics.from_settings(settings)
        # Whatever the sink reads is what "stored" refers to.
        self.topic = topics.enriched_events if settings.sink_from_enriched else topics.raw_events
        self.consumer = Consumer(
            consumer_config(settings, settings.webhooks_group, **{"max.poll.interval.ms": 300_000})
        )
        self.admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        self.decoder = EventDecoder()
        self.liveness = Liveness(max_silence_s=60.0)
        self.stopping = threading.Event()
        # Consumed, in order, not yet queued: the sink has not committed past them yet.
        self.pending: list[Pending] = []
        self._paused = False  # too much pending (the sink is behind or down): stop fetching until it drains
        self._conn: psycopg.Connection | None = None

    # --- loop ---------------------------------------------------------------------------------------

    def run(self) -> None:
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        log.info("webhooks reader started", extra={"topic": self.topic, "group": self.settings.webhooks_group})
        try:
            while not self.stopping.is_set():
                self.liveness.tick()
                messages = self._consume(
                    self.settings.webhooks_batch_max_messages, _SINK_POLL_S if self.pending else _POLL_S
                )
                if messages:
                    self._add(messages)
                if self.pending:
                    self._release()
                self._throttle()
        finally:
            self.liveness.running = False
            self.consumer.close()
            if self._conn is not None:
                self._conn.close()
        log.info("webhooks reader stopped")

    def stop(self) -> None:
        self.stopping.set()

    def _consume(self, n: int, timeout: float) -> list[Message]:
        """Whatever is there now (up to n); if nothing, waits up to `timeout` for the first message. (consume()
        with a timeout would wait for all n or the whole timeout: latency we do not want.)"""
        got = self.consumer.consume(n, 0)
        if not got:
            first = self.consumer.poll(timeout)
            got = [first, *self.consumer.consume(n - 1, 0)] if first is not None else []
        good = []
        for msg in got:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer error", extra={"error": str(err)})
        self.metrics.consumed.inc(len(good))
        return good

    def _throttle(self) -> None:
        """Backpressure: while more than a few batches wait for the sink, fetch nothing more."""
        limit = 10 * self.settings.webhooks_batch_max_messages
        if not self._paused and len(self.pending) >= limit:
            self._paused = True
            self.consumer.pause(self.consumer.assignment())
        elif self._paused and len(self.pending) < limit // 2:
            self._paused = False
            self.consumer.resume(self.consumer.assignment())

    # --- steps ----------------------------------------------------------------------------------------

    def _add(self, messages: list[Message]) -> None:
        tenants = self._db(queue.tenants_with_endpoints)
        if tenants is None:
            return  # stopping; nothing committed
        self.pending.extend(Pending(msg, self._keys(msg, tenants)) for msg in messages)

    def _keys(self, msg: Message, tenants: set[str]) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(widget_id, event_id) of the message's events of tenants that have an enabled endpoint. A message
        the codec cannot read was dead-lettered by the sink, never stored: no keys."""
        if not tenants:
            return []
        try:
            events = self.decoder.decode_events(msg.value())
        except DecodeError:
            return []
        keys = []
        for event in events:
            if str(event["tenant_id"]) not in tenants:
                continue
            try:  # a malformed id is a row the database refused: never stored
                keys.append((uuid.UUID(str(event["widget_id"])), uuid.UUID(str(event["event_id"]))))
            except ValueError:
                continue
        return keys

    def _release(self) -> None:
        """Queues the deliveries of every pending message the sink has committed past, then commits those
        offsets. Messages without keys (no endpoint in their tenant) need no wait."""
        waiting = {position(p.message)[1] for p in self.pending if p.keys}
        committed = self._sink_offsets(sorted(waiting))
        ready, rest = [], []
        for p in self.pending:
            _, partition, offset = position(p.message)
            if not p.keys or offset < committed.get(partition, -1):
                ready.append(p)
            else:
                rest.append(p)
        # Offsets are committed per partition up to the first message still waiting, never past it.
        first_waiting: dict[int, int] = {}
        for p in rest:
            _, partition, offset = position(p.message)
            first_waiting.setdefault(partition, offset)
        ready = [p for p in ready if position(p.message)[2] < first_waiting.get(position(p.message)[1], 1 << 62)]
        if not ready:
            return
        keys = [k for p in ready for k in p.keys]
        if keys:
            oldest = min(p.message.timestamp()[1] for p in ready if p.keys) / 1000
            if not self._enqueue(keys):
                return
            self.metrics.sink_wait_seconds.observe(max(0.0, time.time() - oldest))
        done = {id(p) for p in ready}
        self.pending = [p for p in self.pending if id(p) not in done]
        try:
            self.consumer.commit(offsets=next_offsets([p.message for p in ready]), asynchronous=False)
        except KafkaException as exc:  # a rebalance took them; enqueueing again is harmless
            log.warning("offset commit failed", extra={"error": str(exc)})
        self.metrics.batches.inc()

    def _sink_offsets(self, partitions: list[int]) -> dict[int, int]:
        if not partitions:
            return {}
        request = ConsumerGroupTopicPartitions(
            self.settings.sink_group, [TopicPartition(self.topic, p) for p in partitions]
        )
        try:
            [future] = self.admin.list_consumer_group_offsets([request], request_timeout=10).values()
            answer = future.result()
        except KafkaException as exc:
            log.warning("cannot read the sink's offsets", extra={"error": str(exc)})
            time.sleep(_SINK_POLL_S)
            return {}
        return {tp.partition: tp.offset for tp in answer.topic_partitions if tp.error is None}

    def _enqueue(self, keys: list[tuple[uuid.UUID, uuid.UUID]]) -> bool:
        """Queues the keys' deliveries, retrying a failing database until it works; False when stopping."""
        while not self.stopping.is_set():
            try:
                added = self.enqueue(keys, self.stopping.is_set)
            except psycopg.Error as exc:
                log.warning("queueing deliveries failed; retrying", extra={"error": str(exc)})
                self.liveness.tick()
                self.stopping.wait(_DB_BACKOFF_S)
                continue
            if added is None:
                return False
            self.metrics.enqueued.inc(added)
            return True
        return False

    def _db(self, step: Callable[[psycopg.Connection], object]):  # type: ignore[no-untyped-def]
        """Runs `step` on the reader's connection; on a database error reconnects and retries until it works
        or the stage stops (then None)."""
        while not self.stopping.is_set():
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.settings.postgres_dsn,
                        autocommit=True,
                        connect_timeout=5,
                        application_name="site-activity-webhooks",
                    )
                return step(self._conn)
            except psycopg.Error as exc:
                self.metrics.db_errors.labels("enqueue").inc()
                log.warning("database step failed; retrying", extra={"error": str(exc)})
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self.liveness.tick()
                self.stopping.wait(_DB_BACKOFF_S)  # an outage past max.poll.interval only costs a rejoin
        return None

    # --- rebalance ----------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        if self._paused:
            consumer.pause(partitions)
        log.info("partitions assigned", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Pending messages of these partitions are dropped uncommitted: the next owner re-reads them
        # (enqueueing is idempotent).
        gone = {tp.partition for tp in partitions}
        self.pending = [p for p in self.pending if p.message.partition() not in gone]
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})
