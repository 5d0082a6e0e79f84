"""Every error leaves the API as JSON `{"error": <slug>, "reason": <text>, ...}`; FastAPI's 422 never does."""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    try:
        content = orjson.dumps(body)
    except TypeError:  # a reason quoting client text orjson refuses (an unpaired surrogate): escape it instead
        content = json.dumps(body).encode()
    return Response(content, status_code=status, media_type="application/json", headers=headers)


class ApiError(Exception):
    """An answer other than success; raised anywhere below a route, rendered by the handler below."""

    def __init__(
        self, status: int, error: str, reason: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.headers = headers
        self.extra = extra

    def response(self) -> Response:
        return json_response(self.status, {"error": self.error, "reason": self.reason, **self.extra}, self.headers)


_HTTP_SLUGS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    slug = _HTTP_SLUGS.get(exc.status_code, "http_error")
    return json_response(exc.status_code, {"error": slug, "reason": str(exc.detail)}, dict(exc.headers or {}))


async def _validation_error(_: Request, exc: Exception) -> Response:
    # Routes read raw bodies, so this only fires for malformed query/path input; still a 400, never a 422.
    assert isinstance(exc, RequestValidationError)
    reasons = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
    return json_response(400, {"error": "invalid_request", "reason": reasons or "invalid request"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
