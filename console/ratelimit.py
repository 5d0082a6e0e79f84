"""Per-API-key rate limit for /api/v1 (token bucket; in memory, so per console process).

The bucket is keyed by the SHA-256 of the presented Bearer secret, so an invalid key is limited too (no free
brute force) and the secret itself is never kept. Capacity = the per-minute limit (a full minute's burst),
refilled continuously at limit/60 per second."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

_MAX_KEYS = 100_000  # buckets kept; full buckets are dropped first when over (they carry no state)


class TokenBuckets:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: bytes) -> float:
        """0.0 when the request may go ahead (a token is spent), else the seconds until one is available."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._trim(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 60.0

    def _trim(self, now: float) -> None:
        if len(self._buckets) <= _MAX_KEYS:
            return
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.capacity:
                del self._buckets[key]


def install(app, per_minute: int) -> None:  # type: ignore[no-untyped-def]
    """Adds the limit to every /api/v1 request that presents an Authorization header."""
    buckets = TokenBuckets(per_minute)

    @app.middleware("http")
    async def rate_limit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        header = request.headers.get("authorization")
        if header and request.url.path.startswith("/api/v1/"):
            wait = buckets.take(hashlib.sha256(header.encode()).digest())
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return JSONResponse(
                    {
                        "error": "rate_limited",
                        "reason": f"more than {per_minute} requests per minute with this API key; retry in {retry} s",
                    },
                    status_code=429,
                    headers={"Retry-After": str(retry)},
                )
        return await call_next(request)
