"""The console application: management API (/api/v1) and pages, separate from the ingest API so nothing
here can slow ingest."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from console.errors import install_error_handlers
from console.routes import api, pages
# --- read API + activity pages (issue 12: events / visitors / timelines) ---
from console import ratelimit
from console.cursors import Cursors, RailTokens
from console.routes import activity_pages, read_api
from console.routes import exports as export_routes  # export bundles (issue 13)
from console.routes import dashboard_pages, stats  # read surfaces (issue 12): stats API + dashboard
from console.security import Signer, load_secret
from site_activity.erasure import kafka_notifier
from site_activity.settings import Settings

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="Site Activity console", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/v1/openapi.json")
    app.state.settings = settings
    app.state.signer = Signer(load_secret(settings), settings.console_session_ttl_s)
    app.state.notify = kafka_notifier(settings)  # erasures tell the processors through Kafka
    install_error_handlers(app)
    app.include_router(api.router)
    app.include_router(export_routes.router)  # export bundles (issue 13)
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

    return app
