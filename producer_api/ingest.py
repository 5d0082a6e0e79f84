"""What `POST /api/widget/track` does, between reading the body and writing the response."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import KafkaError

from producer_api.errors import ApiError
from producer_api.metrics import ApiMetrics
from producer_api.producer import EventProducer, ProduceError, Unwritable
from producer_api.validation import Limits, Rejection, build_events, parse_envelope
from producer_api.widget_cache import CacheUnavailable, WidgetCache
from schemas.codec import EventCodec
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: int = 0  # events durably written to Kafka
    rejected: list[Rejection] = field(default_factory=list)


class IngestService:
    def __init__(self, settings: Settings, cache: WidgetCache, producer: EventProducer, metrics: ApiMetrics) -> None:
        self.limits = Limits.from_settings(settings)
        self._topic = Topics.from_settings(settings).raw_events
        self._timeout = settings.produce_timeout_s
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}
        self._cache = cache
        self._producer = producer
        self._metrics = metrics
        self._codec = EventCodec()

    def _unavailable(self, error: str, reason: str) -> ApiError:
        return ApiError(503, error, reason, headers=self._retry_after)

    def _unwritable(self, exc: Unwritable) -> ApiError:
        """Kafka refused the request's message for what it is, so a retry can never succeed: a 4xx, never a
        503. Too large (the broker's or topic's limit below kafka_max_message_bytes): 413, split the request."""
        if exc.code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE):
            return ApiError(413, "batch_too_large", f"{exc}; send these events in smaller requests")
        return ApiError(422, "unwritable_events", f"{exc}; do not retry")

    async def ingest(self, body: bytes) -> Outcome:
        """Publishes the request's valid events and returns the rejected ones. Raises ApiError when the request
        as a whole is refused (then nothing was published) or when Kafka did not confirm the valid events."""
        received_at = datetime.now(UTC)
        envelope = parse_envelope(body, self.limits)
        try:
            widget = await self._cache.lookup(envelope.widget_id)
        except CacheUnavailable as exc:
            raise self._unavailable("widget_config_unavailable", str(exc)) from None
        if widget is None:
            raise ApiError(404, "unknown_widget", f"no widget with id {envelope.widget_id}")
        if not widget.tracking_enabled:
            # The spec's silent drop: the page keeps calling, nothing is recorded, nothing shows in consoles.
            self._metrics.events_dropped_disabled.inc(len(envelope.events))
            return Outcome()

        events, rejected = build_events(envelope, widget.tenant_id, received_at, self.limits)
        if rejected:
            self._metrics.events_rejected.inc(len(rejected))
        if events:
            # Publish in event time: a shuffled or clock-jittered request then reaches the processors in the order
            # the visitor acted, so only whole late requests are out of order downstream (stable for ties).
            events.sort(key=lambda e: e["occurred_at"])
            # One message per request: all its events share the visitor's key anyway, and downstream consumers
            # (faust above all) pay their per-message cost once per request instead of once per event.
            value = self._codec.encode_events(events)
            if len(value) > self.limits.max_raw_message_bytes:
                # Every field is within its limit, but together they do not fit one Kafka message (only when
                # max_body_bytes is set above what kafka_max_message_bytes takes): the client must split the
                # request. Nothing is written. (How much the processors' output grows does not matter: they
                # split it by size.)
                raise ApiError(
                    413,
                    "batch_too_large",
                    f"these events take {len(value)} bytes once encoded, at most "
                    f"{self.limits.max_raw_message_bytes} per request; send them in smaller requests",
                    limit=self.limits.max_raw_message_bytes,
                )
            message = (event_key(envelope.widget_id, envelope.visitor_id), value)
            try:
                await self._producer.send(self._topic, [message], self._timeout)
            except Unwritable as exc:
                raise self._unwritable(exc) from None
            except ProduceError as exc:
                raise self._unavailable("kafka_unavailable", str(exc)) from None
            self._metrics.events_accepted.inc(len(events))
        return Outcome(len(events), rejected)
