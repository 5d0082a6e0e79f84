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

# The statements below take their rows as arrays (unnest) and are run with prepare=False: psycopg would
# otherwise prepare them after a few runs, and Postgres may then settle on a generic plan made while the
# tables were small (a nested loop scanning visitor_events once per key), which stays after the tables grew:
# measured at 1,000 events/s, a 1,400-key enqueue took 3 s that way instead of 30 ms. Planning each run
# costs about a millisecond and sees the real array sizes and table sizes.
# The webhook-id header: stable per (endpoint, event), across retries, replays and processes; no '.' in it
# (the Standard Webhooks signature joins id, timestamp and body with dots).
WEBHOOK_ID = "'msg_' || md5(ep.id::text || ':' || e.widget_id::text || ':' || e.event_id::text)"
# Whether event row `e` matches endpoint `ep`'s filters (NULL filter = everything).
MATCHES_FILTERS = (
    "(ep.event_types IS NULL OR e.event_type = ANY(ep.event_types))"
    " AND (ep.widget_ids IS NULL OR e.widget_id = ANY(ep.widget_ids))"
)


def tenants_with_endpoints(conn: psycopg.Connection) -> set[str]:
    """Tenant ids (text, as decoded from Avro) that have an enabled endpoint: only their events are looked up."""
    return {str(r[0]) for r in conn.execute("SELECT DISTINCT tenant_id FROM webhook_endpoints WHERE enabled")}


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

# Queues a delivery per (stored event, matching endpoint) -- only for events the API received after the endpoint
# was created (an endpoint does not receive history unless it asks for a replay), and only for enabled
# endpoints -- and, in the same statement, hands the first `room` new deliveries of each healthy endpoint (at
# most `room_total` in all) straight to the caller: those are inserted already leased and come back with what a
# request needs, so a fresh delivery is sent without a claim round trip. The rest are due now and
# are claimed as usual (a failing endpoint's always: it gets 1 request at a time). now() is the transaction's
# start, so `next_attempt_at > now()` tells a leased row from a due one. Events are looked up key by key through
# the primary key (LATERAL ... OFFSET 0 keeps the planner from joining otherwise): visitor_events grows faster
# than autovacuum analyzes it, and with stale statistics the planner chose a nested loop that scanned the table
# once per key -- at 1,000 events/s one enqueue took 16 s instead of 0.1 s.
_ENQUEUE_AND_TAKE = f"""
WITH b AS (
    SELECT * FROM unnest(%(widget_ids)s::uuid[], %(event_ids)s::uuid[]) WITH ORDINALITY AS b (widget_id, event_id, ord)
), room AS (
    SELECT * FROM unnest(%(room_ids)s::uuid[], %(room_n)s::int[]) AS r (endpoint_id, n)
), new AS (
    SELECT ep.id AS endpoint_id, e.widget_id, e.event_id, {WEBHOOK_ID} AS webhook_id, b.ord,
           ep.failing_since IS NULL
           AND row_number() OVER (PARTITION BY ep.id ORDER BY b.ord) <= coalesce(room.n, %(room_default)s) AS take
    FROM b
    CROSS JOIN LATERAL (SELECT * FROM visitor_events v WHERE v.widget_id = b.widget_id AND v.event_id = b.event_id
                        OFFSET 0) e
    JOIN webhook_endpoints ep ON ep.tenant_id = e.tenant_id AND ep.enabled AND e.received_at >= ep.created_at
         AND {MATCHES_FILTERS}
    LEFT JOIN room ON room.endpoint_id = ep.id
), numbered AS (
    SELECT new.*, take AND row_number() OVER (PARTITION BY take ORDER BY ord, endpoint_id) <= %(room_total)s AS leased
    FROM new
), ins AS (
    INSERT INTO webhook_deliveries (endpoint_id, widget_id, event_id, webhook_id, next_attempt_at)
    SELECT endpoint_id, widget_id, event_id, webhook_id,
           CASE WHEN leased THEN now() + %(lease_s)s * interval '1 second' ELSE now() END
    FROM numbered
    ORDER BY ord, endpoint_id  -- ids in the order the events came (the order they are sent in)
    ON CONFLICT (endpoint_id, widget_id, event_id) DO NOTHING
    RETURNING id, webhook_id, attempts, created_at, endpoint_id, widget_id, event_id, next_attempt_at > now() AS leased
)
SELECT ins.id, ins.webhook_id, ins.attempts, ins.created_at, ep.id, ep.url, ep.secret, {_BODY}
FROM ins
JOIN webhook_endpoints ep ON ep.id = ins.endpoint_id
CROSS JOIN LATERAL (SELECT * FROM visitor_events v WHERE v.widget_id = ins.widget_id AND v.event_id = ins.event_id
                    OFFSET 0) e
WHERE ins.leased
UNION ALL
SELECT NULL, NULL, count(*), NULL, NULL, NULL, NULL, NULL FROM ins WHERE NOT ins.leased
"""


async def enqueue_and_take(
    conn: psycopg.AsyncConnection,
    keys: Sequence[tuple[uuid.UUID, uuid.UUID]],
    *,
    room: dict[uuid.UUID, int],
    room_default: int,
    room_total: int,
    lease_s: float,
) -> tuple[int, int, list[Claimed]]:
    """Queues a delivery per (stored event, matching endpoint) for these (widget_id, event_id) keys, committed
    before it returns; events that are not rows (duplicates the sink skipped are rows already queued; deleted
    widgets, erased people, expired events are not rows) queue nothing. Idempotent. Leases some of the new
    deliveries to the caller: per healthy endpoint at most room[endpoint] (room_default for one not in `room`),
    at most room_total in all.
    Returns (deliveries queued, of those left due for claiming, the leased ones ready to send)."""
    if not keys:
        return 0, 0, []
    # One statement on an autocommit connection: its own transaction, committed when execute() returns (one
    # round trip instead of three with BEGIN and COMMIT).
    cur = await conn.execute(
        _ENQUEUE_AND_TAKE,
        {
            "widget_ids": [k[0] for k in keys],
            "event_ids": [k[1] for k in keys],
            "room_ids": list(room),
            "room_n": list(room.values()),
            "room_default": room_default,
            "room_total": room_total,
            "lease_s": lease_s,
        },
        prepare=False,
    )
    rows = await cur.fetchall()
    taken = sorted((Claimed(*row) for row in rows if row[0] is not None), key=lambda c: c.delivery_id)
    left = sum(row[2] for row in rows if row[0] is None)
    return len(taken) + left, left, taken


# Per endpoint at most its room (what this process may still hold for it; room_default for one it holds
# nothing of), or while it is failing 1 minus what this process holds for it (a dead endpoint probes with one
# request and holds one slot); oldest due first overall.
_CLAIM = f"""
WITH busy AS (
    SELECT * FROM unnest(%(busy_ids)s::uuid[], %(busy_n)s::int[]) AS b (endpoint_id, n)
), room AS (
    SELECT * FROM unnest(%(room_ids)s::uuid[], %(room_n)s::int[]) AS r (endpoint_id, n)
), picked AS (
    SELECT due.id, due.next_attempt_at
    FROM webhook_endpoints ep
    LEFT JOIN busy ON busy.endpoint_id = ep.id
    LEFT JOIN room ON room.endpoint_id = ep.id
    CROSS JOIN LATERAL (
        SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
        WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.next_attempt_at <= now()
        ORDER BY d.next_attempt_at
        LIMIT greatest(0, CASE WHEN ep.failing_since IS NULL THEN coalesce(room.n, %(room_default)s)
                               ELSE 1 - coalesce(busy.n, 0) END)
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


async def claim(
    conn: psycopg.AsyncConnection,
    *,
    room_total: int,
    room: dict[uuid.UUID, int],
    room_default: int,
    busy: dict[uuid.UUID, int],
    lease_s: float,
) -> list[Claimed]:
    """Claims up to `room_total` due deliveries of enabled endpoints, per healthy endpoint at most room[endpoint]
    (room_default for one not in `room`), per failing endpoint 1 minus busy[endpoint] (what the caller holds)."""
    # One statement on an autocommit connection (see enqueue_and_take).
    cur = await conn.execute(
        _CLAIM,
        {
            "busy_ids": list(busy),
            "busy_n": list(busy.values()),
            "room_ids": list(room),
            "room_n": list(room.values()),
            "room_default": room_default,
            "room": room_total,
            "lease_s": lease_s,
        },
        prepare=False,
    )
    # Oldest first (ids follow the order deliveries were queued); RETURNING has no order of its own.
    return sorted((Claimed(*row) for row in await cur.fetchall()), key=lambda c: c.delivery_id)


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


# One statement per group of outcomes (not one per outcome): the attempts are logged for deliveries that still
# exist (an erase or widget delete may have removed one meanwhile), and a delivery moves on only while pending
# (a replay or another process may have settled it). One outcome per delivery in `o` (the caller dedupes).
_RECORD = """
WITH o AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempt)s::int[], %(at)s::timestamptz[], %(status)s::int[],
                         %(latency)s::float8[], %(error)s::text[], %(next_at)s::timestamptz[], %(state)s::text[])
                  AS o (id, attempt, at, response_status, latency_ms, error, next_at, state)
), moved AS (
    UPDATE webhook_deliveries d
    SET status = o.state, attempts = o.attempt, next_attempt_at = coalesce(o.next_at, now()),
        last_attempt_at = o.at, last_response_status = o.response_status, last_error = o.error
    FROM o WHERE d.id = o.id AND d.status = 'pending' AND o.state IS NOT NULL
    RETURNING d.id
)
INSERT INTO webhook_attempts (delivery_id, attempt, at, response_status, latency_ms, error)
SELECT o.id, o.attempt, o.at, o.response_status, o.latency_ms, o.error FROM o
WHERE EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.id = o.id)
ORDER BY o.at
"""


def _state(o: Outcome) -> str:
    return "succeeded" if o.ok else "pending" if o.next_attempt_at is not None else "failed"


def _deciding(outcomes: Sequence[Outcome]) -> dict[int, Outcome]:
    """Per delivery, the outcome that sets its state when one group holds several attempts of it (a lease ran
    out mid-attempt): a success wins, else the latest attempt."""
    out: dict[int, Outcome] = {}
    for o in outcomes:
        seen = out.get(o.delivery_id)
        if seen is None or (o.ok, o.at) > (seen.ok, seen.at):
            out[o.delivery_id] = o
    return out


async def record(conn: psycopg.AsyncConnection, outcomes: Sequence[Outcome]) -> list[tuple[uuid.UUID, datetime]]:
    """Writes the attempts and the deliveries' new state in one transaction (one statement for all of them);
    keeps each endpoint's failure clock (failing_since: set by a failure, cleared by a success). Returns
    (endpoint, failing_since) of the failing endpoints so the caller can apply the disable rule."""
    if not outcomes:
        return []
    deciding = _deciding(outcomes)
    # Every attempt is logged; only the deciding one of each delivery also carries the state to move to.
    rows = [(o, _state(o) if deciding[o.delivery_id] is o else None) for o in outcomes]
    async with conn.transaction():
        await conn.execute(
            _RECORD,
            {
                "ids": [o.delivery_id for o, _ in rows],
                "attempt": [o.attempt for o, _ in rows],
                "at": [o.at for o, _ in rows],
                "status": [o.response_status for o, _ in rows],
                "latency": [o.latency_ms for o, _ in rows],
                "error": [o.error for o, _ in rows],
                "next_at": [o.next_attempt_at for o, _ in rows],
                "state": [state for _, state in rows],
            },
            prepare=False,
        )
        ok = sorted({o.endpoint_id for o in outcomes if o.ok})
        failed = {o.endpoint_id: o.at for o in sorted(outcomes, key=lambda o: o.at, reverse=True) if not o.ok}
        if ok:
            await conn.execute(
                "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = ANY(%s) AND failing_since IS NOT NULL",
                (ok,),
            )
        if not failed:
            return []
        # A success later in this same group wins over a failure (the endpoint answered).
        still = [e for e in failed if e not in ok]
        cur2 = await conn.execute(
            "UPDATE webhook_endpoints ep SET failing_since = coalesce(ep.failing_since, f.at)"
            " FROM unnest(%s::uuid[], %s::timestamptz[]) AS f (id, at) WHERE ep.id = f.id AND ep.enabled"
            " RETURNING ep.id, ep.failing_since",
            (still, [failed[e] for e in still]),
        )
        return [(r[0], r[1]) for r in await cur2.fetchall()]
