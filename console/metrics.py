"""Prometheus metrics of one console process (own registry, served by GET /metrics): requests by route and
status, their latency, and the Postgres connection pool (a pool that runs out is what turns into 503s)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _PoolCollector(Collector):
    """The pool's own counts at scrape time (psycopg_pool's get_stats), so they are never stale."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.pool.get_stats()
        connections = GaugeMetricFamily("site_activity_console_db_pool_connections",
                                        "Postgres connections of the console's pool, by state", labels=["state"])
        connections.add_metric(["open"], stats.get("pool_size", 0))
        connections.add_metric(["idle"], stats.get("pool_available", 0))
        connections.add_metric(["max"], stats.get("pool_max", 0))
        yield connections
        yield GaugeMetricFamily("site_activity_console_db_pool_waiting_requests",
                                "Requests waiting for a free Postgres connection", value=stats.get("requests_waiting", 0))


class ConsoleMetrics:
    def __init__(self, pool: ConnectionPool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("site_activity_console_requests_total",
                                "HTTP requests by route (the path template, e.g. /api/v1/visitors/{visitor_id}), "
                                "method and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("site_activity_console_request_seconds", "HTTP request latency by route",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def install(app: FastAPI, metrics: ConsoleMetrics) -> None:
    """Counts every request under its route template (unknown paths as "other", so random URLs cannot grow the
    label set) and serves GET /metrics."""

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500  # an exception escaping the app's handlers is answered 500 by the server
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "other")
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    @app.get("/metrics", include_in_schema=False)
    def metrics_page() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
