"""The console application: management API (/api/v1) and pages, separate from the ingest API so nothing
here can slow ingest."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from psycopg_pool import ConnectionPool

from console import metrics as console_metrics
from console import ratelimit
from console.cursors import Cursors, RailTokens
from console.errors import install_error_handlers
from console.metrics import ConsoleMetrics
from console.routes import activity_pages, api, dashboard_pages, pages, read_api, stats
from console.routes import exports as export_routes
from console.routes import webhooks as webhook_routes
from console.security import Signer, load_secret
from site_activity.erasure import kafka_notifier
from site_activity.settings import Settings

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def make_pool(settings: Settings) -> ConnectionPool:
    """The console's Postgres connections: opened once and reused (a new connection per request costs a backend
    fork and authentication, several ms of every dashboard call); a request waits up to 5 s for a free one, then
    gets a 503 (console.errors)."""
    return ConnectionPool(
        settings.postgres_dsn,
        min_size=1,
        max_size=settings.console_db_pool_size,
        timeout=5.0,
        open=False,
        name="console",
        check=ConnectionPool.check_connection,
        kwargs={"autocommit": True, "connect_timeout": 5, "application_name": "site-activity-console"},
    )


def create_app(settings: Settings) -> FastAPI:
    pool = make_pool(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.open()  # without waiting: the console starts (and /healthz answers) while Postgres is still down
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(
        title="Site Activity console",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
        lifespan=lifespan,
    )
    app.state.pool = pool
    app.state.settings = settings
    app.state.signer = Signer(load_secret(settings), settings.console_session_ttl_s)
    app.state.notify = kafka_notifier(settings)  # erasures tell the processors through Kafka
    install_error_handlers(app)
    app.include_router(api.router)
    app.include_router(export_routes.router)
    app.include_router(webhook_routes.router)
    app.include_router(pages.router)
    # --- read API + activity pages (issue 12: events / visitors / timelines) ---
    secret = load_secret(settings)
    app.state.read_cursors = Cursors(secret)
    app.state.rail_tokens = RailTokens(secret, settings.console_rail_token_ttl_s)
    app.include_router(read_api.router)
    app.include_router(activity_pages.router)
    ratelimit.install(app, settings.console_api_rate_limit_per_min)
    # --- read surfaces (issue 12): stats API, Site Activity dashboard, its static files ---
    app.include_router(stats.router)
    app.include_router(dashboard_pages.router)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # A caller's X-Request-ID (if sane) is kept so the audit row can be matched to their logs.
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    console_metrics.install(app, ConsoleMetrics(pool))  # last: its middleware is the outermost
    return app
