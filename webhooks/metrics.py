"""Prometheus metrics of one webhooks process (own registry); served with the sink's /healthz + /metrics server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from site_activity.metrics import Liveness


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = "site_activity_webhooks"
        self.consumed = Counter(f"{p}_messages_consumed", "Messages read from the event topic", registry=r)
        self.enqueued = Counter(
            f"{p}_deliveries_enqueued", "Deliveries queued (stored event x matching endpoint)", registry=r
        )
        self.handed_over = Counter(
            f"{p}_deliveries_handed_over",
            "Deliveries queued already leased to this process and sent without a claim",
            registry=r,
        )
        self.lease_expired = Counter(
            f"{p}_leases_left_to_expire",
            "Held deliveries not sent because their lease would run out first (a slow endpoint); claimed again later",
            registry=r,
        )
        self.batches = Counter(f"{p}_batches", "Topic batches enqueued and committed", registry=r)
        self.sink_wait_seconds = Histogram(
            f"{p}_queue_lag_seconds",
            "Age (since produced) of the oldest message of each queued batch",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.attempts = Counter(f"{p}_attempts", "Delivery attempts by outcome", ["result"], registry=r)
        self.failures = Counter(f"{p}_attempt_failures", "Failed attempts by reason", ["reason"], registry=r)
        self.succeeded = Counter(f"{p}_deliveries_succeeded", "Deliveries answered with 2xx", registry=r)
        self.exhausted = Counter(
            f"{p}_deliveries_failed", "Deliveries whose every scheduled attempt failed", registry=r
        )
        self.disabled = Counter(f"{p}_endpoints_disabled", "Endpoints disabled by the stage", ["reason"], registry=r)
        self.attempt_seconds = Histogram(
            f"{p}_attempt_seconds",
            "Duration of one attempt (request to response)",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
        )
        self.queue_delay_seconds = Histogram(
            f"{p}_first_attempt_delay_seconds",
            "From a delivery being queued to its first attempt",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.claim_seconds = Histogram(
            f"{p}_claim_seconds",
            "One claim of due deliveries (query and lease)",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.in_flight = Gauge(
            f"{p}_in_flight_deliveries", "Deliveries claimed by this process and not finished", registry=r
        )
        self.db_errors = Counter(
            f"{p}_db_errors", "Database operations that failed and were retried", ["step"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AllAlive:
    """Healthy while every loop of the process (topic reader, dispatcher) keeps ticking."""

    def __init__(self, *parts: Liveness) -> None:
        self.parts = parts

    def alive(self) -> bool:
        return all(p.alive() for p in self.parts)
