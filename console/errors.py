"""Errors leave the console API as JSON `{"error": <slug>, "reason": <text>}` (never FastAPI's 422), and the
pages as a small HTML page with the same reason."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_SLUGS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    415: "unsupported_media_type",
    500: "internal",
}


class ConsoleError(Exception):
    """An answer other than success, raised anywhere below a route."""

    def __init__(
        self, status: int, reason: str, *, error: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error or _SLUGS.get(status, "error")
        self.headers = headers


def not_found(what: str = "no such object") -> ConsoleError:
    return ConsoleError(404, what)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/")


def _render(request: Request, status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> Response:
    if _wants_html(request):
        from console.templating import render

        return render(
            request,
            "message.html",
            {"title": error.replace("_", " ").capitalize(), "message": reason},
            status=status,
            headers=headers,
        )
    return JSONResponse({"error": error, "reason": reason}, status_code=status, headers=headers)


def _validation_reason(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError) -> Response:
        return _render(request, exc.status, exc.error, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return _render(request, 400, "invalid_request", _validation_reason(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail: Any = exc.detail
        return _render(
            request, exc.status_code, _SLUGS.get(exc.status_code, "error"), str(detail), getattr(exc, "headers", None)
        )

    @app.exception_handler(PoolTimeout)
    async def database_busy(request: Request, exc: PoolTimeout) -> Response:
        # Every pooled connection stayed busy (or Postgres is unreachable) for the pool's timeout: a retry later
        # can succeed, unlike a 500.
        log.warning("no database connection available", extra={"path": request.url.path, "error": str(exc)})
        return _render(
            request, 503, "unavailable", "the database is busy or unreachable; retry shortly", {"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("console request failed", extra={"path": request.url.path})
        return _render(request, 500, "internal", "internal error; see the console's log")
