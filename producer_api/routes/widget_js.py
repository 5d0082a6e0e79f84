"""GET /widget.js — the tracking script, minified, with ETag revalidation and gzip."""

from __future__ import annotations

import gzip
from functools import lru_cache

from fastapi import APIRouter, Request, Response

from producer_api.errors import ApiError
from widget.assets import Script, widget_script

router = APIRouter()

_CONTENT_TYPE = "application/javascript; charset=utf-8"


@lru_cache(maxsize=4)
def _gzipped(script: Script) -> bytes:
    return gzip.compress(script.body, 9, mtime=0)


def _gzip_etag(etag: str) -> str:
    # A different byte representation needs its own strong validator.
    return etag[:-1] + '-gzip"'


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and float(q[2:] or 0) == 0)
    return False


def _matches(if_none_match: str, etags: tuple[str, ...]) -> bool:
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in candidates or any(tag in candidates for tag in etags)


@router.api_route("/widget.js", methods=["GET", "HEAD"])
async def widget_js(request: Request) -> Response:
    try:
        script = widget_script()
    except FileNotFoundError:
        raise ApiError(404, "widget_script_missing", "the widget script has not been built") from None
    try:
        use_gzip = _accepts_gzip(request.headers.get("accept-encoding", ""))
    except ValueError:  # a malformed q-value: serve the identity encoding
        use_gzip = False
    etag = _gzip_etag(script.etag) if use_gzip else script.etag
    headers = {
        "ETag": etag,
        "Cache-Control": "public, max-age=300",
        "Vary": "Accept-Encoding",
        # Loaded with <script src> from customers' sites; "*" also lets tooling fetch() it.
        "Access-Control-Allow-Origin": "*",
    }
    if _matches(request.headers.get("if-none-match", ""), (script.etag, _gzip_etag(script.etag))):
        return Response(status_code=304, headers=headers)
    if use_gzip:
        headers["Content-Encoding"] = "gzip"
        return Response(_gzipped(script), media_type=_CONTENT_TYPE, headers=headers)
    return Response(script.body, media_type=_CONTENT_TYPE, headers=headers)
