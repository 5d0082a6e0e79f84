"""Step 2 of a batch: one Postgres transaction that writes the rows idempotently.

    COPY (binary, raw values) -> temp table
    upsert the contacts of identify events (traits merged per key by event time)
    INSERT INTO visitor_events ... ON CONFLICT DO NOTHING (joined to widget_configs: deleted widgets drop out)
    retro-link the identified visitors' earlier anonymous events

Every statement is idempotent, so re-writing a batch after a crash or a retry changes nothing.
A row the database rejects for good (data or constraint error) is isolated by bisecting the batch and handed
back as a dead letter; any other database error is transient and raised as `TransientError`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg

from sink.records import CUSTOMER_ID, FIELDS, DeadLetter, Row
from site_activity.dead_letters import Reason, reason_text
from site_activity.erasure import TENANT_LOCK_CLASS

log = logging.getLogger(__name__)

# The rows are COPYed into _RAW as the decoder yields them, in text format: uuids as text (the uuid
# columns parse them, and reject malformed ones), timestamps as int8 µs since the epoch. The statements
# read the view _TEMP, where the timestamps are timestamptz. Postgres does these conversions for a fraction
# of what building uuid.UUID/datetime objects costs Python.
# `ord` is the position in the batch: it breaks ties between identify calls with the same occurred_at.
_RAW = "sink_batch_raw"
_TEMP = "sink_batch"
_UUIDS = ("widget_id", "event_id", "tenant_id", "customer_id", "session_id")
_MICROS = ("occurred_at", "received_at")
_RAW_COLUMNS = ("ord", *FIELDS)
_RAW_TYPES = {"ord": "int8", **dict.fromkeys(_UUIDS, "uuid"), **dict.fromkeys(_MICROS, "int8")}  # else text


def _timestamp(micros: str) -> str:
    # Exact for every µs value a timestamptz can hold: seconds and µs are multiplied separately, so no float8
    # product exceeds 2^53. A µs-only interval added to a timestamptz does not depend on the time zone.
    return f"timestamptz 'epoch' + ({micros} / 1000000) * interval '1 second' + ({micros} % 1000000) * interval '1 microsecond'"


_CREATE_TEMP = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_RAW} ("
    + ", ".join(f"{name} {_RAW_TYPES.get(name, 'text')}" for name in _RAW_COLUMNS)
    + ") ON COMMIT DELETE ROWS",  # no indexes: it is only ever scanned whole
    f"CREATE OR REPLACE TEMP VIEW {_TEMP} AS SELECT "
    + ", ".join(f"{_timestamp(name)} AS {name}" if name in _MICROS else name for name in _RAW_COLUMNS)
    + f" FROM {_RAW}",
)
_COPY = f"COPY {_RAW} ({', '.join(_RAW_COLUMNS)}) FROM STDIN"
# What psycopg dumps each value as: the uuid strings go as they are, the server's COPY parses them.
_COPY_TYPES = ["int8" if _RAW_TYPES.get(name) == "int8" else "text" for name in _RAW_COLUMNS]


def _has_identity(rows: Sequence[Row]) -> bool:
    # Most batches have no linked identify at all (raw topic: customer_id is always null): one C-speed scan.
    customer_ids = [row.values[CUSTOMER_ID] for row in rows]
    if customer_ids.count(None) == len(customer_ids):
        return False
    return any(row.is_identify for row in rows)


# One statement for every identify of the batch. Within the batch the newest value per (contact, trait) wins
# (ties: the later message); merge_customer_traits (migration 0002) then merges that into the stored contact.
_UPSERT_CUSTOMERS = f"""
WITH ident AS (
    SELECT b.ord, b.customer_id, b.tenant_id, b.user_id, b.occurred_at,
           CASE WHEN jsonb_typeof(b.properties::jsonb) = 'object' THEN b.properties::jsonb
                ELSE '{{}}'::jsonb END AS traits
    FROM {_TEMP} b
    JOIN widget_configs w ON w.id = b.widget_id          -- a deleted widget's identify creates nothing
    JOIN tenants t ON t.id = b.tenant_id
    WHERE b.event_type = 'identify' AND b.customer_id IS NOT NULL AND b.user_id IS NOT NULL
),
latest AS (
    SELECT DISTINCT ON (i.customer_id, kv.key) i.customer_id, kv.key, kv.value, i.occurred_at
    FROM ident i CROSS JOIN LATERAL jsonb_each(i.traits) AS kv
    ORDER BY i.customer_id, kv.key, i.occurred_at DESC, i.ord DESC
),
contact AS (
    SELECT DISTINCT ON (customer_id) customer_id, tenant_id, user_id FROM ident ORDER BY customer_id, ord
),
incoming AS (
    SELECT c.customer_id, c.tenant_id, c.user_id,
           coalesce(jsonb_object_agg(l.key, l.value) FILTER (WHERE l.key IS NOT NULL), '{{}}') AS traits,
           coalesce(jsonb_object_agg(l.key, to_jsonb(l.occurred_at)) FILTER (WHERE l.key IS NOT NULL), '{{}}')
               AS trait_times
    FROM contact c LEFT JOIN latest l USING (customer_id)
    GROUP BY c.customer_id, c.tenant_id, c.user_id
)
INSERT INTO customers AS cu (id, tenant_id, external_id, email, name, traits, trait_times)
SELECT customer_id, tenant_id, user_id, traits ->> 'email', traits ->> 'name', traits, trait_times
FROM incoming
ORDER BY customer_id  -- a fixed lock order, so concurrent sink members cannot deadlock on contacts
ON CONFLICT (id) DO UPDATE SET
    (traits, trait_times, email, name, updated_at) = (
        SELECT m.traits, m.trait_times, m.traits ->> 'email', m.traits ->> 'name', now()
        FROM merge_customer_traits(cu.traits, cu.trait_times, EXCLUDED.traits, EXCLUDED.trait_times) m)
WHERE NOT EXISTS (  -- re-applying an identify is a no-op: no write, updated_at kept
    SELECT 1 FROM merge_customer_traits(cu.traits, cu.trait_times, EXCLUDED.traits, EXCLUDED.trait_times) m
    WHERE m.traits = cu.traits AND m.trait_times = cu.trait_times)
"""

# tenant_id stays the event's (the API stamped it from the widget config). The customer join drops a
# customer_id whose contact does not exist (deleted) instead of violating the foreign key.
_INSERTED_AS = {"properties": "b.properties::jsonb", "customer_id": "c.id"}  # every other field: b.<field>
_INSERT_EVENTS = f"""
INSERT INTO visitor_events ({", ".join(FIELDS)})
SELECT {", ".join(_INSERTED_AS.get(name, f"b.{name}") for name in FIELDS)}
FROM {_TEMP} b
JOIN widget_configs w ON w.id = b.widget_id
LEFT JOIN customers c ON c.id = b.customer_id AND c.tenant_id = b.tenant_id
WHERE {{keep}}
ON CONFLICT (widget_id, event_id) DO NOTHING
"""

# The identity rule of the processors (stream_processors/state.py), applied to the rows already written, for
# each identify of this batch (a link): the visitor's rows ON THE LINK'S WIDGET (widget_id, visitor_id: what the
# processors key a visitor by) carry the contact of the link in force at their occurred_at (the latest identify
# at or before it), and rows before the visitor's first link carry the first link's contact. So a link claims
# exactly the rows from its time up to the visitor's next link on that widget (and, if it is the first link,
# every row before it): only that interval is read and rewritten, found by the (tenant_id, visitor_id,
# occurred_at) index, whatever order the events and identifies arrived in; rows already right are not written.
# Rows of the tenant's OTHER widgets with the same visitor id (one browser, ids are per origin per tenant) in
# that interval are claimed only while anonymous, so they never flip between contacts of different widgets
# (README, "Known limit"). Ties: links are ordered by (occurred_at, event_id), the larger event_id wins. When
# several links of a batch claim one row, its own widget's link wins, then the latest link.
_RETRO_LINK = f"""
WITH new_link AS (
    SELECT DISTINCT b.tenant_id, b.widget_id, b.visitor_id, b.occurred_at, b.event_id, b.customer_id
    FROM {_TEMP} b
    JOIN widget_configs w ON w.id = b.widget_id
    JOIN customers c ON c.id = b.customer_id AND c.tenant_id = b.tenant_id
    WHERE b.event_type = 'identify'
),
span AS (
    SELECT n.*,
           CASE WHEN p.customer_id IS NOT NULL THEN n.occurred_at END AS since,  -- NULL: the first link, which
           x.occurred_at AS until,                                                -- also claims earlier rows
           -- the neighbours' contacts, only for links that were in force before this batch
           CASE WHEN NOT EXISTS (SELECT 1 FROM new_link m WHERE m.widget_id = n.widget_id AND m.event_id = p.event_id)
                THEN p.customer_id END AS prev_customer,
           CASE WHEN NOT EXISTS (SELECT 1 FROM new_link m WHERE m.widget_id = n.widget_id AND m.event_id = x.event_id)
                THEN x.customer_id END AS next_customer,
           p.customer_id IS NOT NULL AS has_prev
    FROM new_link n
    LEFT JOIN LATERAL (  -- the link in force just before this one
        SELECT p.customer_id, p.event_id FROM visitor_events p
        WHERE p.tenant_id = n.tenant_id AND p.visitor_id = n.visitor_id AND p.occurred_at <= n.occurred_at
          AND p.widget_id = n.widget_id AND p.event_type = 'identify' AND p.customer_id IS NOT NULL
          AND (p.occurred_at, p.event_id) < (n.occurred_at, n.event_id)
        ORDER BY p.occurred_at DESC, p.event_id DESC LIMIT 1) p ON true
    LEFT JOIN LATERAL (  -- the next link: NULL when none
        SELECT x.occurred_at, x.customer_id, x.event_id FROM visitor_events x
        WHERE x.tenant_id = n.tenant_id AND x.visitor_id = n.visitor_id AND x.occurred_at >= n.occurred_at
          AND x.widget_id = n.widget_id AND x.event_type = 'identify' AND x.customer_id IS NOT NULL
          AND (x.occurred_at, x.event_id) > (n.occurred_at, n.event_id)
        ORDER BY x.occurred_at, x.event_id LIMIT 1) x ON true
),
changed AS (
    -- An identify that names the contact already in force over its span changes no row: the link before it
    -- (or, for a new first link, the old first link after it) was in force before this batch and has the same
    -- contact. Sites that identify on every page load send mostly these; skipping them keeps the re-link
    -- proportional to real changes. A neighbour that is itself new in this batch never justifies a skip.
    SELECT * FROM span
    WHERE NOT (has_prev AND prev_customer IS NOT DISTINCT FROM customer_id)
      AND NOT (NOT has_prev AND next_customer IS NOT NULL AND next_customer = customer_id)
),
claim AS (
    -- LATERAL with plain range bounds: one index range scan of (tenant_id, visitor_id, occurred_at) per changed
    -- link. The batch is a temp table without statistics, so a plain join let the planner pick a hash join over
    -- the whole of visitor_events for every batch.
    SELECT DISTINCT ON (e.widget_id, e.event_id) e.widget_id, e.event_id, s.customer_id
    FROM changed s
    CROSS JOIN LATERAL (
        SELECT e.widget_id, e.event_id FROM visitor_events e
        WHERE e.tenant_id = s.tenant_id AND e.visitor_id = s.visitor_id
          AND e.occurred_at >= coalesce(s.since, '-infinity') AND e.occurred_at < coalesce(s.until, 'infinity')
          AND e.event_type <> 'identify' AND (e.widget_id = s.widget_id OR e.customer_id IS NULL)) e
    ORDER BY e.widget_id, e.event_id, e.widget_id = s.widget_id DESC, s.occurred_at DESC, s.event_id DESC
)
UPDATE visitor_events e SET customer_id = claim.customer_id
FROM claim
WHERE e.widget_id = claim.widget_id AND e.event_id = claim.event_id
  AND e.customer_id IS DISTINCT FROM claim.customer_id
"""

# --- retention (console issue): an event already older than its widget's retention is not stored -------------
# The purge (site_activity/retention.py) removes what ages out later; this keeps it from coming back.
_FRESH = "b.occurred_at >= now() - make_interval(days => w.event_retention_days)"
_INSERT_EVENTS = _INSERT_EVENTS.replace("{keep}", _FRESH)
_COUNT_EXPIRED = f"SELECT count(*) FROM {_TEMP} b JOIN widget_configs w ON w.id = b.widget_id WHERE NOT ({_FRESH})"
_OCCURRED_AT = FIELDS.index("occurred_at")
_MIN_RETENTION_US = 24 * 3600 * 1_000_000  # one day: the shortest retention a widget can have


def _may_hold_expired(rows: Sequence[Row]) -> bool:
    # Counting expired rows costs a scan of the batch; only a batch with a day-old event can hold one.
    oldest: int = min(row.values[_OCCURRED_AT] for row in rows)
    return oldest < time.time_ns() // 1000 - _MIN_RETENTION_US + 60_000_000  # a minute of slack for clock drift


# --- erasure (console issue): an erased subject's events are dropped from the batch before anything is written --
# The shared per-tenant lock orders this against an erase (site_activity/erasure.py), which holds the exclusive
# one: it is taken in its own statement, so the DELETE below runs on a snapshot that sees every erase that
# finished before the lock was granted. The `IN (SELECT tenant_id ...)` is one hashed lookup per row, so tenants
# without erasures pay no hashing.
_LOCK_TENANTS = (
    f"SELECT count(pg_advisory_xact_lock_shared({TENANT_LOCK_CLASS}, hashtext(t::text)))"
    f" FROM (SELECT DISTINCT tenant_id AS t FROM {_RAW} ORDER BY 1) d"
)
_DROP_ERASED = f"""
DELETE FROM {_RAW} r
WHERE r.tenant_id IN (SELECT tenant_id FROM erased_subjects)
  AND EXISTS (SELECT 1 FROM erased_subjects s WHERE s.tenant_id = r.tenant_id AND s.subject_hash IN (
        erasure_hash(r.tenant_id, 'visitor', r.widget_id::text || ':' || r.visitor_id),
        erasure_hash(r.tenant_id, 'user', r.user_id),
        erasure_hash(r.tenant_id, 'contact', r.customer_id::text)))
"""

_STATEMENT_TIMEOUT_MS = 60_000
_TEMP_BUFFERS = "64MB"  # a whole batch of the temp table stays in memory (the default 8MB holds ~25k rows)

# Errors that no retry can fix: the row itself is wrong for this schema.
_POISON = (psycopg.DataError, psycopg.IntegrityError)


class TransientError(Exception):
    """The database could not be written right now (down, restarting, deadlock, schema missing): retry later."""


@dataclass
class WriteResult:
    inserted: int = 0
    customers: int = 0
    relinked: int = 0
    rejected: list[DeadLetter] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)  # copy, contacts, insert, retro_link, commit
    expired: int = 0  # rows not stored because they were already older than their widget's retention
    erased: int = 0  # rows not stored because their visitor / user / contact was erased

    def add(self, other: WriteResult) -> WriteResult:
        steps = dict(self.step_seconds)
        for step, seconds in other.step_seconds.items():
            steps[step] = steps.get(step, 0.0) + seconds
        return WriteResult(
            self.inserted + other.inserted,
            self.customers + other.customers,
            self.relinked + other.relinked,
            self.rejected + other.rejected,
            steps,
            self.expired + other.expired,
            self.erased + other.erased,
        )


class EventWriter:
    def __init__(self, dsn: str, *, rollups: bool = True) -> None:
        self._dsn = dsn
        # Off: the rollup triggers (migration 0006) skip their work on this connection; rollups go stale.
        self._rollups_option = "" if rollups else " -c site_activity.rollups=off"
        self._conn: psycopg.Connection | None = None

    def write(self, rows: list[Row]) -> WriteResult:
        """Stores the rows (one consumer batch, in offset order) in one transaction: binary COPY into a staging
        table, then insert of the rows not already stored (`(widget_id, event_id)` is the idempotency key, so a
        redelivered batch inserts nothing twice), dropping rows of erased subjects and rows already past their
        widget's retention, creating contacts for identifies and re-linking earlier rows of newly linked visitors.
        Returns the counts (`inserted`, `customers`, `relinked`, `expired`, `erased`), the seconds per step, and in
        `rejected` the rows the database refuses for their data (found by bisecting the batch; each a `DeadLetter`
        with reason `db_rejected: <sqlstate> …`) — everything else of the batch is stored. Raises
        `TransientError` when the database cannot be written now (down, restarting, deadlock, schema missing):
        nothing of the batch is stored, the caller retries the same rows and must not commit the offsets."""
        if not rows:
            return WriteResult()
        try:
            return self._write_isolating_poison(rows)
        except psycopg.Error as exc:
            self.close()  # reconnect next time: the connection may be dead or mid-transaction
            raise TransientError(f"{type(exc).__name__}: {exc}".strip()) from exc

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=5,
                application_name="site-activity-sink",
                # A hung server or a dropped network path must surface as an error (then retry), not a hang.
                options=f"-c statement_timeout={_STATEMENT_TIMEOUT_MS} -c temp_buffers={_TEMP_BUFFERS}"
                + self._rollups_option,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
            for statement in _CREATE_TEMP:
                conn.execute(statement)
            self._conn = conn
        return self._conn

    def _write_isolating_poison(self, rows: list[Row]) -> WriteResult:
        """Writes the rows; if the database rejects the batch's data, bisects down to the rejected rows."""
        try:
            return self._write_once(rows)
        except _POISON as exc:
            if len(rows) == 1:
                reason = reason_text(
                    Reason.DB_REJECTED, f"{exc.sqlstate} {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                )
                log.warning(
                    "row rejected by the database",
                    extra={
                        "reason": reason,
                        "topic": rows[0].source.topic,
                        "partition": rows[0].source.partition,
                        "offset": rows[0].source.offset,
                    },
                )
                return WriteResult(rejected=[DeadLetter(rows[0].source, reason, rows[0].as_message())])
            # Halves keep the batch order, so an identify is still applied after the events before it.
            mid = len(rows) // 2
            return self._write_isolating_poison(rows[:mid]).add(self._write_isolating_poison(rows[mid:]))

    def _write_once(self, rows: list[Row]) -> WriteResult:
        conn = self._connection()
        has_identity = _has_identity(rows)
        customers = relinked = 0
        steps: dict[str, float] = {}
        clock = time.perf_counter
        with conn.transaction(), conn.cursor() as cur:
            t = clock()
            with cur.copy(_COPY) as copy:
                copy.set_types(_COPY_TYPES)
                write_row = copy.write_row
                for ord_, row in enumerate(rows):
                    write_row((ord_, *row.values))
            steps["copy"], t = clock() - t, clock()
            cur.execute(_LOCK_TENANTS)
            erased = max(cur.execute(_DROP_ERASED).rowcount, 0)
            steps["erasures"], t = clock() - t, clock()
            if has_identity:
                cur.execute(_UPSERT_CUSTOMERS)
                customers = max(cur.rowcount, 0)
                steps["contacts"], t = clock() - t, clock()
            cur.execute(_INSERT_EVENTS)
            inserted = max(cur.rowcount, 0)
            steps["insert"], t = clock() - t, clock()
            expired = cur.execute(_COUNT_EXPIRED).fetchone()[0] if _may_hold_expired(rows) else 0  # type: ignore[index]
            if has_identity:
                cur.execute(_RETRO_LINK)
                relinked = max(cur.rowcount, 0)
                steps["retro_link"], t = clock() - t, clock()
        steps["commit"] = clock() - t
        return WriteResult(
            inserted=inserted,
            customers=customers,
            relinked=relinked,
            step_seconds=steps,
            expired=expired,
            erased=erased,
        )
