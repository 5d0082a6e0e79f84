"""In-process cache of widget configs (tenant, tracking switch), refreshed from Postgres in the background.

No request queries Postgres. An id missing from the cache (say a widget created since the last refresh)
makes its request wait for the next full reload, which the miss pulls forward; all misses in flight share
that one reload, and reloads never run more often than every `min_interval_s`, so a flood of garbage ids
costs Postgres at most one reload per interval. When Postgres is down the last known configs keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WidgetConfig:
    tenant_id: str
    tracking_enabled: bool


class CacheUnavailable(Exception):
    """The cache cannot say whether a widget exists (Postgres unreachable and the id not cached)."""


_ALL = "SELECT id::text, tenant_id::text, tracking_enabled FROM widget_configs"


class WidgetCache:
    def __init__(
        self,
        dsn: str,
        refresh_s: float,
        *,
        min_interval_s: float = 0.5,
        query_timeout_s: float = 5.0,
        on_reload: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self._dsn = dsn
        self._on_reload = on_reload
        self._refresh_s = refresh_s
        self._min_interval_s = min(min_interval_s, refresh_s)
        self._timeout = query_timeout_s
        self._configs: dict[str, WidgetConfig] = {}
        self._conn: psycopg.AsyncConnection | None = None
        self._loaded_at: float | None = None  # monotonic time of the last successful reload
        self._healthy = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        # Resolved (with success or not) when the next reload to start has finished.
        self._next_reload: asyncio.Future[bool] | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._next_reload = asyncio.get_running_loop().create_future()
        await self._reload()  # best effort: the API starts (and reports not ready) even if Postgres is down
        self._task = asyncio.create_task(self._refresh_loop(), name="widget-cache-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.close()

    async def _refresh_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            with contextlib.suppress(TimeoutError):  # woken early by a cache miss, or on schedule
                await asyncio.wait_for(self._wakeup.wait(), self._refresh_s - self._min_interval_s)
            self._wakeup.clear()
            waiters, self._next_reload = self._next_reload, asyncio.get_running_loop().create_future()
            ok = await self._reload()
            if waiters is not None and not waiters.done():
                waiters.set_result(ok)
            await asyncio.sleep(self._min_interval_s)  # the rate limit on reloads

    # --- Postgres ---------------------------------------------------------------------------------
    async def _query_all(self) -> list[tuple[str, str, bool]]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=max(2, int(self._timeout))
            )
        try:
            cur = await asyncio.wait_for(self._conn.execute(_ALL), self._timeout)
            return await cur.fetchall()
        except BaseException:
            # A broken or timed-out connection is not reused; the next reload reconnects.
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()
            raise

    async def _reload(self) -> bool:
        ok = await self._reload_once()
        self._on_reload(ok)
        return ok

    async def _reload_once(self) -> bool:
        """Full reload, swapped in atomically; on failure the previous configs stay in place."""
        try:
            rows = await self._query_all()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if self._healthy or self._loaded_at is None:
                log.warning(
                    "widget cache refresh failed; serving last known configs",
                    extra={"error": str(exc), "widgets": len(self._configs)},
                )
            self._healthy = False
            return False
        self._configs = {row[0]: WidgetConfig(row[1], row[2]) for row in rows}
        self._loaded_at = time.monotonic()
        if not self._healthy:
            log.info("widget cache loaded", extra={"widgets": len(self._configs)})
        self._healthy = True
        return True

    # --- lookups ----------------------------------------------------------------------------------
    async def lookup(self, widget_id: str) -> WidgetConfig | None:
        """widget_id is canonical UUID text. None means the widget does not exist."""
        config = self._configs.get(widget_id)
        if config is not None:
            return config
        if not self._healthy or self._next_reload is None or self._wakeup is None:
            raise CacheUnavailable("widget configs cannot be loaded from Postgres")
        reload = self._next_reload
        self._wakeup.set()
        try:
            ok = await asyncio.wait_for(asyncio.shield(reload), self._refresh_s + self._timeout + 1)
        except TimeoutError:
            ok = False
        if not ok:
            raise CacheUnavailable("widget configs cannot be loaded from Postgres")
        return self._configs.get(widget_id)

    # --- state for probes and metrics -----------------------------------------------------------
    def size(self) -> int:
        return len(self._configs)

    def age(self) -> float | None:
        return None if self._loaded_at is None else time.monotonic() - self._loaded_at

    def fresh(self) -> bool:
        age = self.age()
        return self._healthy and age is not None and age < max(3 * self._refresh_s, 5.0)
