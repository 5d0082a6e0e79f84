"""Request dependencies as Annotated aliases; the objects themselves live on app.state (built in the lifespan).

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, a costly hop per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from producer_api.ingest import IngestService
from producer_api.metrics import ApiMetrics
from producer_api.producer import EventProducer
from producer_api.widget_cache import WidgetCache
from site_activity.topics import Topics


async def get_ingest(request: Request) -> IngestService:
    return request.app.state.ingest  # type: ignore[no-any-return]


async def get_producer(request: Request) -> EventProducer:
    return request.app.state.producer  # type: ignore[no-any-return]


async def get_cache(request: Request) -> WidgetCache:
    return request.app.state.widget_cache  # type: ignore[no-any-return]


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def get_topics(request: Request) -> Topics:
    return Topics.from_settings(request.app.state.settings)


IngestDep = Annotated[IngestService, Depends(get_ingest)]
ProducerDep = Annotated[EventProducer, Depends(get_producer)]
WidgetCacheDep = Annotated[WidgetCache, Depends(get_cache)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
TopicsDep = Annotated[Topics, Depends(get_topics)]
