"""Prometheus metrics of one console process (own registry, served by GET /metrics): requests by route and
status, their latency, and the Postgres connection pool (a pool that runs out is what turns into 503s)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class _PoolCollector(Collector):
    """The pool's own counts at scrape time (psycopg_pool's get_stats), so they are never stale."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.pool.get_stats()
        connections = GaugeMetricFamily(
            "site_activity_console_db_pool_connections",
            "Postgres connections of the console's pool, by state",
            labels=["state"],
        )
        connections.add_metric(["open"], stats.get("pool_size", 0))
        connections.add_metric(["idle"], stats.get("pool_available", 0))
        connections.add_metric(["max"], stats.get("pool_max", 0))
        yield connections
        yield GaugeMetricFamily(
            "site_activity_console_db_pool_waiting_requests",
            "Requests waiting for a free Postgres connection",
            value=stats.get("requests_waiting", 0),
        )


class ConsoleMetrics:
    def __init__(self, pool: ConnectionPool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "site_activity_console_requests_total",
            "HTTP requests by route (the path template, e.g. /api/v1/visitors/{visitor_id}), method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "site_activity_console_request_seconds",
            "HTTP request latency by route, to the last byte of the body (streamed exports included)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Observe:
    """Pure ASGI middleware, outermost: a request is counted when its last body chunk is sent (a streamed zip
    export is timed to its end; an error while streaming counts as 500), under the route template it matches,
    even when an inner middleware (the rate limiter) answered before routing. Unknown paths count as "other",
    so random URLs cannot grow the label set."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI, metrics: ConsoleMetrics) -> None:
        self.app = app
        self.fastapi = fastapi
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, done = time.perf_counter(), 500, False

        async def observed_send(message: Message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = self._route(scope)
            self.metrics.requests.labels(route, scope["method"], str(status if done else 500)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _route(self, scope: Scope) -> str:
        matched = scope.get("route")
        if matched is not None:
            return str(getattr(matched, "path", "other"))
        for route in self.fastapi.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", "other"))
        return "other"


def install(app: FastAPI, metrics: ConsoleMetrics) -> None:
    """Serves GET /metrics and counts every request (call last, so the counting middleware is outermost)."""

    @app.get("/metrics", include_in_schema=False)
    def metrics_page() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Observe, fastapi=app, metrics=metrics)
