"""Prometheus metrics of one API process (own registry, served by GET /metrics)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Paths we label by name; anything else is "other" so random URLs cannot blow up label cardinality.
KNOWN_PATHS = frozenset({"/api/widget/track", "/healthz", "/readyz", "/metrics", "/widget.js"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "site_activity_api_requests_total", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "site_activity_api_request_seconds",
            "HTTP request latency by path",
            ["path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        events = Counter(
            "site_activity_api_events_total",
            "Events by outcome: accepted (written to Kafka), rejected (invalid), "
            "dropped_disabled (widget has tracking off)",
            ["outcome"],
            registry=r,
        )
        self.events_accepted = events.labels("accepted")
        self.events_rejected = events.labels("rejected")
        self.events_dropped_disabled = events.labels("dropped_disabled")
        self.produce_failures = Counter(
            "site_activity_api_produce_failures_total",
            "Kafka messages (one per request) not confirmed by Kafka, by reason",
            ["reason"],
            registry=r,
        )
        self.slow_clients_closed = Counter(
            "site_activity_api_slow_clients_closed_total",
            "Connections cut because a request's headers or body did not arrive within its deadline",
            ["phase"],
            registry=r,
        )
        self.producer_queue = Gauge(
            "site_activity_api_producer_queue_messages", "Messages waiting in the producer queue", registry=r
        )
        self.widget_cache_size = Gauge(
            "site_activity_api_widget_cache_configs", "Widget configs in the cache", registry=r
        )
        self.widget_cache_reloads = Counter(
            "site_activity_api_widget_cache_reloads_total",
            "Full reloads of the widget cache from Postgres",
            ["outcome"],
            registry=r,
        )
        self.widget_cache_age = Gauge(
            "site_activity_api_widget_cache_age_seconds",
            "Seconds since the widget cache was last refreshed from Postgres",
            registry=r,
        )

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        label = path if path in KNOWN_PATHS else "other"
        self.requests.labels(label, str(status)).inc()
        self.latency.labels(label).observe(seconds)

    def widget_cache_reloaded(self, ok: bool) -> None:
        self.widget_cache_reloads.labels("ok" if ok else "failed").inc()

    def bind_gauges(
        self, queue_len: Callable[[], float], cache_size: Callable[[], float], cache_age: Callable[[], float]
    ) -> None:
        self.producer_queue.set_function(queue_len)
        self.widget_cache_size.set_function(cache_size)
        self.widget_cache_age.set_function(cache_age)
