"""Prometheus metrics of one sink process (own registry); site_activity.metrics serves them with /healthz."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class SinkMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = "site_activity_sink"
        self.consumed = Counter(f"{p}_messages_consumed", "Messages read from the event topic", registry=r)
        self.rows_written = Counter(f"{p}_rows_written", "Event rows inserted into visitor_events", registry=r)
        self.rows_skipped = Counter(
            f"{p}_rows_skipped", "Rows not inserted: already present (redelivery) or widget deleted", registry=r
        )
        self.rows_expired = Counter(
            f"{p}_rows_expired", "Rows not stored: already older than their widget's retention", registry=r
        )
        self.rows_erased = Counter(
            f"{p}_rows_erased", "Rows not stored: their visitor, user or contact was erased", registry=r
        )
        self.customers_upserted = Counter(f"{p}_customers_upserted", "Contacts created or updated", registry=r)
        self.events_relinked = Counter(f"{p}_events_relinked", "Anonymous events linked to a contact", registry=r)
        self.batches = Counter(f"{p}_batches", "Batches written and committed", registry=r)
        self.batch_seconds = Histogram(
            f"{p}_batch_seconds",
            "Write + dead-letter + commit time of one batch",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.step_seconds = Counter(
            f"{p}_write_step_seconds", "Time spent in each step of the batch transactions", ["step"], registry=r
        )
        self.batch_size = Histogram(
            f"{p}_batch_messages",
            "Messages per batch",
            registry=r,
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000),
        )
        self.dead_letters = Counter(
            f"{p}_dead_letters", "Messages sent to the dead-letter topic", ["reason"], registry=r
        )
        self.db_retries = Counter(f"{p}_db_retries", "Batch attempts that failed transiently", registry=r)
        self.commit_failures = Counter(f"{p}_commit_failures", "Offset commits that failed", registry=r)
        # Tansu reports wrong end offsets, so this is only meaningful against real Kafka.
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_messages", "High watermark minus committed offset (messages)", ["partition"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
