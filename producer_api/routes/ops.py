"""Probes and metrics: GET /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producer_api.deps import MetricsDep, ProducerDep, TopicsDep, WidgetCacheDep
from producer_api.errors import json_response

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return json_response(200, {"status": "ok"})


@router.get("/readyz")
async def readyz(producer: ProducerDep, cache: WidgetCacheDep, topics: TopicsDep) -> Response:
    """Ready = this replica can accept and durably write events: Kafka answers and the widget configs have
    been loaded once. Postgres is reported but does not gate: while it is down the cached configs keep
    serving, and taking every replica out of the load balancer for it would refuse all traffic instead."""
    kafka_ok, kafka_detail = await producer.reachable(topics.raw_events)
    age = cache.age()
    loaded = age is not None
    postgres_ok = cache.fresh()
    postgres_detail = (
        "never loaded widget configs"
        if age is None
        else f"widget configs refreshed {age:.1f} s ago" + ("" if postgres_ok else " (stale)")
    )
    ready = kafka_ok and loaded
    return json_response(
        200 if ready else 503,
        {
            "status": "ready" if ready else "not_ready",
            "kafka": {"ok": kafka_ok, "detail": kafka_detail},
            "widget_cache": {"ok": loaded, "widgets": cache.size()},
            "postgres": {"ok": postgres_ok, "detail": postgres_detail},
        },
    )


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    body = await asyncio.to_thread(generate_latest, m.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
