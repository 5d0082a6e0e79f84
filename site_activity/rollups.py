"""Rollups (migration 0006): the repair command and a check that they equal the raw rows.

The rollups are kept by triggers on visitor_events (exact at every commit); `rebuild` is for when they were
deliberately skipped (`sink_rollups=false`, `SET site_activity.rollups = off`) or after a restore. It runs the
SQL function rollups_rebuild, the same one the migration's backfill and the dashboard benchmark's seeding use.
"""

from __future__ import annotations

import time
import uuid

import psycopg

# (rollup query, the same numbers straight from visitor_events); both ordered, for one widget (%(w)s).
_CHECKS: dict[str, tuple[str, str]] = {
    "rollup_hourly": (
        "SELECT hour, events, pageviews, sessions, custom_events, identifies, visitors FROM rollup_hourly"
        " WHERE widget_id = %(w)s ORDER BY 1",
        "SELECT date_trunc('hour', occurred_at, 'UTC'), count(*), count(*) FILTER (WHERE event_type = 'pageview'),"
        " count(*) FILTER (WHERE event_type = 'session_start'), count(*) FILTER (WHERE event_type = 'custom'),"
        " count(*) FILTER (WHERE event_type = 'identify'), count(DISTINCT visitor_id)"
        " FROM visitor_events WHERE widget_id = %(w)s GROUP BY 1 ORDER BY 1",
    ),
    "rollup_daily": (
        "SELECT day, visitors FROM rollup_daily WHERE widget_id = %(w)s ORDER BY 1",
        "SELECT (occurred_at AT TIME ZONE 'UTC')::date, count(DISTINCT visitor_id) FROM visitor_events"
        " WHERE widget_id = %(w)s GROUP BY 1 ORDER BY 1",
    ),
    "rollup_visitor_hours": (
        "SELECT hour, visitor_id, events FROM rollup_visitor_hours WHERE widget_id = %(w)s ORDER BY 1, 2",
        "SELECT date_trunc('hour', occurred_at, 'UTC'), visitor_id, count(*) FROM visitor_events"
        " WHERE widget_id = %(w)s GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    "rollup_visitor_days": (
        "SELECT day, visitor_id, events FROM rollup_visitor_days WHERE widget_id = %(w)s ORDER BY 1, 2",
        "SELECT (occurred_at AT TIME ZONE 'UTC')::date, visitor_id, count(*) FROM visitor_events"
        " WHERE widget_id = %(w)s GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    "rollup_pages": (
        "SELECT hour, page, pageviews FROM rollup_pages WHERE widget_id = %(w)s ORDER BY 1, 2",
        "SELECT date_trunc('hour', occurred_at, 'UTC'), rollup_page(url), count(*) FROM visitor_events"
        " WHERE widget_id = %(w)s AND event_type = 'pageview' GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    "rollup_pages_daily": (
        "SELECT day, page, pageviews FROM rollup_pages_daily WHERE widget_id = %(w)s ORDER BY 1, 2",
        "SELECT (occurred_at AT TIME ZONE 'UTC')::date, rollup_page(url), count(*) FROM visitor_events"
        " WHERE widget_id = %(w)s AND event_type = 'pageview' GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    "rollup_event_names": (
        "SELECT hour, name, events FROM rollup_event_names WHERE widget_id = %(w)s ORDER BY 1, 2",
        "SELECT date_trunc('hour', occurred_at, 'UTC'), coalesce(name, ''), count(*) FROM visitor_events"
        " WHERE widget_id = %(w)s AND event_type = 'custom' GROUP BY 1, 2 ORDER BY 1, 2",
    ),
}


def rebuild(conn: psycopg.Connection, widget_id: uuid.UUID | None = None) -> tuple[int, float]:
    """Recomputes one widget's rollups (None: every widget's) from visitor_events in one transaction, holding
    visitor_events in SHARE mode (writers such as the sink wait) so the result is exact. Returns (events
    counted, seconds)."""
    started = time.perf_counter()
    with conn.transaction():
        counted = conn.execute("SELECT rollups_rebuild(%s)", (widget_id,)).fetchone()[0]  # type: ignore[index]
    return int(counted), time.perf_counter() - started


def mismatches(conn: psycopg.Connection, widget_id: uuid.UUID) -> list[str]:
    """The rollup tables whose rows for this widget differ from the same counts over visitor_events (empty:
    exact). Reads both in one REPEATABLE READ snapshot when `conn` is idle; scans the widget's raw rows."""
    out = []
    for table, (rollup_sql, raw_sql) in _CHECKS.items():
        params = {"w": widget_id}
        if conn.execute(rollup_sql, params).fetchall() != conn.execute(raw_sql, params).fetchall():
            out.append(table)
    return out


def widgets_with_rows(conn: psycopg.Connection) -> list[uuid.UUID]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT id FROM widget_configs w WHERE EXISTS (SELECT 1 FROM visitor_events e WHERE e.widget_id = w.id)"
            " OR EXISTS (SELECT 1 FROM rollup_hourly r WHERE r.widget_id = w.id) ORDER BY id"
        )
    ]
