"""Admin operations over widget configs. Every change writes an audit_log row with actor and old/new values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from site_activity.audit import JsonFields, audit

MIN_RETENTION_DAYS = 1
MAX_RETENTION_DAYS = 365


class WidgetError(ValueError):
    """An admin request that cannot be carried out; the message is meant for the operator."""


@dataclass(frozen=True)
class Widget(JsonFields):
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    tracking_enabled: bool
    event_retention_days: int
    created_at: datetime
    updated_at: datetime


_COLUMNS = "id, tenant_id, name, tracking_enabled, event_retention_days, created_at, updated_at"


def _audit(
    conn: psycopg.Connection,
    actor: str,
    action: str,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    widget_id: uuid.UUID,
    tenant_id: uuid.UUID | None,
    request_id: str | None = None,
) -> None:
    audit(
        conn,
        actor=actor,
        action=action,
        tenant_id=tenant_id,
        entity="widget_config",
        entity_id=str(widget_id),
        old=old,
        new=new,
        request_id=request_id,
    )


def get_widget(conn: psycopg.Connection, widget_id: uuid.UUID) -> Widget:
    with conn.cursor(row_factory=class_row(Widget)) as cur:
        row = cur.execute(f"SELECT {_COLUMNS} FROM widget_configs WHERE id = %s", (widget_id,)).fetchone()
    if row is None:
        raise WidgetError(f"no widget with id {widget_id}")
    return row


def list_widgets(conn: psycopg.Connection, tenant_id: uuid.UUID | None = None) -> list[Widget]:
    with conn.cursor(row_factory=class_row(Widget)) as cur:
        if tenant_id is None:
            return cur.execute(f"SELECT {_COLUMNS} FROM widget_configs ORDER BY created_at, id").fetchall()
        return cur.execute(
            f"SELECT {_COLUMNS} FROM widget_configs WHERE tenant_id = %s ORDER BY created_at, id", (tenant_id,)
        ).fetchall()


def create_widget(
    conn: psycopg.Connection,
    *,
    name: str,
    actor: str,
    tenant_id: uuid.UUID | None = None,
    tenant_name: str | None = None,
    tracking_enabled: bool = False,
) -> Widget:
    """Creates a widget (90-day retention); a new tenant too when none is given.

    Tracking is off unless `tracking_enabled`; when on, the enable is audited and committed in the SAME
    transaction as the create, so no reader (the API's widget cache) ever sees the widget disabled first.
    """
    if not name.strip():
        raise WidgetError("widget name must not be empty")
    with conn.transaction():
        if tenant_id is None:
            tenant_id = uuid.uuid4()
            conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, tenant_name or name))
        elif conn.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant_id,)).fetchone() is None:
            conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, tenant_name or str(tenant_id)))
        widget_id = uuid.uuid4()
        conn.execute(
            "INSERT INTO widget_configs (id, tenant_id, name) VALUES (%s, %s, %s)", (widget_id, tenant_id, name)
        )
        widget = get_widget(conn, widget_id)
        _audit(conn, actor, "create", None, widget.public(), widget.id, widget.tenant_id)
        if tracking_enabled:
            widget = set_tracking(conn, widget_id, True, actor=actor)
    return widget


def _update(
    conn: psycopg.Connection,
    widget_id: uuid.UUID,
    column: str,
    value: Any,
    actor: str,
    action: str,
    request_id: str | None = None,
) -> Widget:
    with conn.transaction():
        old = get_widget(conn, widget_id)
        if getattr(old, column) == value:
            return old  # nothing changes, so nothing to audit
        conn.execute(
            f"UPDATE widget_configs SET {column} = %s, updated_at = now() WHERE id = %s",  # column is ours, not input
            (value, widget_id),
        )
        new = get_widget(conn, widget_id)
        _audit(
            conn,
            actor,
            action,
            {column: getattr(old, column)},
            {column: getattr(new, column)},
            widget_id,
            new.tenant_id,
            request_id,
        )
    return new


def set_tracking(
    conn: psycopg.Connection, widget_id: uuid.UUID, enabled: bool, *, actor: str, request_id: str | None = None
) -> Widget:
    return _update(conn, widget_id, "tracking_enabled", enabled, actor, "enable" if enabled else "disable", request_id)


def check_retention(days: int) -> None:
    if not MIN_RETENTION_DAYS <= days <= MAX_RETENTION_DAYS:
        raise WidgetError(f"retention must be between {MIN_RETENTION_DAYS} and {MAX_RETENTION_DAYS} days, got {days}")


def set_retention(
    conn: psycopg.Connection, widget_id: uuid.UUID, days: int, *, actor: str, request_id: str | None = None
) -> Widget:
    check_retention(days)
    return _update(conn, widget_id, "event_retention_days", days, actor, "set-retention", request_id)


def delete_widget(conn: psycopg.Connection, widget_id: uuid.UUID, *, actor: str) -> int:
    """Deletes the widget and (by ON DELETE CASCADE) its events; returns how many events went with it."""
    with conn.transaction():
        old = get_widget(conn, widget_id)
        events = conn.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (widget_id,)).fetchone()
        conn.execute("DELETE FROM widget_configs WHERE id = %s", (widget_id,))
        _audit(conn, actor, "delete", old.public(), None, widget_id, old.tenant_id)
    return int(events[0]) if events else 0
