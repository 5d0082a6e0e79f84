"""Queue -> HTTP: claims due deliveries and POSTs them, signed (Standard Webhooks, via `standardwebhooks`).

One asyncio loop; every request is its own task, so a slow or dead endpoint only holds its own slots: at most
`webhooks_endpoint_concurrency` per endpoint (1 while it is failing) and `webhooks_max_in_flight` in all.
Work arrives two ways, both leases on rows of the Postgres queue:
  - handed over: the reader's enqueue runs here (enqueue()), and the new deliveries of healthy endpoints that
    fit this process's room come back leased from that same statement and are sent at once, no claim needed;
  - claimed: whatever else is due (retries, replays, deliveries that did not fit, leases of a dead process),
    claimed while there may be more (each finished request frees a slot) and otherwise every poll interval.
Outcomes are written in groups, one statement per group (webhooks.queue.record). Rules:
  2xx                                   success
  410 Gone                              the endpoint is disabled (reason kept for its admins)
  anything else, timeout, no connection retried on webhooks_retry_schedule_s (Retry-After honoured); after the
                                        last attempt the delivery is `failed`
  failing for webhooks_disable_after_s  the endpoint is disabled
Redirects are not followed (a 3xx is a failure), as the Standard Webhooks spec asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import aiohttp
import psycopg
from standardwebhooks import Webhook

from site_activity.metrics import Liveness
from site_activity.settings import Settings
from webhooks import endpoints, queue
from webhooks.metrics import WebhookMetrics
from webhooks.queue import Claimed, Outcome
from webhooks.urls import GuardedResolver, refused_literal

log = logging.getLogger(__name__)

USER_AGENT = "site-activity-webhooks/1"
_ERROR_BODY_BYTES = 512  # of a failed response's body, kept in the log
# Outcomes are gathered this long into one transaction: only the log and the leases wait for it, never a send.
_RECORD_EVERY_S = 0.1
_DB_BACKOFF_S = 1.0
_LEASE_MARGIN_S = 2.0  # an attempt starts only if timeout + this is left of its lease
_MAX_RETRY_AFTER_S = 24 * 3600


def retry_delay(schedule: Sequence[float], attempts_done: int, retry_after_s: float | None = None) -> float | None:
    """Seconds until the next attempt after `attempts_done` attempts (schedule[attempts_done], with up to 10 %
    jitter, at least Retry-After); None when the schedule is spent."""
    if attempts_done >= len(schedule):
        return None
    delay = float(schedule[attempts_done])
    delay += random.uniform(0, 0.1 * delay)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, _MAX_RETRY_AFTER_S))
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds form; an HTTP date is ignored)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


class Dispatcher:
    def __init__(self, settings: Settings, metrics: WebhookMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.liveness = Liveness(max_silence_s=60.0)
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        # A claim is a lease: long enough that an attempt in flight (bounded by the timeout) is never claimed
        # again by another process; short enough that a crashed process's claims come back soon. A delivery
        # that waited for a slot so long that its attempt could outlast the lease is not sent but left to its
        # lease (claimed again once it runs out), so a held delivery is never sent twice at once.
        self.lease_s = 2 * settings.webhooks_timeout_s + 5
        # Deliveries held per healthy endpoint (sending + waiting for one of its request slots): two rounds of
        # requests until its attempts were timed, then up to the prefetch -- so that a burst of fresh events is
        # handed over whole and the next requests are at hand when slots free up -- but only as many as its
        # recent attempt durations let finish within a lease (see _held_limit).
        self.prefetch = max(settings.webhooks_endpoint_prefetch, 2 * settings.webhooks_endpoint_concurrency)
        self._attempt_s: dict[uuid.UUID, float] = {}  # per endpoint: moving average of attempt durations
        self.in_flight: dict[uuid.UUID, int] = {}  # claimed and not finished, per endpoint
        self._slots: dict[uuid.UUID, asyncio.Semaphore] = {}  # requests actually sending, per endpoint
        self._tasks: set[asyncio.Task[None]] = set()
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        self._signers: dict[str, Webhook] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._record_conn: psycopg.AsyncConnection | None = None
        self._http: aiohttp.ClientSession | None = None  # made in run(): it needs the running loop
        self._refused: dict[str, str | None] = {}
        self._db_lock = asyncio.Lock()  # claim and enqueue: one at a time, each sees the other's leases
        self._enqueue_conn: psycopg.AsyncConnection | None = None
        self._claim_conn: psycopg.AsyncConnection | None = None
        # Whether a claim may find something now: the last claim filled up (a freed slot should claim again),
        # deliveries were queued that did not fit, or a retry is due before the next poll.
        self.more_due = True

    def _due_now(self) -> None:
        self.more_due = True
        self.wake.set()

    def _room(self) -> tuple[dict[uuid.UUID, int], int, int]:
        """What this process may still take: per endpoint it already holds (room), for any other endpoint
        (default), in all. Claimed and handed-over deliveries share it."""
        room = {
            ep: max(0, self._held_limit(ep) - self.in_flight.get(ep, 0))
            for ep in self.in_flight.keys() | self._attempt_s.keys()
        }
        default = 2 * self.settings.webhooks_endpoint_concurrency  # an endpoint not timed yet
        return room, default, max(0, self.settings.webhooks_max_in_flight - len(self._tasks))

    def _held_limit(self, endpoint_id: uuid.UUID) -> int:
        """How many deliveries to hold for a healthy endpoint: as many as its slots get through, at its recent
        attempt duration, before a lease would run out -- between two rounds (also while it is not timed yet)
        and the prefetch."""
        concurrency = self.settings.webhooks_endpoint_concurrency
        seen = self._attempt_s.get(endpoint_id)
        if seen is None:
            return 2 * concurrency
        budget_s = self.lease_s - self.settings.webhooks_timeout_s - _LEASE_MARGIN_S
        rounds = budget_s / max(seen, 0.001)
        return max(2 * concurrency, min(self.prefetch, int(concurrency * rounds)))

    # --- handed over by the reader ----------------------------------------------------------------------

    async def enqueue(self, keys: list[tuple[uuid.UUID, uuid.UUID]]) -> int:
        """Queues the deliveries of these stored events (webhooks.queue: (widget_id, event_id) keys; committed
        when this returns) and starts sending those leased to this process. Returns the number queued.
        Raises psycopg.Error when the database fails (nothing is sent then; the reader retries)."""
        async with self._db_lock:  # room is computed and used without a claim in between
            try:
                if self._enqueue_conn is None or self._enqueue_conn.closed:
                    self._enqueue_conn = await self._connect()
                room, room_default, room_total = self._room()
                if self.stopping.is_set():
                    room_total = 0  # queue them due, for whichever process runs next; none held here
                leased_at = time.monotonic()  # no later than the lease's start in the database
                added, left, taken = await queue.enqueue_and_take(
                    self._enqueue_conn,
                    keys,
                    room=room,
                    room_default=room_default,
                    room_total=room_total,
                    lease_s=self.lease_s,
                )
            except psycopg.Error:
                self.metrics.db_errors.labels("enqueue").inc()
                if self._enqueue_conn is not None:
                    await self._enqueue_conn.close()
                    self._enqueue_conn = None
                raise
            self.metrics.handed_over.inc(len(taken))
            for job in taken:
                self._start(job, leased_at)
        if left:
            self._due_now()
        return added

    def enqueue_from_thread(self, keys: list[tuple[uuid.UUID, uuid.UUID]], stopping: Callable[[], bool]) -> int | None:
        """For the reader thread: enqueue() on this loop, waiting for it; None when the stage stops first (then
        nothing may be assumed committed). Raises what enqueue() raises."""
        loop = self._loop
        while loop is None:  # the reader may start a moment before the dispatcher loop
            if stopping():
                return None
            time.sleep(0.01)
            loop = self._loop
        future = asyncio.run_coroutine_threadsafe(self.enqueue(keys), loop)
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if stopping() or self.stopping.is_set():
                    future.cancel()  # leased rows of a cancelled enqueue are sent when their lease runs out
                    return None

    # --- main loop ------------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        allow = self.settings.webhooks_allow_private_urls
        # No DNS cache: every new connection resolves again and (unless allowed) checks every address.
        connector = aiohttp.TCPConnector(
            limit=self.settings.webhooks_max_in_flight,
            limit_per_host=0,
            use_dns_cache=False,
            resolver=None if allow else GuardedResolver(),
            keepalive_timeout=30,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        )

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._http = self._session()
        recorder = asyncio.create_task(self._recorder())
        log.info("webhooks dispatcher started")
        try:
            while not self.stopping.is_set():
                self.liveness.tick()
                if not await self._claim_round():
                    await self._sleep(_DB_BACKOFF_S)
                    continue
                # Claim again when deliveries may be due (see more_due) and a slot is free, or at the poll
                # interval (retries falling due, replays, other processes' leases running out).
                await self._wait(self.settings.webhooks_poll_interval_s)
        finally:
            # Let requests in flight finish (each is bounded by the timeout), record them, then stop.
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.settings.webhooks_timeout_s + 1)
            self._outcome_ready.set()
            recorder.cancel()
            await self._flush()
            for c in (self._claim_conn, self._record_conn, self._enqueue_conn):
                if c is not None:
                    await c.close()
            await self._http.close()
            self.liveness.running = False
            log.info("webhooks dispatcher stopped")

    async def _claim_round(self) -> bool:
        """Claims what is due and fits, and starts sending it; False when the database failed."""
        async with self._db_lock:
            room, room_default, room_total = self._room()
            if room_total <= 0:
                return True  # every slot is taken: a finished request wakes the loop
            # An endpoint that holds all its room may have more due than this claim could take.
            capped = any(n == 0 for n in room.values())
            self.more_due = False
            try:
                if self._claim_conn is None or self._claim_conn.closed:
                    self._claim_conn = await self._connect()
                began = time.perf_counter()
                leased_at = time.monotonic()
                # Up to the prefetch per endpoint: the next requests are at hand when a slot frees, so claiming
                # (a database round trip) overlaps sending.
                claimed = await queue.claim(
                    self._claim_conn,
                    room_total=room_total,
                    room=room,
                    room_default=room_default,
                    busy=dict(self.in_flight),
                    lease_s=self.lease_s,
                )
                self.metrics.claim_seconds.observe(time.perf_counter() - began)
            except psycopg.Error as exc:
                self.metrics.db_errors.labels("claim").inc()
                log.warning("claiming deliveries failed; retrying", extra={"error": str(exc)})
                if self._claim_conn is not None:
                    await self._claim_conn.close()
                    self._claim_conn = None
                self.more_due = True
                return False
            for job in claimed:
                self._start(job, leased_at)
            # Something was due, so more may be (what did not fit): a freed slot claims again. (more_due may
            # also have been set meanwhile by the reader.)
            self.more_due = self.more_due or bool(claimed) or capped or len(claimed) >= room_total
            return True

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    async def _connect(self) -> psycopg.AsyncConnection:
        # plan_cache_mode: the foreign-key checks of every queued delivery (-> visitor_events) and logged attempt
        # (-> webhook_deliveries) run plans Postgres caches per connection. A generic plan made while a table was
        # small is a sequential scan and stays until the table is next analyzed: measured at 1,000 events/s on a
        # young database, 5,225 checks took 31 s (6 ms each, the reader fell 30 s behind). Custom plans are
        # planned per check with the table's current size: an index lookup (about 0.1 ms).
        return await psycopg.AsyncConnection.connect(
            self.settings.postgres_dsn,
            autocommit=True,
            connect_timeout=5,
            options="-c TimeZone=UTC -c plan_cache_mode=force_custom_plan",
            application_name="site-activity-webhooks",
        )

    async def _wait(self, timeout: float) -> None:
        """Until new work may be due (wake: more_due was set, or a slot freed up while it is), or the poll
        interval passed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()
        await asyncio.sleep(0.005)  # gather a few wake-ups into one claim

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # --- one attempt --------------------------------------------------------------------------------

    def _start(self, job: Claimed, leased_at: float) -> None:
        """Sends `job` when its endpoint has a free slot; `leased_at` (time.monotonic()) is no later than the
        start of its lease."""
        self.in_flight[job.endpoint_id] = self.in_flight.get(job.endpoint_id, 0) + 1
        self.metrics.in_flight.inc()
        task = asyncio.create_task(self._attempt_in_slot(job, leased_at + self.lease_s))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, job=job))

    def _done(self, task: asyncio.Task[None], *, job: Claimed) -> None:
        self._tasks.discard(task)
        left = self.in_flight.get(job.endpoint_id, 1) - 1
        if left > 0:
            self.in_flight[job.endpoint_id] = left
        else:
            self.in_flight.pop(job.endpoint_id, None)
            self._slots.pop(job.endpoint_id, None)
        self.metrics.in_flight.dec()
        if self.more_due:
            self.wake.set()

    def _literal_refusal(self, url: str) -> str | None:
        """IP-literal hosts bypass aiohttp's resolver (and so the GuardedResolver): checked here."""
        if self.settings.webhooks_allow_private_urls:
            return None
        if url not in self._refused:
            from urllib.parse import urlsplit

            self._refused[url] = refused_literal(urlsplit(url).hostname or "")
        return self._refused[url]

    def _signer(self, secret: str) -> Webhook:
        signer = self._signers.get(secret)
        if signer is None:
            signer = self._signers[secret] = Webhook(secret)
        return signer

    async def _attempt_in_slot(self, job: Claimed, lease_until: float) -> None:
        slots = self._slots.get(job.endpoint_id)
        if slots is None:
            slots = self._slots[job.endpoint_id] = asyncio.Semaphore(self.settings.webhooks_endpoint_concurrency)
        async with slots:
            if time.monotonic() + self.settings.webhooks_timeout_s + _LEASE_MARGIN_S > lease_until:
                # The attempt could outlast the lease (the endpoint got slow while this waited): another claim
                # could then send it too. Left as it is; it is claimed again when the lease runs out.
                self.metrics.lease_expired.inc()
                return
            await self._attempt(job)

    async def _attempt(self, job: Claimed) -> None:
        at = datetime.now(UTC)
        if job.attempts == 0:
            self.metrics.queue_delay_seconds.observe(max(0.0, (at - job.created_at).total_seconds()))
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": job.webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self._signer(job.secret).sign(job.webhook_id, at, job.body),
        }
        status: int | None = None
        retry_after: float | None = None
        error: str | None = None
        reason = "http_status"
        timeout = self.settings.webhooks_timeout_s
        started = time.perf_counter()
        refused = self._literal_refusal(job.url)
        try:
            if refused is not None:
                raise OSError(refused)
            assert self._http is not None
            async with asyncio.timeout(timeout):
                async with self._http.post(
                    job.url, data=job.body.encode(), headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    # Read a small body to the end, so the connection goes back to the pool for reuse.
                    text = (await resp.content.read(_ERROR_BODY_BYTES)).decode("utf-8", "replace").strip()
                    if not 200 <= status < 300:
                        retry_after = parse_retry_after(resp.headers.get("retry-after"))
                        error = f"HTTP {status}: {text}".rstrip(": ")
        except TimeoutError:
            error, reason = f"no response within {timeout:g} s", "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error, reason = f"connection failed: {exc or type(exc).__name__}", "connection"
        except Exception as exc:
            log.exception("webhook attempt failed unexpectedly", extra={"delivery": job.delivery_id})
            error, reason = f"internal error: {type(exc).__name__}", "internal"
        latency_ms = (time.perf_counter() - started) * 1000
        self.metrics.attempt_seconds.observe(latency_ms / 1000)
        seen = self._attempt_s.get(job.endpoint_id)
        self._attempt_s[job.endpoint_id] = latency_ms / 1000 if seen is None else 0.9 * seen + 0.1 * latency_ms / 1000
        ok = status is not None and 200 <= status < 300
        attempt = job.attempts + 1
        gone = status == 410
        next_at: datetime | None = None
        if ok:
            self.metrics.attempts.labels("success").inc()
            self.metrics.succeeded.inc()
        else:
            self.metrics.attempts.labels("failure").inc()
            self.metrics.failures.labels("gone" if gone else reason).inc()
            # 410: the receiver said the endpoint is gone; the endpoint is disabled and this delivery not retried.
            delay = None if gone else retry_delay(self.settings.webhooks_retry_schedule_s, attempt, retry_after)
            if delay is None:
                self.metrics.exhausted.inc()
            else:
                next_at = datetime.now(UTC) + timedelta(seconds=delay)
        self._outcomes.append(
            Outcome(job.delivery_id, job.endpoint_id, attempt, at, ok, status, latency_ms, error, next_at, gone)
        )
        self._outcome_ready.set()

    # --- recording ----------------------------------------------------------------------------------

    async def _recorder(self) -> None:
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            await asyncio.sleep(_RECORD_EVERY_S)  # collect what finishes meanwhile into one transaction
            try:
                await self._flush()
            except Exception:
                log.exception("recording attempts failed")

    async def _flush(self) -> None:
        while self._outcomes:
            done, self._outcomes = self._outcomes, []
            try:
                if self._record_conn is None or self._record_conn.closed:
                    self._record_conn = await self._connect()
                failing = await queue.record(self._record_conn, done)
            except psycopg.Error as exc:
                self.metrics.db_errors.labels("record").inc()
                log.warning("recording attempts failed; retrying", extra={"error": str(exc)})
                if self._record_conn is not None:
                    await self._record_conn.close()
                    self._record_conn = None
                self._outcomes[:0] = done
                if self.stopping.is_set():
                    return  # the leases run out: those deliveries are sent again
                await asyncio.sleep(_DB_BACKOFF_S)
                continue
            self._wake_for_retries(done)
            await self._apply_disable_rules(done, failing)

    def _wake_for_retries(self, done: list[Outcome]) -> None:
        """A retry that falls due before the next poll (the schedule's first steps are seconds) is claimed when
        it does: the claim loop is woken then (its row was just written)."""
        now = datetime.now(UTC)
        soon = [(o.next_attempt_at - now).total_seconds() for o in done if not o.ok and o.next_attempt_at is not None]
        soon = [s for s in soon if s < self.settings.webhooks_poll_interval_s]
        if soon and self._loop is not None:
            self._loop.call_later(max(0.0, min(soon)) + 0.01, self._due_now)

    async def _apply_disable_rules(self, done: list[Outcome], failing: list[tuple[uuid.UUID, datetime]]) -> None:
        reasons: dict[uuid.UUID, tuple[str, str]] = {}
        for o in done:
            if o.gone:
                reasons[o.endpoint_id] = ("gone", f"the endpoint answered 410 Gone at {o.at:%Y-%m-%d %H:%M:%S} UTC")
        limit = timedelta(seconds=self.settings.webhooks_disable_after_s)
        now = datetime.now(UTC)
        last_error = {o.endpoint_id: o.error for o in done if not o.ok}
        for endpoint_id, since in failing:
            if endpoint_id not in reasons and now - since >= limit:
                reasons[endpoint_id] = (
                    "failing",
                    f"every attempt failed since {since:%Y-%m-%d %H:%M:%S} UTC"
                    f" (last error: {last_error.get(endpoint_id)})",
                )
        for endpoint_id, (kind, reason) in reasons.items():
            if await asyncio.to_thread(self._disable, endpoint_id, reason):
                self.metrics.disabled.labels(kind).inc()
                log.warning("endpoint disabled", extra={"endpoint": str(endpoint_id), "reason": reason})

    def _disable(self, endpoint_id: uuid.UUID, reason: str) -> bool:
        with psycopg.connect(self.settings.postgres_dsn, autocommit=True, connect_timeout=5) as conn:
            return endpoints.disable_endpoint(conn, endpoint_id, reason)
