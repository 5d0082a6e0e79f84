"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs too much per request at our rates)."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer_api.errors import json_response
from producer_api.metrics import ApiMetrics

log = logging.getLogger(__name__)


class ObservabilityMiddleware:
    """Counts requests by status and times them; turns an unexpected exception into a JSON 500.

    It sits inside the CORS middleware, so even that 500 carries CORS headers and the widget can read it."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path"), "method": scope.get("method")})
            if started:
                raise
            response = json_response(500, {"error": "internal_error", "reason": "unexpected server error"})
            await response(scope, receive, send_and_record)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status, time.perf_counter() - start)
