"""Server-rendered pages (Jinja2, autoescaped); no JavaScript build step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    body = _ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(
        body,
        status_code=status,
        headers={
            # Pages never need to be framed or to run foreign scripts.
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
            **(headers or {}),
        },
    )
