"""`site-activity sink`: consumes the event topic and writes it to Postgres, effectively once.

At-least-once delivery (offsets are committed only after the database transaction and the dead letters are
durable) plus idempotent writes (ON CONFLICT DO NOTHING, trait merge by event time) = every event once.
Migrations are not run here: `site-activity migrate` does that.

A batch goes through four steps, commit last:

    1 decode           (this thread)     Avro -> rows; undecodable messages become dead letters
    2 write            (writer thread)   one Postgres transaction; rows the database rejects become dead letters
    3 dead-letter      (this thread)     published and confirmed by the broker
    4 commit offsets   (this thread)     synchronous, explicit: last offset + 1 per partition

At most one batch is being written at a time; the next one is consumed and decoded meanwhile (decoding is
Python CPU, the write mostly waits on Postgres, so the two overlap). Batches are settled in order.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from schemas.codec import EventDecoder
from sink.batch import Batch
from sink.dead_letter import DeadLetterError, DeadLetterPublisher
from sink.metrics import SinkMetrics
from sink.records import DecodedBatch
from sink.writer import EventWriter, TransientError, WriteResult
from site_activity.dead_letters import EXIT_DEAD_LETTER_LIMIT, DeadLetterLimit, DeadLetterLimitExceeded, Reason
from site_activity.kafka import consumer_config, next_offsets
from site_activity.lag import sink_group, start_lag_metrics
from site_activity.metrics import Liveness, serve_http
from site_activity.settings import Settings
from site_activity.topics import Topics

log = logging.getLogger(__name__)

_POLL_S = 0.5  # upper bound on one consume() call, so a stop request is seen quickly
_SETTLE_POLL_S = 0.02  # while a write is in flight, look back soon to commit it
_FIRST_BACKOFF_S = 0.2
_RETRYABLE = (TransientError, DeadLetterError)


@dataclass
class InFlight:
    batch: DecodedBatch
    write: Future[WriteResult]
    started: float = field(default_factory=time.perf_counter)


class Sink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        topics = Topics.from_settings(settings)
        self.source_topic = topics.enriched_events if settings.sink_from_enriched else topics.raw_events
        self.metrics = SinkMetrics()
        self.liveness = Liveness(max_silence_s=max(30.0, 3 * settings.sink_retry_max_backoff_s))
        self.codec = EventDecoder()
        self.writer = EventWriter(settings.postgres_dsn, rollups=settings.sink_rollups)
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-writer")  # owns the connection
        self.dead_letters = DeadLetterPublisher(settings, topics.dead_letter)
        self.dead_letter_limit = DeadLetterLimit.from_settings(settings)
        # We keep calling consume() while backing off (partitions paused), so the poll interval is never
        # exceeded by a database outage; the bound only has to cover one slow batch write.
        self.consumer = Consumer(consumer_config(settings, settings.sink_group, **{"max.poll.interval.ms": 300_000}))
        self.batch = Batch(settings.sink_batch_max_events, settings.sink_batch_max_s)
        self.inflight: InFlight | None = None  # step 2 running or done, steps 3-4 not yet
        self.pending: DecodedBatch | None = None  # decoded, waiting for the write in flight to settle
        self.stopping = threading.Event()
        self._backing_off = False

    # --- the loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Consumes, writes and commits until `stop()`; returns the exit status (0, or EXIT_DEAD_LETTER_LIMIT
        when the input turned invalid wholesale: nothing of the offending batch is committed)."""
        self.consumer.subscribe(
            [self.source_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("sink started", extra={"topic": self.source_topic, "group": self.settings.sink_group})
        try:
            while not self.stopping.is_set():
                self.liveness.tick()
                timeout = min(_POLL_S, self.batch.age_left_s(), _SETTLE_POLL_S if self.inflight else _POLL_S)
                self._accept(self.consumer.consume(self.batch.room(), timeout))
                if self.batch.due():
                    self._hand_over()
                elif self.inflight and self.inflight.write.done():
                    self._settle()
            self._drain(retry=False)  # the last partial batch, then leave the group
        except DeadLetterLimitExceeded as exc:
            # Stopping: leaving the group must not write (and count) the held batches again on revoke.
            self.stopping.set()
            self.inflight = None
            log.critical(
                "dead-letter limit reached; stopping without committing the batch",
                extra={"error": str(exc), "topic": self.source_topic, "group": self.settings.sink_group},
            )
            return EXIT_DEAD_LETTER_LIMIT
        finally:
            self.liveness.running = False
            self.consumer.close()
            self._db.submit(self.writer.close).result()
            self._db.shutdown()
            self.dead_letters.close()
        log.info("sink stopped")
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def _accept(self, messages: list[Message]) -> None:
        good = []
        for msg in messages:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            else:  # transient broker/client conditions; librdkafka recovers by itself
                log.warning("consumer error", extra={"error": str(err)})
        self.metrics.consumed.inc(len(good))
        self.batch.add(good)

    # --- the steps ----------------------------------------------------------------------------------

    def _hand_over(self, retry: bool = True) -> bool:
        """Step 1 now (overlapping the write in flight), then settles that write and starts this one."""
        self.pending = DecodedBatch.of(self.batch.take(), self.codec)
        settled = self._settle(retry)
        pending, self.pending = self.pending, None  # a revoke while settling may have shrunk it
        if not settled:
            return False  # an earlier batch is uncommitted: committing this one would skip past it
        if pending is not None and pending.messages:
            self._submit(pending)
        return True

    def _submit(self, decoded: DecodedBatch) -> None:
        self.inflight = InFlight(decoded, self._db.submit(self.writer.write, decoded.rows))

    def _settle(self, retry: bool = True) -> bool:
        """Waits for the write in flight, then steps 3 and 4. A transient failure is retried with backoff
        (retry=True) or the batch is dropped uncommitted, to be redelivered (retry=False: stop, revoke);
        returns False in that case."""
        attempt = 0
        settled = True
        while self.inflight is not None:
            job = self.inflight
            try:
                result = job.write.result()
                valid, invalid = _messages_valid_invalid(job.batch, result)
                self.dead_letter_limit.check(valid, invalid)
                self.dead_letters.publish(job.batch.letters + result.rejected)
                self._commit(next_offsets(job.batch.messages))
                self.dead_letter_limit.add(valid, invalid)
            except _RETRYABLE as exc:
                if not retry or self.stopping.is_set():
                    log.warning(
                        "batch not written, left uncommitted for redelivery",
                        extra={"error": str(exc), "messages": len(job.batch.messages)},
                    )
                    self.inflight = None
                    settled = False
                    break
                self.metrics.db_retries.inc()
                attempt += 1
                delay = min(self.settings.sink_retry_max_backoff_s, _FIRST_BACKOFF_S * 2 ** (attempt - 1))
                log.warning(
                    "batch not written, retrying",
                    extra={
                        "error": str(exc),
                        "attempt": attempt,
                        "retry_in_s": delay,
                        "messages": len(job.batch.messages),
                    },
                )
                self._back_off(delay)  # a revoke meanwhile may shrink or clear self.inflight
                if self.inflight is not None:
                    self._submit(self.inflight.batch)
                continue
            self.inflight = None
            self._record(job, result)
        if self._backing_off:
            self._backing_off = False
            self.consumer.resume(self.consumer.assignment())
            log.info("resumed after retries", extra={"attempts": attempt})
        return settled

    def _drain(self, retry: bool) -> None:
        """Writes and commits everything held: the write in flight and the batch being filled."""
        if self.batch and not self._hand_over(retry):
            return
        self._settle(retry)

    def _commit(self, offsets: list[TopicPartition]) -> None:
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The rows are durable; a redelivery after a rebalance is skipped by ON CONFLICT.
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed", extra={"error": str(exc)})
            return
        self._observe_lag(offsets)

    def _record(self, job: InFlight, result: WriteResult) -> None:
        m = self.metrics
        m.batch_seconds.observe(time.perf_counter() - job.started)
        m.batch_size.observe(len(job.batch.messages))
        m.batches.inc()
        m.rows_written.inc(result.inserted)
        # max(0, …): after a lost assignment the batch may be smaller than what its write stored
        m.rows_skipped.inc(
            max(0, len(job.batch.rows) - len(result.rejected) - result.inserted - result.expired - result.erased)
        )
        m.rows_expired.inc(result.expired)
        m.rows_erased.inc(result.erased)
        m.customers_upserted.inc(result.customers)
        m.events_relinked.inc(result.relinked)
        for step, seconds in result.step_seconds.items():
            m.step_seconds.labels(step).inc(seconds)
        if job.batch.letters:
            m.dead_letters.labels(Reason.UNDECODABLE).inc(len(job.batch.letters))
        if result.rejected:
            m.dead_letters.labels(Reason.DB_REJECTED).inc(len(result.rejected))

    def _back_off(self, delay: float) -> None:
        """Waits without fetching more (partitions paused) while still serving the group protocol."""
        if not self._backing_off:
            self._backing_off = True
            self.consumer.pause(self.consumer.assignment())
        deadline = time.monotonic() + delay
        while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            self.liveness.tick()
            # Paused partitions return nothing; messages only arrive for partitions assigned meanwhile.
            self._accept(self.consumer.consume(self.batch.room(), min(_POLL_S, left)))

    def _observe_lag(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0:
                self.metrics.consumer_lag.labels(str(tp.partition)).set(max(0, high - tp.offset))

    # --- rebalance ----------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        if self._backing_off:  # a new assignment starts unpaused; keep the no-fetch promise while retrying
            consumer.pause(partitions)
        log.info("partitions assigned", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Write what we hold while we still own it, so the next owner does not redo it. Never block a
        # rebalance on a failing database: then the batch is dropped, uncommitted, for the next owner.
        if not self._backing_off and not self.stopping.is_set():
            self._drain(retry=False)
        self._drop(partitions, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, "lost")  # no longer ours: committing would fail anyway

    def _drop(self, partitions: list[TopicPartition], why: str) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self.batch.drop_partitions(gone)
        if self.pending is not None:
            kept_pending = self.pending.without(gone)
            dropped += len(self.pending.messages) - len(kept_pending.messages)
            self.pending = kept_pending
        if self.inflight is not None:
            # Only reached between write attempts (backing off) or after a lost assignment; wait out a write
            # still running so it cannot commit for partitions we no longer own.
            self.inflight.write.exception()
            kept = self.inflight.batch.without(gone)
            dropped += len(self.inflight.batch.messages) - len(kept.messages)
            self.inflight = InFlight(kept, self.inflight.write) if kept.messages else None
        log.info(f"partitions {why}", extra={"partitions": [tp.partition for tp in partitions], "dropped": dropped})


def _messages_valid_invalid(batch: DecodedBatch, result: WriteResult) -> tuple[int, int]:
    """(valid, invalid) messages of a written batch, for the dead-letter limit: a message is invalid when it was
    undecodable or the database refused one of its rows."""
    invalid = {(d.source.topic, d.source.partition, d.source.offset) for d in batch.letters + result.rejected}
    return max(len(batch.messages) - len(invalid), 0), len(invalid)


def run(settings: Settings) -> int:
    sink = Sink(settings)
    # kafka_consumergroup_* gauges of the sink's own group on its /metrics (issue 13: consumer lag).
    lag = start_lag_metrics(sink.metrics.registry, settings, [sink_group(settings)])
    # Probes (Kubernetes) reach the pod's address: bind where the settings say, like every stage.
    server = serve_http(settings.http_host, settings.sink_http_port, sink.metrics, sink.liveness)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", extra={"signal": signal.Signals(signum).name})
        sink.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return sink.run()
    finally:
        server.shutdown()
        lag.stop()
