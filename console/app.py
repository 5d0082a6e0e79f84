"""The console application: management API (/api/v1) and pages, separate from the ingest API so nothing
here can slow ingest."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from console.errors import install_error_handlers
from console.routes import api, pages
from console.routes import webhooks as webhook_routes  # issue 13: webhook endpoints
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
    app.include_router(pages.router)
    app.include_router(webhook_routes.router)  # issue 13: /api/v1/webhook-endpoints

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
