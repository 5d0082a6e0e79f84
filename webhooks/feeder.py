"""Topic -> queue: reads the sink's source topic in the webhooks' own consumer group and queues a delivery for
each event that was actually stored, then commits its offsets.

"Stored" is decided by Postgres, not by the message: for each batch we wait until the sink's consumer group has
committed past the batch's offsets (the sink commits only after its transaction committed), then look the
events up in visitor_events. A duplicate the sink skipped finds its delivery already queued (unique key); an
event of a deleted widget, an erased person or past retention is no row and queues nothing. Commit last: a
crash before the commit re-reads the batch, and enqueueing is idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import psycopg
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from sink.batch import next_offsets
from sink.metrics import Liveness
from sink.records import EventDecoder
from schemas.codec import DecodeError
from site_activity.kafka import consumer_config
from site_activity.settings import Settings
from site_activity.topics import Topics
from webhooks import queue
from webhooks.metrics import WebhookMetrics

log = logging.getLogger(__name__)

_POLL_S = 0.5
_SINK_POLL_S = 0.05  # how often the sink's committed offsets are read while a batch waits for them
_DB_BACKOFF_S = 1.0


class Feeder:
    def __init__(self, settings: Settings, metrics: WebhookMetrics, wake: Callable[[], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.wake = wake  # tells the dispatcher that new deliveries may be due
        topics = Topics.from_settings(settings)
        # Whatever the sink reads is what "stored" refers to.
        self.topic = topics.enriched_events if settings.sink_from_enriched else topics.raw_events
        self.consumer = Consumer(consumer_config(settings, settings.webhooks_group,
                                                 **{"max.poll.interval.ms": 300_000}))
        self.admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        self.decoder = EventDecoder()
        self.liveness = Liveness(max_silence_s=60.0)
        self.stopping = threading.Event()
        self._revoked: set[int] = set()
        self._paused = False  # while a batch waits for the sink: partitions assigned meanwhile start paused too
        self._conn: psycopg.Connection | None = None

    # --- loop ---------------------------------------------------------------------------------------

    def run(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("webhooks reader started", extra={"topic": self.topic, "group": self.settings.webhooks_group})
        try:
            while not self.stopping.is_set():
                self.liveness.tick()
                messages = self._consume(self.settings.webhooks_batch_max_messages, _POLL_S)
                if messages:
                    self._handle(messages)
        finally:
            self.liveness.running = False
            self.consumer.close()
            if self._conn is not None:
                self._conn.close()
        log.info("webhooks reader stopped")

    def stop(self) -> None:
        self.stopping.set()

    def _consume(self, n: int, timeout: float) -> list[Message]:
        good = []
        for msg in self.consumer.consume(n, timeout):
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer error", extra={"error": str(err)})
        self.metrics.consumed.inc(len(good))
        return good

    def _handle(self, messages: list[Message]) -> None:
        self._revoked.clear()
        keys = self._keys(messages)
        if keys:
            started = time.perf_counter()
            if not self._wait_for_sink(messages):
                return  # stopping: left uncommitted, re-read by whoever owns the partitions next
            self.metrics.sink_wait_seconds.observe(time.perf_counter() - started)
            messages = [m for m in messages if m.partition() not in self._revoked]
            kept = {(m.partition()) for m in messages}
            keys = [k for k, p in keys if p in kept]
            if not self._enqueue(keys):
                return
        messages = [m for m in messages if m.partition() not in self._revoked]
        if messages:
            try:
                self.consumer.commit(offsets=next_offsets(messages), asynchronous=False)
            except KafkaException as exc:  # a rebalance took them; enqueueing again is harmless
                log.warning("offset commit failed", extra={"error": str(exc)})
        self.metrics.batches.inc()

    # --- steps ----------------------------------------------------------------------------------------

    def _keys(self, messages: list[Message]) -> list[tuple[tuple[uuid.UUID, uuid.UUID], int]]:
        """((widget_id, event_id), partition) of the events of tenants that have an enabled endpoint. Messages
        the codec cannot read were dead-lettered by the sink, never stored: skipped."""
        tenants = self._db(queue.tenants_with_endpoints)
        if tenants is None or not tenants:
            return []
        keys = []
        for msg in messages:
            try:
                events = self.decoder.decode_events(msg.value())
            except DecodeError:
                continue
            for event in events:
                if str(event["tenant_id"]) not in tenants:
                    continue
                try:  # a malformed id is a row the database refused: never stored
                    key = (uuid.UUID(str(event["widget_id"])), uuid.UUID(str(event["event_id"])))
                except ValueError:
                    continue
                keys.append((key, msg.partition()))
        return keys

    def _wait_for_sink(self, messages: list[Message]) -> bool:
        """Until the sink's group has committed at least our next offset on every partition of the batch
        (keeps serving the group protocol meanwhile: partitions paused, consume() still called)."""
        wanted = {tp.partition: tp.offset for tp in next_offsets(messages)}
        self._paused = True
        self.consumer.pause(self.consumer.assignment())
        try:
            while not self.stopping.is_set():
                wanted = {p: o for p, o in wanted.items() if p not in self._revoked}
                committed = self._sink_offsets(list(wanted))
                if all(committed.get(p, -1) >= o for p, o in wanted.items()):
                    return True
                self.liveness.tick()
                self._consume(1, _SINK_POLL_S)  # paused: returns nothing, but runs rebalance callbacks
            return False
        finally:
            self._paused = False
            self.consumer.resume(self.consumer.assignment())

    def _sink_offsets(self, partitions: list[int]) -> dict[int, int]:
        if not partitions:
            return {}
        request = ConsumerGroupTopicPartitions(self.settings.sink_group,
                                               [TopicPartition(self.topic, p) for p in partitions])
        try:
            [future] = self.admin.list_consumer_group_offsets([request], request_timeout=10).values()
            answer = future.result()
        except KafkaException as exc:
            log.warning("cannot read the sink's offsets", extra={"error": str(exc)})
            time.sleep(_SINK_POLL_S)
            return {}
        return {tp.partition: tp.offset for tp in answer.topic_partitions if tp.error is None}

    def _enqueue(self, keys: list[tuple[uuid.UUID, uuid.UUID]]) -> bool:
        added = self._db(lambda conn: queue.enqueue(conn, keys))
        if added is None:
            return False
        self.metrics.enqueued.inc(added)
        if added:
            self.wake()
        return True

    def _db(self, step: Callable[[psycopg.Connection], object]):  # type: ignore[no-untyped-def]
        """Runs `step` on the reader's connection; on a database error reconnects and retries until it works
        or the stage stops (then None)."""
        while not self.stopping.is_set():
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.settings.postgres_dsn, autocommit=True, connect_timeout=5,
                                                 application_name="site-activity-webhooks")
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
        # A batch in hand loses these partitions: the next owner re-reads them (enqueueing is idempotent).
        self._revoked.update(tp.partition for tp in partitions)
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})
