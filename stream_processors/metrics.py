"""Prometheus metrics of the processors, on the processors' own registry (served on /metrics by the faust web
server, with the consumer-lag gauges `main.py` adds and the process/platform/GC collectors so operators still see
RSS and CPU). Not prometheus_client's global default registry: two stages in one process never share or clash."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

MESSAGES_IN = Counter(
    "site_activity_processors_messages_in_total",
    "Raw messages processed (one per ingest request, or one per event from older producers)",
    registry=REGISTRY,
)
EVENTS_IN = Counter(
    "site_activity_processors_events_in_total", "Raw events processed (valid ones, all messages)", registry=REGISTRY
)
EVENTS_OUT = Counter(
    "site_activity_processors_events_out_total",
    "Records written to the enriched topic (input events plus session_start events)",
    registry=REGISTRY,
)
SESSION_STARTS = Counter(
    "site_activity_processors_session_starts_total", "session_start events emitted", registry=REGISTRY
)
IDENTITY_LINKS = Counter(
    "site_activity_processors_identity_links_total", "Links published on the identity-links topic", registry=REGISTRY
)
DEAD_LETTERS = Counter(
    "site_activity_processors_dead_letters_total",
    "Dead letters by reason: undecodable raw messages, single invalid events out of a VisitorEventBatch message,"
    " output records the broker can never take",
    ["reason"],
    registry=REGISTRY,
)
BATCH_EVENTS = Histogram(
    "site_activity_processors_batch_events",
    "Valid events per processed take() batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "site_activity_processors_batch_seconds",
    "Time to process one take() batch (its outputs are handed over, not yet delivered)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
INPUT_AGE = Histogram(
    "site_activity_processors_input_age_seconds",
    "Age of each batch's oldest raw message when the batch starts (now minus its Kafka timestamp):"
    " how far behind the raw topic the worker is",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
    registry=REGISTRY,
)
# Erasures (erasures.py, processor.py) and state expiry (store.py).
ERASURES_APPLIED = Counter(
    "site_activity_processors_erasures_total", "Erasure markers applied to visitor state", registry=REGISTRY
)
LINKS_REFUSED = Counter(
    "site_activity_processors_erased_contact_links_total",
    "Links to erased contacts refused or forgotten by the processors",
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    "site_activity_processors_erased_events_total",
    "Events of erased visitors dropped by the processors",
    registry=REGISTRY,
)
STATE_EXPIRED = Counter(
    "site_activity_processors_state_expired_total",
    "Idle visitors whose session state was dropped (horizon reached), by outcome",
    ["outcome"],
    registry=REGISTRY,
)
