"""The FastAPI application: wiring of services, middleware, error handlers and routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from producer_api.errors import install_error_handlers
from producer_api.ingest import IngestService
from producer_api.metrics import ApiMetrics
from producer_api.middleware import ObservabilityMiddleware
from producer_api.producer import EventProducer
from producer_api.routes import ops, track, widget_js
from producer_api.widget_cache import WidgetCache
from site_activity.settings import Settings

log = logging.getLogger(__name__)


def _lifespan(settings: Settings, metrics: ApiMetrics):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        producer = EventProducer(settings, metrics)
        cache = WidgetCache(
            settings.postgres_dsn, settings.widget_cache_refresh_s, on_reload=metrics.widget_cache_reloaded
        )
        producer.start()
        await cache.start()
        metrics.bind_gauges(producer.queue_len, cache.size, lambda: cache.age() or 0.0)
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.producer = producer
        app.state.widget_cache = cache
        app.state.ingest = IngestService(settings, cache, producer, metrics)
        log.info(
            "api ready",
            extra={
                "host": settings.http_host,
                "port": settings.http_port,
                "kafka": settings.kafka_bootstrap,
                "widgets": cache.size(),
            },
        )
        try:
            yield
        finally:
            await cache.stop()
            # In-flight requests have been answered by now (uvicorn drains them first); flush the rest.
            left = await asyncio.to_thread(producer.close, settings.produce_timeout_s + 5)
            log.info("api stopped", extra={"undelivered": left})

    return lifespan


def create_app(settings: Settings, metrics: ApiMetrics | None = None) -> FastAPI:
    metrics = metrics or ApiMetrics()
    app = FastAPI(
        title="Site Activity ingest API",
        version="1",
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan(settings, metrics),
    )
    install_error_handlers(app)
    app.include_router(track.router)
    app.include_router(ops.router)
    app.include_router(widget_js.router)
    # Added last = outermost: CORS wraps everything, including error responses, so browsers can read them.
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After", "ETag"],
        max_age=86400,
    )
    return app
