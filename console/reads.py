"""Read queries over visitor events for the REST API and the activity pages (issue 12): events (two orders),
the visitor browser, visitor and contact timelines, the inbox rail. Pure SQL + plain dicts, no HTTP: the routes
wrap these, and the benchmark can call them directly with a psycopg connection.

Every function is tenant-scoped: it takes the caller's tenant id and only ever returns that tenant's rows.
Positions ("after"/"before") are plain lists of JSON values; console.read_cursors signs them into opaque cursors.

Orders and guarantees (README "REST API"):
- `list_events(order="occurred")`: newest first by (occurred_at, widget_id, event_id), a total order, so a keyset
  page never repeats or skips a row that existed when paging started; rows inserted meanwhile appear only if
  they sort after the cursor.
- `list_events(order="received")`: oldest first by (txid, widget_id, event_id), txid = the id of the transaction
  that inserted the row (migration 0007). Only rows whose transaction is older than every transaction still in
  flight are served, so no row can later commit before the returned position: a client polling with `next`
  sees every committed row exactly once (rows re-linked to a contact after they were served are not re-sent).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

EVENTS_MAX_LIMIT = 1000
EVENTS_DEFAULT_LIMIT = 100
TIMELINE_MAX_LIMIT = 1000
TIMELINE_DEFAULT_LIMIT = 200
VISITORS_MAX_LIMIT = 200
VISITORS_DEFAULT_LIMIT = 50
RAIL_LIMIT = 50

Order = Literal["occurred", "received"]

_EVENT_COLUMNS = (
    "e.event_id, e.widget_id, e.visitor_id, e.event_type, e.name, e.url, e.referrer, e.properties,"
    " e.user_id, e.customer_id, e.session_id, e.occurred_at, e.received_at"
)


class PositionError(ValueError):
    """A cursor position that does not have the shape of this listing's positions."""


@dataclass(frozen=True)
class EventFilter:
    """Optional filters of GET /api/v1/events; None = no filter. since/until bound occurred_at: [since, until)."""

    widget_id: uuid.UUID | None = None
    event_type: str | None = None
    name: str | None = None
    visitor_id: str | None = None
    customer_id: uuid.UUID | None = None
    since: datetime | None = None
    until: datetime | None = None


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    """One stored event as the API shows it (ids as strings, times ISO 8601 with µs)."""
    return {
        "event_id": str(row["event_id"]),
        "widget_id": str(row["widget_id"]),
        "visitor_id": row["visitor_id"],
        "type": row["event_type"],
        "name": row["name"],
        "url": row["url"],
        "referrer": row["referrer"],
        "properties": row["properties"],
        "user_id": row["user_id"],
        "customer_id": str(row["customer_id"]) if row["customer_id"] else None,
        "session_id": str(row["session_id"]) if row["session_id"] else None,
        "occurred_at": row["occurred_at"].isoformat(),
        "received_at": row["received_at"].isoformat(),
    }


def tenant_widget_ids(conn: psycopg.Connection, tenant_id: uuid.UUID) -> list[uuid.UUID]:
    return [r[0] for r in conn.execute("SELECT id FROM widget_configs WHERE tenant_id = %s ORDER BY id", (tenant_id,))]


def _time_key(position: list[Any]) -> tuple[datetime, uuid.UUID, str]:
    """(occurred_at/last_seen, widget_id, third key) from a position; PositionError when malformed."""
    try:
        at, widget, third = position
        return datetime.fromisoformat(at), uuid.UUID(widget), str(third)
    except (TypeError, ValueError) as exc:
        raise PositionError(str(exc)) from None


# EventFilter field -> its condition on visitor_events e (the parameter is named after the field).
_EVENT_CONDITIONS = (
    ("event_type", "e.event_type = %(event_type)s"),
    ("name", "e.name = %(name)s"),
    ("visitor_id", "e.visitor_id = %(visitor_id)s"),
    ("customer_id", "e.customer_id = %(customer_id)s"),
    ("since", "e.occurred_at >= %(since)s"),
    ("until", "e.occurred_at < %(until)s"),
)


def _keyset_page(
    rows: list[dict[str, Any]],
    limit: int,
    time_key: str,
    third_key: str,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """A page of a query that asked for `limit` + 1 rows in (time, widget_id, third) DESC order: the first `limit`
    rows, and the position after the last of them (None: no more), as `_time_key` reads it back."""
    page = rows[:limit]
    if len(rows) <= limit:
        return page, None
    last = page[-1]
    return page, [last[time_key].isoformat(), str(last["widget_id"]), str(last[third_key])]


def _filters(f: EventFilter, p: dict[str, Any]) -> list[str]:
    """The conditions of the filters set in `f`; their values are added to the query parameters `p`."""
    conds = []
    for field_name, cond in _EVENT_CONDITIONS:
        value = getattr(f, field_name)
        if value is not None:
            conds.append(cond)
            p[field_name] = value
    return conds


def list_events(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    f: EventFilter,
    *,
    order: Order = "occurred",
    limit: int = EVENTS_DEFAULT_LIMIT,
    after: list[Any] | None = None,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """One page of the tenant's events: (events as `event_json`, the position after the last one).

    order="occurred": newest first; the position is None on the last page. order="received": commit order,
    oldest first; the position is never None (poll it again later for newer rows; None only when nothing was
    ever served and no position was given). `f.widget_id` must already be known to belong to the tenant.
    Raises PositionError for a malformed position."""
    if order == "received":
        return _events_received(conn, tenant_id, f, limit, after)
    p: dict[str, Any] = {
        "tenant": tenant_id,
        "n": limit + 1,
        "widgets": [f.widget_id] if f.widget_id else tenant_widget_ids(conn, tenant_id),
    }
    conds = _filters(f, p)
    if after is not None:
        p["at"], p["wid"], eid = _time_key(after)
        p["eid"] = _uuid(eid)
        conds.append(
            "e.occurred_at <= %(at)s AND (e.occurred_at, e.widget_id, e.event_id) < (%(at)s, %(wid)s, %(eid)s)"
        )
    where = "".join(f" AND {c}" for c in conds)
    # One index range scan per widget ((widget_id, occurred_at), or the visitor / contact index when filtered),
    # each stopped after `limit` rows, merged: cost ∝ limit × widgets, not the tenant's row count.
    sql = (
        f"SELECT e.* FROM unnest(%(widgets)s::uuid[]) AS w (id) CROSS JOIN LATERAL ("
        f" SELECT {_EVENT_COLUMNS} FROM visitor_events e"
        f" WHERE e.widget_id = w.id AND e.tenant_id = %(tenant)s{where}"
        f" ORDER BY e.occurred_at DESC, e.widget_id DESC, e.event_id DESC LIMIT %(n)s) e"
        f" ORDER BY e.occurred_at DESC, e.widget_id DESC, e.event_id DESC LIMIT %(n)s"
    )
    page, nxt = _keyset_page(
        conn.cursor(row_factory=dict_row).execute(sql, p).fetchall(), limit, "occurred_at", "event_id"
    )
    return [event_json(r) for r in page], nxt


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise PositionError(str(exc)) from None


def _events_received(
    conn: psycopg.Connection, tenant_id: uuid.UUID, f: EventFilter, limit: int, after: list[Any] | None
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    p: dict[str, Any] = {"tenant": tenant_id, "n": limit}
    conds = _filters(f, p)
    if f.widget_id is not None:
        conds.append("e.widget_id = %(widget)s")
        p["widget"] = f.widget_id
    if after is not None:
        try:
            txid, wid, eid = after
            p["txid"], p["wid"], p["eid"] = int(txid), uuid.UUID(wid), uuid.UUID(eid)
        except (TypeError, ValueError) as exc:
            raise PositionError(str(exc)) from None
        conds.append("(e.txid, e.widget_id, e.event_id) > (%(txid)s::text::xid8, %(wid)s, %(eid)s)")
    where = "".join(f" AND {c}" for c in conds)
    # The horizon: transactions below the snapshot's xmin have all ended, so the set of such rows is final.
    sql = (
        f"SELECT {_EVENT_COLUMNS}, e.txid::text AS txid FROM visitor_events e"
        f" WHERE e.tenant_id = %(tenant)s AND e.txid < pg_snapshot_xmin(pg_current_snapshot()){where}"
        f" ORDER BY e.txid, e.widget_id, e.event_id LIMIT %(n)s"
    )
    rows = conn.cursor(row_factory=dict_row).execute(sql, p).fetchall()
    if not rows:
        return [], after
    last = rows[-1]
    return [event_json(r) for r in rows], [last["txid"], str(last["widget_id"]), str(last["event_id"])]


# --- visitors ------------------------------------------------------------------------------------------------


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def visitor_json(row: dict[str, Any]) -> dict[str, Any]:
    contact = None
    if row["customer_id"] is not None:
        contact = {"customer_id": str(row["customer_id"]), "email": row["email"], "name": row["contact_name"]}
    return {
        "visitor_id": row["visitor_id"],
        "widget_id": str(row["widget_id"]),
        "first_seen": row["first_seen"].isoformat(),
        "last_seen": row["last_seen"].isoformat(),
        "events": row["events"],
        "pageviews": row["pageviews"],
        "sessions": row["sessions"],
        "custom_events": row["custom_events"],
        "user_id": row["user_id"],
        "contact": contact,
    }


def list_visitors(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    *,
    widget_id: uuid.UUID | None = None,
    q: str | None = None,
    since: datetime | None = None,
    limit: int = VISITORS_DEFAULT_LIMIT,
    after: list[Any] | None = None,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """The visitor browser: visitors (per widget) most recently seen first, from visitor_summaries (migration
    0007, exact: kept by triggers). `q`: case-insensitive substring of the visitor id, the identify user id, or
    the linked contact's email or name. `since`: last seen at or after. Returns (visitors, next position|None)."""
    p: dict[str, Any] = {
        "tenant": tenant_id,
        "n": limit + 1,
        "widgets": [widget_id] if widget_id else tenant_widget_ids(conn, tenant_id),
    }
    conds = ["s.widget_id = w.id", "s.tenant_id = %(tenant)s"]
    if since is not None:
        conds.append("s.last_seen >= %(since)s")
        p["since"] = since
    if q:
        conds.append("(s.visitor_id ILIKE %(q)s OR s.user_id ILIKE %(q)s OR c.email ILIKE %(q)s OR c.name ILIKE %(q)s)")
        p["q"] = _like(q)
    if after is not None:
        p["at"], p["wid"], p["vid"] = _time_key(after)
        conds.append("s.last_seen <= %(at)s AND (s.last_seen, s.widget_id, s.visitor_id) < (%(at)s, %(wid)s, %(vid)s)")
    # Per widget: a backward range scan of (widget_id, last_seen, visitor_id) stopped after `limit` rows (a `q`
    # filters that scan: cost ∝ the widget's visitors when few match), then merged.
    sql = (
        "SELECT v.* FROM unnest(%(widgets)s::uuid[]) AS w (id) CROSS JOIN LATERAL ("
        " SELECT s.*, c.email, c.name AS contact_name FROM visitor_summaries s"
        " LEFT JOIN customers c ON c.id = s.customer_id"
        f" WHERE {' AND '.join(conds)}"
        " ORDER BY s.last_seen DESC, s.widget_id DESC, s.visitor_id DESC LIMIT %(n)s) v"
        " ORDER BY v.last_seen DESC, v.widget_id DESC, v.visitor_id DESC LIMIT %(n)s"
    )
    page, nxt = _keyset_page(
        conn.cursor(row_factory=dict_row).execute(sql, p).fetchall(), limit, "last_seen", "visitor_id"
    )
    return [visitor_json(r) for r in page], nxt


# --- timelines -----------------------------------------------------------------------------------------------


def _timeline_rows(
    conn: psycopg.Connection,
    where: str,
    p: dict[str, Any],
    limit: int,
    before: list[Any] | None,
    types: tuple[str, ...] | None = None,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """The newest `limit` rows matching `where` before the position, newest first, and the next position."""
    p = {**p, "n": limit + 1}
    if types is not None:
        where += " AND e.event_type = ANY(%(types)s)"
        p["types"] = list(types)
    if before is not None:
        p["at"], p["wid"], eid = _time_key(before)
        p["eid"] = _uuid(eid)
        where += (
            " AND e.occurred_at <= %(at)s AND (e.occurred_at, e.widget_id, e.event_id) < (%(at)s, %(wid)s, %(eid)s)"
        )
    sql = (
        f"SELECT {_EVENT_COLUMNS} FROM visitor_events e WHERE {where}"
        " ORDER BY e.occurred_at DESC, e.widget_id DESC, e.event_id DESC LIMIT %(n)s"
    )
    return _keyset_page(conn.cursor(row_factory=dict_row).execute(sql, p).fetchall(), limit, "occurred_at", "event_id")


def group_sessions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events (any order) → sessions in time order, each with its events in time order. A session is keyed by
    (widget, visitor, session_id); events without a session id form one group per visitor."""
    ordered = sorted(rows, key=lambda r: (r["occurred_at"], str(r["widget_id"]), str(r["event_id"])))
    groups: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for r in ordered:
        key = (str(r["widget_id"]), r["visitor_id"], str(r["session_id"]) if r["session_id"] else None)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "session_id": key[2],
                "widget_id": key[0],
                "visitor_id": key[1],
                "started_at": r["occurred_at"].isoformat(),
                "events": [],
            }
        group["ended_at"] = r["occurred_at"].isoformat()
        group["events"].append(event_json(r))
    return list(groups.values())


def visitor_timeline(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    visitor_id: str,
    *,
    widget_id: uuid.UUID | None = None,
    limit: int = TIMELINE_DEFAULT_LIMIT,
    before: list[Any] | None = None,
) -> dict[str, Any] | None:
    """A visitor's newest `limit` events (on one widget, or on all the tenant's widgets), grouped by session:
    {"visitor_id", "widget_id", "sessions": [...], "next": position|None}. None when the visitor has no event
    in the tenant (or on that widget) at all. Uses the (tenant_id, visitor_id, occurred_at) index."""
    where = "e.tenant_id = %(tenant)s AND e.visitor_id = %(visitor)s"
    p: dict[str, Any] = {"tenant": tenant_id, "visitor": visitor_id}
    if widget_id is not None:
        where += " AND e.widget_id = %(widget)s"
        p["widget"] = widget_id
    rows, nxt = _timeline_rows(conn, where, p, limit, before)
    if not rows and before is None:
        return None
    return {
        "visitor_id": visitor_id,
        "widget_id": str(widget_id) if widget_id else None,
        "sessions": group_sessions(rows),
        "next": nxt,
    }


def contact(conn: psycopg.Connection, tenant_id: uuid.UUID, customer_id: uuid.UUID) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT id, external_id, email, name FROM customers WHERE id = %s AND tenant_id = %s", (customer_id, tenant_id)
    ).fetchone()
    if row is None:
        return None
    return {"customer_id": str(row[0]), "user_id": row[1], "email": row[2], "name": row[3]}


def contact_timeline(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    customer_id: uuid.UUID,
    *,
    limit: int = TIMELINE_DEFAULT_LIMIT,
    before: list[Any] | None = None,
) -> dict[str, Any] | None:
    """Every event linked to the contact, newest `limit`, grouped by session: all its visitors (browsers), and
    their anonymous history before the identify (the sink re-links it: sink/writer.py _RETRO_LINK).
    {"contact": {...}, "visitors": [{"widget_id", "visitor_id"}], "sessions": [...], "next": position|None};
    None when the contact is not the tenant's. Uses the (customer_id, occurred_at) index."""
    who = contact(conn, tenant_id, customer_id)
    if who is None:
        return None
    rows, nxt = _timeline_rows(
        conn,
        "e.customer_id = %(customer)s AND e.tenant_id = %(tenant)s",
        {"customer": customer_id, "tenant": tenant_id},
        limit,
        before,
    )
    visitors = sorted({(str(r["widget_id"]), r["visitor_id"]) for r in rows})
    return {
        "contact": who,
        "visitors": [{"widget_id": w, "visitor_id": v} for w, v in visitors],
        "sessions": group_sessions(rows),
        "next": nxt,
    }


def recent_activity(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    *,
    customer_id: uuid.UUID | None = None,
    widget_id: uuid.UUID | None = None,
    visitor_id: str | None = None,
    limit: int = RAIL_LIMIT,
) -> list[dict[str, Any]]:
    """The inbox rail: a contact's (or one visitor's) newest pageviews and custom events, newest first."""
    p: dict[str, Any]
    if customer_id is not None:
        where, p = (
            "e.customer_id = %(customer)s AND e.tenant_id = %(tenant)s",
            {"customer": customer_id, "tenant": tenant_id},
        )
    else:
        where = "e.tenant_id = %(tenant)s AND e.visitor_id = %(visitor)s AND e.widget_id = %(widget)s"
        p = {"tenant": tenant_id, "visitor": visitor_id, "widget": widget_id}
    rows, _ = _timeline_rows(conn, where, p, limit, None, types=("pageview", "custom"))
    return [event_json(r) for r in rows]
