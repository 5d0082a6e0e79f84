"""Reads a request body under a size cap, before and after gzip decompression.

The cap is enforced while streaming: a lying or absent Content-Length cannot make us buffer more than the
cap, and a gzip bomb is inflated at most cap + 1 bytes before it is refused."""

from __future__ import annotations

import zlib

from starlette.requests import ClientDisconnect, Request

from producer_api.errors import ApiError

_GZIP_WBITS = zlib.MAX_WBITS | 16  # gzip container only
_JSON_TYPES = frozenset({"application/json", "text/plain", ""})


def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, "body_too_large", f"request body exceeds {limit} bytes {what}", limit=limit)


def check_content_type(content_type: str) -> None:
    """JSON may arrive as text/plain: that is what lets the browser skip the CORS preflight."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES and not media.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", f"send the events as application/json or text/plain, not {media!r}"
        )


class _Inflater:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._inflater = zlib.decompressobj(_GZIP_WBITS)
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        pending = chunk
        try:
            while pending:
                # max_length bounds the output of one call; the rest of the input waits in unconsumed_tail.
                part = self._inflater.decompress(pending, self._limit - self._size + 1)
                self._size += len(part)
                if self._size > self._limit:
                    raise _too_large(self._limit, "after gzip decompression")
                self._parts.append(part)
                if self._inflater.eof and self._inflater.unused_data:
                    raise ApiError(400, "malformed_body", "unexpected data after the end of the gzip stream")
                pending = self._inflater.unconsumed_tail
        except zlib.error as exc:
            raise ApiError(400, "malformed_body", f"body is not valid gzip: {exc}") from None

    def result(self) -> bytes:
        if not self._inflater.eof:
            raise ApiError(400, "malformed_body", "gzip body is truncated")
        return b"".join(self._parts)


async def read_body(request: Request, limit: int) -> bytes:
    headers = request.headers
    check_content_type(headers.get("content-type", ""))
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise ApiError(415, "unsupported_content_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, "(Content-Length)")

    inflater = _Inflater(limit) if encoding != "identity" else None
    parts: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _too_large(limit, "")
            if inflater is not None:
                inflater.feed(chunk)
            else:
                parts.append(chunk)
    except ClientDisconnect:
        # The client went away, or the body deadline cut it off (http_protocol.py); nobody reads this answer.
        raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
    return inflater.result() if inflater is not None else b"".join(parts)
