"""Dashboard numbers from the rollups (migration 0006), tenant-scoped: the /api/v1/stats endpoints and the
Site Activity page both call these, so both show the same numbers.

Time is UTC: hours and days are UTC hours and days. A range is [from, to): `from` is rounded down and `to` up
to the interval (hour or day) and the response says which range was used. Nothing here scans visitor_events,
except `realtime`, which reads the last 30 minutes of one widget through the (widget_id, occurred_at) index.
Errors: ConsoleError(400) with a reason for a bad parameter, 404 for a widget outside the member's tenant.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from console import services
from console.accounts import Member
from console.errors import ConsoleError

METRICS = ("pageviews", "visitors", "sessions", "events", "custom_events")
DEFAULT_METRICS = ("pageviews", "visitors", "sessions")
INTERVALS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_BUCKETS = {"hour": 24 * 31, "day": 366}

TOP_LIMIT_MAX = 100
REALTIME_VISITORS_WINDOW = timedelta(minutes=5)
REALTIME_MINUTES = 30

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_time(value: str, what: str) -> datetime:
    """An ISO 8601 time ('2026-11-30T10:00:00Z', with an offset, or naive = UTC) or a date (its UTC midnight)."""
    text = value.strip()
    try:
        if _DATE.match(text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConsoleError(400, f"{what} must be an ISO 8601 time or a YYYY-MM-DD date, got {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def floor_to(t: datetime, interval: str) -> datetime:
    t = t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return t.replace(hour=0) if interval == "day" else t


def ceil_to(t: datetime, interval: str) -> datetime:
    floored = floor_to(t, interval)
    return floored if floored == t else floored + INTERVALS[interval]


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Range:
    start: datetime  # inclusive, aligned to the interval
    end: datetime  # exclusive, aligned
    interval: str

    def public(self) -> dict[str, str]:
        return {"from": iso(self.start), "to": iso(self.end), "interval": self.interval, "timezone": "UTC"}

    def buckets(self) -> list[datetime]:
        step, t, out = INTERVALS[self.interval], self.start, []
        while t < self.end:
            out.append(t)
            t += step
        return out


def parse_range(
    start: str | None,
    end: str | None,
    interval: str | None,
    *,
    now: datetime | None = None,
    max_buckets: dict[str, int] = MAX_BUCKETS,
) -> Range:
    """from/to/interval query values -> an aligned Range. Defaults: to = now, from = to - 7 days; interval =
    hour for ranges up to 2 days, else day."""
    now = now or datetime.now(UTC)
    if interval is not None and interval not in INTERVALS:
        raise ConsoleError(400, f"interval must be 'hour' or 'day', got {interval!r}")
    t1 = parse_time(end, "to") if end else now
    t0 = parse_time(start, "from") if start else t1 - timedelta(days=7)
    if t0 >= t1:
        raise ConsoleError(400, "from must be before to")
    chosen = interval or ("hour" if t1 - t0 <= timedelta(days=2) else "day")
    r = Range(floor_to(t0, chosen), ceil_to(t1, chosen), chosen)
    buckets = (r.end - r.start) // INTERVALS[chosen]
    if buckets > max_buckets[chosen]:
        raise ConsoleError(
            400,
            f"at most {max_buckets[chosen]} {chosen} buckets per request, this range has {buckets}"
            + ("; use interval=day" if chosen == "hour" else ""),
        )
    return r


def parse_metrics(value: str | None) -> tuple[str, ...]:
    if value is None or not value.strip():
        return DEFAULT_METRICS
    asked = tuple(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in asked if m not in METRICS]
    if unknown or not asked:
        raise ConsoleError(400, f"unknown metric(s) {', '.join(unknown) or value!r}; choose from {', '.join(METRICS)}")
    return asked


def parse_limit(value: str | None, default: int = 10) -> int:
    if value is None:
        return default
    if not value.strip().isdigit() or not 1 <= int(value) <= TOP_LIMIT_MAX:
        raise ConsoleError(400, f"limit must be a whole number between 1 and {TOP_LIMIT_MAX}, got {value!r}")
    return int(value)


def widget_id_for(conn: psycopg.Connection, member: Member, widget_id: str | None) -> uuid.UUID:
    if not widget_id:
        raise ConsoleError(400, "widget_id is required")
    return services.widget_for(conn, member, widget_id).id


# --- queries ------------------------------------------------------------------------------------------------

_HOURLY = (
    "SELECT hour, pageviews, visitors, sessions, events, custom_events FROM rollup_hourly"
    " WHERE widget_id = %(w)s AND hour >= %(start)s AND hour < %(end)s"
)
_DAILY_COUNTS = (
    "SELECT (hour AT TIME ZONE 'UTC')::date, sum(pageviews), sum(sessions), sum(events), sum(custom_events)"
    " FROM rollup_hourly WHERE widget_id = %(w)s AND hour >= %(start)s AND hour < %(end)s GROUP BY 1"
)
_DAILY_VISITORS = "SELECT day, visitors FROM rollup_daily WHERE widget_id = %(w)s AND day >= %(d0)s AND day < %(d1)s"
_TOTALS = (
    "SELECT coalesce(sum(pageviews), 0), coalesce(sum(sessions), 0), coalesce(sum(events), 0),"
    " coalesce(sum(custom_events), 0) FROM rollup_hourly WHERE widget_id = %(w)s AND hour >= %(start)s AND hour < %(end)s"
)
# Unique visitors over the whole range. The visitor-bucket rows in the range are counted first (the sum of the
# per-bucket visitor counters, O(buckets)); up to EXACT_UNIQUE_MAX_ROWS of them, a count(DISTINCT) over the
# visitor sets is exact and cheap. Beyond that, the k-minimum-values estimate: the KMV_K smallest distinct
# 64-bit visitor hashes in the range, read in hash order through the (widget_id, vh, bucket) index (stops
# after KMV_K distinct hashes); unique ~= (k - 1) / (k-th smallest hash as a fraction of the hash space),
# relative standard error 1/sqrt(k - 2) ~= 1.6 % for k = 4096; exact when the range has fewer than k visitors.
EXACT_UNIQUE_MAX_ROWS = 20_000
KMV_K = 4096
_BUCKET_ROWS = {
    "hour": (
        "SELECT coalesce(sum(visitors), 0) FROM rollup_hourly"
        " WHERE widget_id = %(w)s AND hour >= %(start)s AND hour < %(end)s"
    ),
    "day": "SELECT coalesce(sum(visitors), 0) FROM rollup_daily WHERE widget_id = %(w)s AND day >= %(d0)s AND day < %(d1)s",
}
_UNIQUE = {
    "hour": (
        "SELECT count(DISTINCT visitor_id) FROM rollup_visitor_hours"
        " WHERE widget_id = %(w)s AND hour >= %(start)s AND hour < %(end)s"
    ),
    "day": (
        "SELECT count(DISTINCT visitor_id) FROM rollup_visitor_days"
        " WHERE widget_id = %(w)s AND day >= %(d0)s AND day < %(d1)s"
    ),
}
_KMV = {
    "hour": (
        "SELECT count(*), max(vh) FROM (SELECT vh FROM rollup_visitor_hours WHERE widget_id = %(w)s"
        " AND hour >= %(start)s AND hour < %(end)s GROUP BY vh ORDER BY vh LIMIT %(k)s) smallest"
    ),
    "day": (
        "SELECT count(*), max(vh) FROM (SELECT vh FROM rollup_visitor_days WHERE widget_id = %(w)s"
        " AND day >= %(d0)s AND day < %(d1)s GROUP BY vh ORDER BY vh LIMIT %(k)s) smallest"
    ),
}


def unique_visitors(conn: psycopg.Connection, widget_id: uuid.UUID, r: Range) -> tuple[int, bool]:
    """(distinct visitors with an event in the range, estimated?). Exact unless the range holds more than
    EXACT_UNIQUE_MAX_ROWS visitor-bucket rows and at least KMV_K distinct visitors (then a KMV estimate)."""
    p = _params(widget_id, r, k=KMV_K)
    rows = int(conn.execute(_BUCKET_ROWS[r.interval], p).fetchone()[0])  # type: ignore[index]
    if rows <= EXACT_UNIQUE_MAX_ROWS:
        return int(conn.execute(_UNIQUE[r.interval], p).fetchone()[0]), False  # type: ignore[index]
    n, kth = conn.execute(_KMV[r.interval], p).fetchone()  # type: ignore[misc]
    if n < KMV_K:
        return int(n), False  # fewer than k distinct hashes: that is the distinct count
    fraction = (int(kth) + 2**63 + 1) / 2**64  # signed 64-bit hash -> (0, 1]
    return round((KMV_K - 1) / fraction), True


_TOP_PAGES = """
SELECT page, sum(n) AS n FROM (
    SELECT page, pageviews AS n FROM rollup_pages_daily WHERE widget_id = %(w)s AND day >= %(d0)s AND day < %(d1)s
    UNION ALL
    SELECT page, pageviews FROM rollup_pages WHERE widget_id = %(w)s AND hour >= %(start)s AND hour < %(h0)s
    UNION ALL
    SELECT page, pageviews FROM rollup_pages WHERE widget_id = %(w)s AND hour >= %(h1)s AND hour < %(end)s
) pages GROUP BY page ORDER BY n DESC, page LIMIT %(limit)s"""
_TOP_EVENTS = (
    "SELECT name, sum(events) AS n FROM rollup_event_names WHERE widget_id = %(w)s AND hour >= %(start)s"
    " AND hour < %(end)s GROUP BY name ORDER BY n DESC, name LIMIT %(limit)s"
)


def _params(widget_id: uuid.UUID, r: Range, **extra: object) -> dict[str, object]:
    return {"w": widget_id, "start": r.start, "end": r.end, "d0": r.start.date(), "d1": r.end.date(), **extra}


def timeseries(conn: psycopg.Connection, widget_id: uuid.UUID, r: Range, metrics: tuple[str, ...]) -> dict[str, Any]:
    """{from, to, interval, timezone, metrics, results: [{time, <metric>: int}...] (every bucket, zeros
    included), totals: {<metric>: int}, visitors_estimated: bool (with visitors)}; totals.visitors is the
    range's unique visitors, not a sum of the buckets (see unique_visitors)."""
    p = _params(widget_id, r)
    rows: dict[datetime, dict[str, int]] = {}
    if r.interval == "hour":
        for hour, pv, vis, ss, ev, cu in conn.execute(_HOURLY, p):
            rows[hour] = {"pageviews": pv, "visitors": vis, "sessions": ss, "events": ev, "custom_events": cu}
    else:
        for day, pv, ss, ev, cu in conn.execute(_DAILY_COUNTS, p):
            rows[_midnight(day)] = {
                "pageviews": int(pv),
                "sessions": int(ss),
                "events": int(ev),
                "custom_events": int(cu),
            }
        if "visitors" in metrics:
            for day, vis in conn.execute(_DAILY_VISITORS, p):
                rows.setdefault(_midnight(day), {})["visitors"] = vis
    results = [{"time": iso(t), **{m: int(rows.get(t, {}).get(m, 0)) for m in metrics}} for t in r.buckets()]
    pv, ss, ev, cu = conn.execute(_TOTALS, p).fetchone()  # type: ignore[misc]
    sums = {"pageviews": int(pv), "sessions": int(ss), "events": int(ev), "custom_events": int(cu)}
    extra: dict[str, Any] = {}
    if "visitors" in metrics:
        sums["visitors"], extra["visitors_estimated"] = unique_visitors(conn, widget_id, r)
    return {
        "widget_id": str(widget_id),
        **r.public(),
        "metrics": list(metrics),
        "results": results,
        "totals": {m: sums[m] for m in metrics},
        **extra,
    }


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


def top_pages(conn: psycopg.Connection, widget_id: uuid.UUID, r: Range, limit: int) -> dict[str, Any]:
    """{from, to, ..., results: [{page, pageviews}]}, most viewed first (ties by page)."""
    first_day, end_day = ceil_to(r.start, "day"), floor_to(r.end, "day")
    if first_day < end_day:  # whole days inside: [start, first_day) hourly, days, [end_day, end) hourly
        p = _params(widget_id, r, limit=limit, h0=first_day, h1=end_day)
        p.update(d0=first_day.date(), d1=end_day.date())
    else:  # no whole day: all hourly
        p = _params(widget_id, r, limit=limit, h0=r.end, h1=r.end)
        p.update(d0=r.start.date(), d1=r.start.date())
    rows = conn.execute(_TOP_PAGES, p).fetchall()
    return {"widget_id": str(widget_id), **r.public(), "results": [{"page": p, "pageviews": int(n)} for p, n in rows]}


def top_events(conn: psycopg.Connection, widget_id: uuid.UUID, r: Range, limit: int) -> dict[str, Any]:
    """{from, to, ..., results: [{name, events}]}: custom events by name, most frequent first."""
    rows = conn.execute(_TOP_EVENTS, _params(widget_id, r, limit=limit)).fetchall()
    return {"widget_id": str(widget_id), **r.public(), "results": [{"name": n, "events": int(c)} for n, c in rows]}


# The window is minutes of one widget: read straight from visitor_events through (widget_id, occurred_at).
_REALTIME = """
WITH clock AS (SELECT now() AS now, date_trunc('minute', now(), 'UTC') AS minute)
SELECT clock.now, clock.minute,
       (SELECT count(DISTINCT visitor_id) FROM visitor_events
        WHERE widget_id = %(w)s AND occurred_at > clock.now - %(vwin)s AND occurred_at <= clock.now),
       (SELECT coalesce(json_agg(json_build_array(m, n)), '[]') FROM (
            SELECT date_trunc('minute', occurred_at, 'UTC') AS m, count(*) AS n FROM visitor_events
            WHERE widget_id = %(w)s AND event_type = 'pageview'
              AND occurred_at >= clock.minute - %(pwin)s AND occurred_at < clock.minute + interval '1 minute'
            GROUP BY 1) per_minute)
FROM clock
"""


def realtime(conn: psycopg.Connection, widget_id: uuid.UUID) -> dict[str, Any]:
    """{now, visitors: distinct visitors with an event in (now - 5 min, now], pageviews: [{minute, pageviews}]
    for the current minute and the 29 before it (oldest first, zeros included)}. Times are event times
    (occurred_at): a late event can still raise a past minute's count."""
    now, minute, visitors, per_minute = conn.execute(
        _REALTIME, {"w": widget_id, "vwin": REALTIME_VISITORS_WINDOW, "pwin": timedelta(minutes=REALTIME_MINUTES - 1)}
    ).fetchone()  # type: ignore[misc]
    counts = {parse_time(m, "minute"): n for m, n in per_minute}
    minutes = [minute - timedelta(minutes=REALTIME_MINUTES - 1 - i) for i in range(REALTIME_MINUTES)]
    return {
        "widget_id": str(widget_id),
        "now": iso(now),
        "visitors": int(visitors),
        "visitors_window_s": int(REALTIME_VISITORS_WINDOW.total_seconds()),
        "pageviews": [{"minute": iso(m), "pageviews": int(counts.get(m, 0))} for m in minutes],
    }
