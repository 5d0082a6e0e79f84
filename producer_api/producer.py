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
from site_activity.dead_letters import is_unwritable
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
    """Some message of the request was not (or not yet) written; the client should retry (unless it is the
    subclass Unwritable)."""


class Unwritable(ProduceError):
    """Kafka refused a message for what it is (too large for message.max.bytes or the topic, an invalid
    record: dead_letters.UNWRITABLE), not for the cluster's state: the same bytes can never be written, so
    the client must not retry them. `code` is the KafkaError code."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.code = code


class _PendingRequest:
    """Delivery state of one request's messages. Callbacks run on the poll thread; the future lives on the
    event loop, so it is resolved through call_soon_threadsafe, once, on the first failure or last success."""

    __slots__ = ("_error", "_failures", "_lock", "_loop", "_remaining", "_resolved", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int, failures: Any) -> None:
        self._loop = loop
        self.future: asyncio.Future[KafkaError | None] = loop.create_future()
        self._remaining = expected
        self._error: KafkaError | None = None
        self._resolved = False
        self._lock = threading.Lock()
        self._failures = failures

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures.labels("unwritable" if is_unwritable(err) else "delivery").inc()
        with self._lock:
            self._remaining -= 1
            if err is not None and self._error is None:
                self._error = err
            if self._resolved or (self._remaining > 0 and self._error is None):
                return
            self._resolved = True
        # RuntimeError: the loop is gone (shutdown), so nobody waits for this request any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._resolve, self._error)

    def _resolve(self, error: KafkaError | None) -> None:
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
        _librdkafka_logger().warning(
            "kafka client error: %s", err.str(), extra={"kafka_error": err.name(), "fatal": err.fatal()}
        )

    async def send(self, topic: str, messages: Sequence[tuple[bytes, bytes]], timeout: float) -> None:
        """Produces (key, value) pairs and returns once Kafka confirmed all of them. Raises Unwritable when
        Kafka refuses a message for what it is (at produce() or in its delivery report; with several messages,
        the others may still land), ProduceError when it did not confirm them for now (queue full, broker
        trouble, timeout: the same messages can be retried)."""
        if not messages:
            return
        pending = _PendingRequest(asyncio.get_running_loop(), len(messages), self._metrics.produce_failures)
        produce = self._producer.produce
        for sent, (key, value) in enumerate(messages):
            try:
                produce(topic, value, key, on_delivery=pending.on_delivery)
            except KafkaException as exc:
                # Messages already queued may still land; a retry is deduplicated downstream by event_id.
                if is_unwritable(exc.args[0]):  # e.g. MSG_SIZE_TOO_LARGE: over message.max.bytes
                    self._metrics.produce_failures.labels("unwritable").inc(len(messages) - sent)
                    raise Unwritable(f"Kafka refused the message: {exc.args[0].str()}", exc.args[0].code()) from None
                self._metrics.produce_failures.labels("produce").inc(len(messages) - sent)
                raise ProduceError(f"produce failed: {exc}") from None
            except BufferError:
                # Messages already queued may still land; the client's retry is deduplicated by event_id.
                self._metrics.produce_failures.labels("queue_full").inc(len(messages) - sent)
                raise ProduceError("producer queue full") from None
        try:
            error = await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            self._metrics.produce_failures.labels("timeout").inc(len(messages))
            raise ProduceError(f"Kafka did not confirm delivery within {timeout:g} s") from None
        if error is not None and is_unwritable(error):  # e.g. the topic's max.message.bytes is lower than ours
            raise Unwritable(f"Kafka refused the message: {error.str()}", error.code())
        if error is not None:
            raise ProduceError(f"Kafka delivery failed: {error.str()}")

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
