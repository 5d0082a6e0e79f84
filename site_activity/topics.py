"""Every topic name and its layout, in one place. Producers, processors and the sink import from here."""

from __future__ import annotations

from dataclasses import dataclass

from site_activity.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


@dataclass(frozen=True)
class Topics:
    # Raw events as accepted by the API, keyed by "<widget_id>:<visitor_id>". Kept for replay.
    raw_events: str
    # Raw events plus session_id / customer_id and derived session_start events; what the sink reads.
    enriched_events: str
    # visitor -> contact links from identify calls; compacted, latest link per visitor.
    identity_links: str
    # Messages no stage could process, with the reason in headers.
    dead_letter: str
    # Erased visitors, keyed like the raw topic (co-partitioned with it); compacted. The processors drop
    # the visitor's state and ignore their events from then on (site_activity/erasure.py).
    erasures: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        p = settings.topic_prefix
        return cls(
            raw_events=f"{p}.events.raw",
            enriched_events=f"{p}.events.enriched",
            identity_links=f"{p}.identity.links",
            dead_letter=f"{p}.dead-letter",
            erasures=f"{p}.erasures",
        )

    def specs(self, settings: Settings) -> list[TopicSpec]:
        n = settings.topic_partitions
        events_ms = str(settings.topic_events_retention_ms)
        return [
            TopicSpec(self.raw_events, n, {"cleanup.policy": "delete", "retention.ms": events_ms}),
            TopicSpec(self.enriched_events, n, {"cleanup.policy": "delete", "retention.ms": events_ms}),
            TopicSpec(self.identity_links, n, {"cleanup.policy": "compact"}),
            TopicSpec(
                self.dead_letter,
                1,
                {"cleanup.policy": "delete", "retention.ms": str(settings.topic_dead_letter_retention_ms)},
            ),
            TopicSpec(self.erasures, n, {"cleanup.policy": "compact"}),
        ]


def event_key(widget_id: str, visitor_id: str) -> bytes:
    """One visitor's events on one widget share a key, so they stay ordered in one partition."""
    return f"{widget_id}:{visitor_id}".encode()


# What an event-topic record takes in a message besides its value. librdkafka checks key + value + headers +
# the record's own framing against message.max.bytes (settings.kafka_max_message_bytes): the key is
# "<widget_id>:<visitor_id>", at most 36 + 1 + 4 × 128 = 549 bytes (a canonical UUID, ':', 128 characters of
# at most 4 UTF-8 bytes); the framing is at most 36 bytes (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD: varint lengths,
# attributes, timestamp and offset deltas); event records carry no headers. Rounded up to leave slack.
KEY_AND_FRAMING_BYTES = 1024


def max_event_value_bytes(settings: Settings) -> int:
    """The largest value (encoded VisitorEventBatch, in bytes) one message on the raw or enriched topic may
    carry so that the producers' message.max.bytes never refuses it: kafka_max_message_bytes minus the key
    and framing (KEY_AND_FRAMING_BYTES). The API refuses a request whose raw message is bigger (413
    batch_too_large); the processors split enriched output into messages of at most this size."""
    return settings.kafka_max_message_bytes - KEY_AND_FRAMING_BYTES
