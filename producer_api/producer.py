"""The Kafka side of the API: one confluent producer, polled by a background thread, and per-request
completion: a request's messages share one counter and one asyncio future, resolved from the delivery
callback, so a 204 is only sent after Kafka acknowledged every message of the request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from producer_api.metrics import ApiMetrics
from site_activity.kafka import producer_config
from site_activity.settings import Settings

log = logging.getLogger(__name__)


class _RepeatFilter(logging.Filter):
    """librdkafka repeats the same line on every reconnect attempt (every few ms while a broker is down);
    let each distinct message through once per `window_s`."""

    def __init__(self, window_s: float = 30.0) -> None:
        super().__init__()
        self._window_s = window_s
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text, now = record.getMessage(), time.monotonic()
        if now - self._seen.get(text, -self._window_s) < self._window_s:
            return False
        if len(self._seen) > 1000:  # bounded memory
            self._seen.clear()
        self._seen[text] = now
        return True


def _librdkafka_logger() -> logging.Logger:
    logger = logging.getLogger("producer_api.librdkafka")
    if not logger.filters:
        logger.addFilter(_RepeatFilter())
    return logger


class ProduceError(Exception):
    """Some message of the request was not (or not yet) written; the client should retry."""


class _PendingRequest:
    """Delivery state of one request's messages. Callbacks run on the poll thread; the future lives on the
    event loop, so it is resolved through call_soon_threadsafe, once, on the first failure or last success."""

    __slots__ = ("_error", "_failures", "_lock", "_loop", "_remaining", "_resolved", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int, failures: Any) -> None:
        self._loop = loop
        self.future: asyncio.Future[str | None] = loop.create_future()
        self._remaining = expected
        self._error: str | None = None
        self._resolved = False
        self._lock = threading.Lock()
        self._failures = failures

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.labels("delivery").inc()
        with self._lock:
            self._remaining -= 1
            if err is not None and self._error is None:
                self._error = err.str()
            if self._resolved or (self._remaining > 0 and self._error is None):
                return
            self._resolved = True
        # RuntimeError: the loop is gone (shutdown), so nobody waits for this request any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._resolve, self._error)

    def _resolve(self, error: str | None) -> None:
        if not self.future.done():  # a timed-out request has cancelled its future
            self.future.set_result(error)


class EventProducer:
    def __init__(self, settings: Settings, metrics: ApiMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        # librdkafka's own log lines go through Python logging (JSON, deduplicated), not raw to stderr.
        self._producer = Producer(producer_config(settings, error_cb=self._on_error, logger=_librdkafka_logger()))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="kafka-delivery", daemon=True)
        self._metadata: tuple[float, bool, str] = (0.0, False, "not checked yet")
        self._metadata_lock = asyncio.Lock()

    def start(self) -> None:
        self._thread.start()

    def queue_len(self) -> int:
        return len(self._producer)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def _on_error(self, err: KafkaError) -> None:
        _librdkafka_logger().warning("kafka client error: %s", err.str(),
                                     extra={"kafka_error": err.name(), "fatal": err.fatal()})

    async def send(self, topic: str, messages: Sequence[tuple[bytes, bytes]], timeout: float) -> None:
        """Produces (key, value) pairs and returns once Kafka confirmed all of them; raises ProduceError."""
        if not messages:
            return
        pending = _PendingRequest(asyncio.get_running_loop(), len(messages), self._metrics.produce_failures)
        produce = self._producer.produce
        for sent, (key, value) in enumerate(messages):
            try:
                produce(topic, value, key, on_delivery=pending.on_delivery)
            except (BufferError, KafkaException) as exc:
                # Messages already queued may still land; the client's retry is deduplicated by event_id.
                reason = "producer queue full" if isinstance(exc, BufferError) else f"produce failed: {exc}"
                self._metrics.produce_failures.labels("queue_full" if isinstance(exc, BufferError) else "produce"
                                                      ).inc(len(messages) - sent)
                raise ProduceError(reason) from None
        try:
            error = await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            self._metrics.produce_failures.labels("timeout").inc(len(messages))
            raise ProduceError(f"Kafka did not confirm delivery within {timeout:g} s") from None
        if error is not None:
            raise ProduceError(f"Kafka delivery failed: {error}")

    async def reachable(self, topic: str, max_age: float = 1.5) -> tuple[bool, str]:
        """Cheap metadata round trip, cached for max_age seconds so probes cannot load the broker."""
        async with self._metadata_lock:
            checked_at, ok, detail = self._metadata
            if time.monotonic() - checked_at < max_age:
                return ok, detail
            ok, detail = await asyncio.to_thread(self._check_metadata, topic)
            self._metadata = (time.monotonic(), ok, detail)
            return ok, detail

    def _check_metadata(self, topic: str) -> tuple[bool, str]:
        try:
            metadata = self._producer.list_topics(timeout=1.0)
        except KafkaException as exc:
            return False, f"metadata request failed: {exc}"
        if topic not in metadata.topics:
            return False, f"topic {topic} does not exist"
        return True, "ok"

    def close(self, timeout: float = 10.0) -> int:
        """Stops polling and flushes what is queued; returns how many messages could not be delivered."""
        self._stop.set()
        self._thread.join(5)
        left = self._producer.flush(timeout)
        if left:
            log.warning("producer closed with undelivered messages", extra={"undelivered": left})
        return left
