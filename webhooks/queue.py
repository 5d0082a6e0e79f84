"""The delivery queue in Postgres (migration 0008): enqueue stored events, claim due deliveries, record attempts.

A delivery is claimed by pushing its next_attempt_at forward by a lease (FOR UPDATE SKIP LOCKED, so several
processes share the queue without taking the same row); the attempt's outcome then sets the real next time,
or success/failure. A process that dies mid-attempt leaves the lease to expire: the delivery is sent again
(at-least-once; receivers dedupe on webhook-id).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

# The webhook-id header: stable per (endpoint, event), across retries, replays and processes; no '.' in it
# (the Standard Webhooks signature joins id, timestamp and body with dots).
WEBHOOK_ID = "'msg_' || md5(ep.id::text || ':' || e.widget_id::text || ':' || e.event_id::text)"
# Whether event row `e` matches endpoint `ep`'s filters (NULL filter = everything).
MATCHES_FILTERS = ("(ep.event_types IS NULL OR e.event_type = ANY(ep.event_types))"
                   " AND (ep.widget_ids IS NULL OR e.widget_id = ANY(ep.widget_ids))")

# Only events the API received after the endpoint was created are queued by the stage (an endpoint does not
# receive history unless it asks for a replay), and only for enabled endpoints.
_ENQUEUE = f"""
INSERT INTO webhook_deliveries (endpoint_id, widget_id, event_id, webhook_id)
SELECT ep.id, e.widget_id, e.event_id, {WEBHOOK_ID}
FROM unnest(%s::uuid[], %s::uuid[]) AS b (widget_id, event_id)
JOIN visitor_events e ON e.widget_id = b.widget_id AND e.event_id = b.event_id
JOIN webhook_endpoints ep ON ep.tenant_id = e.tenant_id AND ep.enabled AND e.received_at >= ep.created_at
     AND {MATCHES_FILTERS}
ON CONFLICT (endpoint_id, widget_id, event_id) DO NOTHING
"""


def tenants_with_endpoints(conn: psycopg.Connection) -> set[str]:
    """Tenant ids (text, as decoded from Avro) that have an enabled endpoint: only their events are looked up."""
    return {str(r[0]) for r in conn.execute("SELECT DISTINCT tenant_id FROM webhook_endpoints WHERE enabled")}


def enqueue(conn: psycopg.Connection, keys: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> int:
    """Queues a delivery per (stored event, matching endpoint) for these (widget_id, event_id) keys; events that
    are not rows (duplicates the sink skipped are rows already queued; deleted widgets, erased people, expired
    events are not rows) queue nothing. Idempotent. Returns the number of new deliveries."""
    if not keys:
        return 0
    with conn.transaction():
        return conn.execute(_ENQUEUE, ([k[0] for k in keys], [k[1] for k in keys])).rowcount


# The body, built by Postgres from the stored row (numbers in properties stay exactly as stored). The
# connection's time zone is UTC, so timestamps read 2026-11-30T12:00:00.123456+00:00.
_BODY = """jsonb_build_object(
    'type', 'visitor_event.created',
    'timestamp', e.received_at,
    'data', jsonb_build_object(
        'event_id', e.event_id, 'widget_id', e.widget_id, 'tenant_id', e.tenant_id, 'visitor_id', e.visitor_id,
        'event_type', e.event_type, 'name', e.name, 'url', e.url, 'referrer', e.referrer,
        'properties', e.properties, 'user_id', e.user_id, 'customer_id', e.customer_id,
        'session_id', e.session_id, 'occurred_at', e.occurred_at, 'received_at', e.received_at))::text"""

# Per endpoint at most `cap` in flight (1 while it is failing: a dead endpoint probes with one request and
# holds one slot), minus what this process already has in flight for it; oldest due first overall.
_CLAIM = f"""
WITH busy AS (
    SELECT * FROM unnest(%(busy_ids)s::uuid[], %(busy_n)s::int[]) AS b (endpoint_id, n)
), picked AS (
    SELECT due.id, due.next_attempt_at
    FROM webhook_endpoints ep
    LEFT JOIN busy ON busy.endpoint_id = ep.id
    CROSS JOIN LATERAL (
        SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
        WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.next_attempt_at <= now()
        ORDER BY d.next_attempt_at
        LIMIT greatest(0, (CASE WHEN ep.failing_since IS NULL THEN %(cap)s ELSE 1 END) - coalesce(busy.n, 0))
        FOR UPDATE OF d SKIP LOCKED
    ) due
    WHERE ep.enabled
    ORDER BY due.next_attempt_at
    LIMIT %(room)s
)
UPDATE webhook_deliveries d SET next_attempt_at = now() + %(lease_s)s * interval '1 second'
FROM picked p, webhook_endpoints ep, visitor_events e
WHERE d.id = p.id AND ep.id = d.endpoint_id AND e.widget_id = d.widget_id AND e.event_id = d.event_id
RETURNING d.id, d.webhook_id, d.attempts, d.created_at, ep.id, ep.url, ep.secret, {_BODY}
"""


@dataclass(frozen=True)
class Claimed:
    """A delivery this process now owns until its lease runs out."""

    delivery_id: int
    webhook_id: str
    attempts: int  # attempts before this one in the current round
    created_at: datetime
    endpoint_id: uuid.UUID
    url: str
    secret: str
    body: str


async def claim(conn: psycopg.AsyncConnection, *, room: int, cap: int, busy: dict[uuid.UUID, int],
                lease_s: float) -> list[Claimed]:
    """Claims up to `room` due deliveries of enabled endpoints (see _CLAIM for the per-endpoint cap)."""
    async with conn.transaction():
        cur = await conn.execute(_CLAIM, {"busy_ids": list(busy), "busy_n": list(busy.values()), "cap": cap,
                                          "room": room, "lease_s": lease_s})
        return [Claimed(*row) for row in await cur.fetchall()]


@dataclass(frozen=True)
class Outcome:
    """One finished attempt. `next_attempt_at` None with ok False means the retries are spent."""

    delivery_id: int
    endpoint_id: uuid.UUID
    attempt: int
    at: datetime
    ok: bool
    response_status: int | None
    latency_ms: float
    error: str | None
    next_attempt_at: datetime | None
    gone: bool = False  # 410: the endpoint asked to be disabled


async def record(conn: psycopg.AsyncConnection, outcomes: Sequence[Outcome]) -> list[tuple[uuid.UUID, datetime]]:
    """Writes the attempts and the deliveries' new state in one transaction; keeps each endpoint's failure clock
    (failing_since: set by a failure, cleared by a success). Returns (endpoint, failing_since) of the failing
    endpoints so the caller can apply the disable rule."""
    if not outcomes:
        return []
    async with conn.transaction():
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO webhook_attempts (delivery_id, attempt, at, response_status, latency_ms, error)"
                " SELECT %s, %s, %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = %s)",
                [(o.delivery_id, o.attempt, o.at, o.response_status, o.latency_ms, o.error, o.delivery_id)
                 for o in outcomes])
            await cur.executemany(
                "UPDATE webhook_deliveries SET status = %s, attempts = %s, next_attempt_at = coalesce(%s, now()),"
                " last_attempt_at = %s, last_response_status = %s, last_error = %s"
                " WHERE id = %s AND status = 'pending'",
                [("succeeded" if o.ok else "pending" if o.next_attempt_at is not None else "failed", o.attempt,
                  o.next_attempt_at, o.at, o.response_status, o.error, o.delivery_id) for o in outcomes])
        ok = sorted({o.endpoint_id for o in outcomes if o.ok})
        failed = {o.endpoint_id: o.at for o in sorted(outcomes, key=lambda o: o.at, reverse=True) if not o.ok}
        if ok:
            await conn.execute("UPDATE webhook_endpoints SET failing_since = NULL"
                               " WHERE id = ANY(%s) AND failing_since IS NOT NULL", (ok,))
        if not failed:
            return []
        # A success later in this same batch wins over a failure (the endpoint answered).
        still = [e for e in failed if e not in ok]
        cur2 = await conn.execute(
            "UPDATE webhook_endpoints ep SET failing_since = coalesce(ep.failing_since, f.at)"
            " FROM unnest(%s::uuid[], %s::timestamptz[]) AS f (id, at) WHERE ep.id = f.id AND ep.enabled"
            " RETURNING ep.id, ep.failing_since", (still, [failed[e] for e in still]))
        return [(r[0], r[1]) for r in await cur2.fetchall()]
