"""What the console does, independent of HTTP: tenant-scoped reads and audited changes. Routes (API and pages)
are thin wrappers over these functions, so both paths apply the same rules."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from console.accounts import Member
from console.errors import ConsoleError, not_found
from site_activity import erasure, widgets
from site_activity.events import MAX_VISITOR_ID_CHARS
from site_activity.widgets import Widget, WidgetError


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise not_found(f"no {what} {value}") from None


def widget_for(conn: psycopg.Connection, member: Member, widget_id: str) -> Widget:
    """The widget if it belongs to the member's tenant; 404 otherwise (never reveals another tenant's ids)."""
    wid = parse_uuid(widget_id, "widget")
    try:
        widget = widgets.get_widget(conn, wid)
    except WidgetError:
        raise not_found(f"no widget {widget_id}") from None
    if widget.tenant_id != member.tenant_id:
        raise not_found(f"no widget {widget_id}")
    return widget


def list_widgets(conn: psycopg.Connection, member: Member) -> list[Widget]:
    return widgets.list_widgets(conn, member.tenant_id)


def update_widget(
    conn: psycopg.Connection,
    member: Member,
    widget_id: str,
    *,
    tracking_enabled: bool | None,
    event_retention_days: int | None,
    request_id: str,
) -> Widget:
    """Applies either or both settings in one transaction, with an audit row per changed field (actor = the
    member's email). 400 when nothing is asked or retention is outside 1-365; nothing changes then."""
    if tracking_enabled is None and event_retention_days is None:
        raise ConsoleError(400, "give tracking_enabled and/or event_retention_days")
    if event_retention_days is not None:
        try:
            widgets.check_retention(event_retention_days)
        except WidgetError as exc:
            raise ConsoleError(400, str(exc)) from None
    with conn.transaction():
        widget = widget_for(conn, member, widget_id)
        conn.execute("SELECT 1 FROM widget_configs WHERE id = %s FOR UPDATE", (widget.id,))  # before/after exact
        if tracking_enabled is not None:
            widget = widgets.set_tracking(conn, widget.id, tracking_enabled, actor=member.email, request_id=request_id)
        if event_retention_days is not None:
            widget = widgets.set_retention(
                conn, widget.id, event_retention_days, actor=member.email, request_id=request_id
            )
    return widget


AUDIT_PAGE_MAX = 200


def audit_page(conn: psycopg.Connection, member: Member, *, limit: int, cursor: str | None) -> dict[str, Any]:
    """Newest first, keyset-paged on the row id: {data: [...], next_cursor: str | None}."""
    if not 1 <= limit <= AUDIT_PAGE_MAX:
        raise ConsoleError(400, f"limit must be between 1 and {AUDIT_PAGE_MAX}")
    before: int | None = None
    if cursor is not None:
        if not cursor.isdigit():
            raise ConsoleError(400, "cursor must be a next_cursor value from a previous page")
        before = int(cursor)
    rows = conn.execute(
        "SELECT id, at, actor, action, entity, entity_id, old_value, new_value, request_id FROM audit_log"
        " WHERE tenant_id = %s AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (member.tenant_id, before, before, limit + 1),
    ).fetchall()
    data = [
        {
            "id": str(r[0]),
            "at": r[1].isoformat(),
            "actor": r[2],
            "action": r[3],
            "entity": r[4],
            "entity_id": r[5],
            "before": r[6],
            "after": r[7],
            "request_id": r[8],
        }
        for r in rows[:limit]
    ]
    return {"data": data, "next_cursor": data[-1]["id"] if len(rows) > limit else None}


def erase_visitor(
    conn: psycopg.Connection, member: Member, widget_id: str, visitor_id: str, notify: erasure.Notify, request_id: str
) -> dict[str, Any]:
    """Deletes and suppresses one visitor of one of the tenant's widgets; 404 for another tenant's widget."""
    if not visitor_id or len(visitor_id) > MAX_VISITOR_ID_CHARS:  # the ingest limit: no longer id can be stored
        raise ConsoleError(400, f"visitor_id must be 1-{MAX_VISITOR_ID_CHARS} characters")
    try:
        return erasure.erase_visitor(
            conn,
            member.tenant_id,
            parse_uuid(widget_id, "widget"),
            visitor_id,
            actor=member.email,
            notify=notify,
            request_id=request_id,
        ).public()
    except erasure.ErasureError:
        raise not_found(f"no widget {widget_id}") from None
    except _RETRYABLE as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: Exception) -> ConsoleError:
    if isinstance(exc, erasure.NotifyError):
        return ConsoleError(
            503,
            f"erased, but the processors were not told yet: {exc}; repeat the erase shortly",
            headers={"Retry-After": "5"},
        )
    return ConsoleError(
        503,
        "nothing was erased: the database was busy (concurrent change); retry shortly",
        headers={"Retry-After": "1"},
    )


# An erase that lost a lock race rolled back whole; the caller may simply retry.
_RETRYABLE = (erasure.NotifyError, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def erase_contact(
    conn: psycopg.Connection, member: Member, customer_id: str, notify: erasure.Notify, request_id: str
) -> dict[str, Any]:
    """Deletes and suppresses a contact with all its visitors' events; 404 for another tenant's contact."""
    try:
        return erasure.erase_contact(
            conn,
            member.tenant_id,
            parse_uuid(customer_id, "contact"),
            actor=member.email,
            notify=notify,
            request_id=request_id,
        ).public()
    except erasure.ErasureError:
        raise not_found(f"no contact {customer_id}") from None
    except _RETRYABLE as exc:
        raise _unavailable(exc) from None
