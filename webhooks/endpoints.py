"""Webhook endpoints of a tenant: create (the signing secret is shown once), list, change, disable, delete, the
delivery log and replay. Shared by the console API (console/routes/webhooks.py) and the CLI; every change is
audited in its own transaction (site_activity/audit.py)."""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row

from site_activity.audit import JsonFields, audit
from site_activity.events import EventType
from webhooks.queue import MATCHES_FILTERS, WEBHOOK_ID
from webhooks.urls import UrlRefused, check_url

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the Standard Webhooks spec allows 24-64 random bytes
EVENT_TYPES = tuple(t.value for t in EventType)
MAX_DESCRIPTION_CHARS = 500
MAX_FILTER_ITEMS = 100
REPLAY_MAX_DAYS = 31
DELIVERIES_PAGE_MAX = 200
SYSTEM_ACTOR = "system:webhooks"


class WebhookError(ValueError):
    """A request that cannot be carried out (callers answer 400); the message is meant for the operator."""


class EndpointNotFound(WebhookError):
    """No such endpoint in the tenant (callers answer 404; another tenant's endpoint is not revealed)."""


@dataclass(frozen=True)
class Endpoint(JsonFields):
    id: uuid.UUID
    tenant_id: uuid.UUID
    url: str
    description: str
    event_types: list[str] | None
    widget_ids: list[uuid.UUID] | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        out = super().public()
        out["widget_ids"] = [str(w) for w in self.widget_ids] if self.widget_ids is not None else None
        return out


_COLUMNS = (
    "id, tenant_id, url, description, event_types, widget_ids, enabled, disabled_reason, disabled_at,"
    " failing_since, created_at, updated_at"
)


def new_secret() -> str:
    """A signing secret as the standardwebhooks library reads it: "whsec_" + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _audit(
    conn: psycopg.Connection,
    actor: str,
    action: str,
    endpoint: Endpoint,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    request_id: str | None,
) -> None:
    audit(
        conn,
        actor=actor,
        action=action,
        tenant_id=endpoint.tenant_id,
        entity="webhook_endpoint",
        entity_id=str(endpoint.id),
        old=old,
        new=new,
        request_id=request_id,
    )


def _url(url: str, allow_private: bool) -> str:
    try:
        return check_url(url, allow_private)
    except UrlRefused as exc:
        raise WebhookError(str(exc)) from None


def _event_types(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    unknown = sorted(set(values) - set(EVENT_TYPES))
    if unknown or not values or len(values) > MAX_FILTER_ITEMS:
        raise WebhookError(
            f"event_types must be a non-empty list of {', '.join(EVENT_TYPES)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    return sorted(set(values))


def _widget_ids(conn: psycopg.Connection, tenant_id: uuid.UUID, values: list[str] | None) -> list[uuid.UUID] | None:
    if values is None:
        return None
    if not values or len(values) > MAX_FILTER_ITEMS:
        raise WebhookError(f"widget_ids must be a list of 1-{MAX_FILTER_ITEMS} widget ids")
    try:
        ids = sorted({uuid.UUID(str(v)) for v in values})
    except ValueError:
        raise WebhookError("widget_ids must be widget ids (UUIDs)") from None
    found = {
        r[0]
        for r in conn.execute("SELECT id FROM widget_configs WHERE tenant_id = %s AND id = ANY(%s)", (tenant_id, ids))
    }
    missing = [str(i) for i in ids if i not in found]
    if missing:  # another tenant's widget is "unknown" too: nothing is revealed
        raise WebhookError(f"unknown widget ids: {', '.join(missing)}")
    return ids


def _description(value: str | None) -> str:
    value = value or ""
    if len(value) > MAX_DESCRIPTION_CHARS:
        raise WebhookError(f"description must be at most {MAX_DESCRIPTION_CHARS} characters")
    return value


def get_endpoint(
    conn: psycopg.Connection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID | str, *, for_update: bool = False
) -> Endpoint:
    try:
        eid = endpoint_id if isinstance(endpoint_id, uuid.UUID) else uuid.UUID(endpoint_id)
    except ValueError:
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id}") from None
    with conn.cursor(row_factory=class_row(Endpoint)) as cur:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = %s AND tenant_id = %s"
            + (" FOR UPDATE" if for_update else ""),
            (eid, tenant_id),
        ).fetchone()
    if row is None:
        raise EndpointNotFound(f"no webhook endpoint {endpoint_id}")
    return row


def list_endpoints(conn: psycopg.Connection, tenant_id: uuid.UUID) -> list[Endpoint]:
    with conn.cursor(row_factory=class_row(Endpoint)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE tenant_id = %s ORDER BY created_at, id", (tenant_id,)
        ).fetchall()


def create_endpoint(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    url: str,
    *,
    actor: str,
    allow_private: bool,
    event_types: list[str] | None = None,
    widget_ids: list[str] | None = None,
    description: str | None = None,
    enabled: bool = True,
    request_id: str | None = None,
) -> tuple[Endpoint, str]:
    """Creates an endpoint; returns it with its signing secret (the only time the secret is returned).
    WebhookError for a refused URL (see webhooks.urls), unknown event types or widgets of another tenant."""
    url = _url(url, allow_private)
    types = _event_types(event_types)
    desc = _description(description)
    secret = new_secret()
    with conn.transaction():
        if conn.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant_id,)).fetchone() is None:
            raise WebhookError(f"no tenant {tenant_id}")
        widgets = _widget_ids(conn, tenant_id, widget_ids)
        endpoint_id = uuid.uuid4()
        conn.execute(
            "INSERT INTO webhook_endpoints (id, tenant_id, url, description, event_types, widget_ids, enabled,"
            " disabled_reason, disabled_at, secret) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                endpoint_id,
                tenant_id,
                url,
                desc,
                types,
                widgets,
                enabled,
                None if enabled else f"created disabled by {actor}",
                None if enabled else datetime.now().astimezone(),
                secret,
            ),
        )
        endpoint = get_endpoint(conn, tenant_id, endpoint_id)
        _audit(conn, actor, "webhook_endpoint.create", endpoint, None, endpoint.public(), request_id)
    return endpoint, secret


_UNSET: Any = object()


def update_endpoint(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    endpoint_id: uuid.UUID | str,
    *,
    actor: str,
    allow_private: bool,
    url: str = _UNSET,
    event_types: list[str] | None = _UNSET,
    widget_ids: list[str] | None = _UNSET,
    description: str | None = _UNSET,
    enabled: bool = _UNSET,
    request_id: str | None = None,
) -> Endpoint:
    """Changes the given fields (None for a filter = no filter). Enabling clears the disabled reason and the
    failure clock; disabling records who did it. One audit row with the changed fields before and after."""
    new: dict[str, Any] = {}
    if url is not _UNSET:
        new["url"] = _url(url, allow_private)
    if event_types is not _UNSET:
        new["event_types"] = _event_types(event_types)
    if description is not _UNSET:
        new["description"] = _description(description)
    if not new and widget_ids is _UNSET and enabled is _UNSET:
        raise WebhookError("give at least one of url, event_types, widget_ids, description, enabled")
    with conn.transaction():
        old = get_endpoint(conn, tenant_id, endpoint_id, for_update=True)
        if widget_ids is not _UNSET:
            new["widget_ids"] = _widget_ids(conn, tenant_id, widget_ids)
        if enabled is not _UNSET and enabled != old.enabled:
            new["enabled"] = enabled
            new["disabled_reason"] = None if enabled else f"disabled by {actor}"
            new["disabled_at"] = None if enabled else datetime.now().astimezone()
            new["failing_since"] = None
        changed = {k: v for k, v in new.items() if getattr(old, k) != v}
        if not changed:
            return old
        sets = ", ".join(f"{column} = %s" for column in changed)  # column names are ours, not input
        conn.execute(
            f"UPDATE webhook_endpoints SET {sets}, updated_at = now() WHERE id = %s", (*changed.values(), old.id)
        )
        endpoint = get_endpoint(conn, tenant_id, old.id)
        before, after = old.public(), endpoint.public()
        _audit(
            conn,
            actor,
            "webhook_endpoint.update",
            endpoint,
            {k: before[k] for k in changed},
            {k: after[k] for k in changed},
            request_id,
        )
    return endpoint


def disable_endpoint(
    conn: psycopg.Connection, endpoint_id: uuid.UUID, reason: str, *, actor: str = SYSTEM_ACTOR
) -> bool:
    """Disables an enabled endpoint with a reason its admins see (the dispatcher: 410 Gone, failing for days);
    False when it was already disabled or is gone."""
    with conn.transaction():
        row = conn.execute(
            "SELECT tenant_id FROM webhook_endpoints WHERE id = %s AND enabled FOR UPDATE", (endpoint_id,)
        ).fetchone()
        if row is None:
            return False
        conn.execute(
            "UPDATE webhook_endpoints SET enabled = false, disabled_reason = %s, disabled_at = now(),"
            " updated_at = now() WHERE id = %s",
            (reason, endpoint_id),
        )
        endpoint = get_endpoint(conn, row[0], endpoint_id)
        _audit(
            conn,
            actor,
            "webhook_endpoint.disable",
            endpoint,
            {"enabled": True},
            {"enabled": False, "disabled_reason": reason},
            None,
        )
    return True


def delete_endpoint(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    endpoint_id: uuid.UUID | str,
    *,
    actor: str,
    request_id: str | None = None,
) -> Endpoint:
    """Deletes the endpoint with its queued deliveries and their log."""
    with conn.transaction():
        endpoint = get_endpoint(conn, tenant_id, endpoint_id, for_update=True)
        conn.execute("DELETE FROM webhook_endpoints WHERE id = %s", (endpoint.id,))
        _audit(conn, actor, "webhook_endpoint.delete", endpoint, endpoint.public(), None, request_id)
    return endpoint


def deliveries_page(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    endpoint_id: uuid.UUID | str,
    *,
    limit: int = 50,
    cursor: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    """The endpoint's deliveries, newest first, each with its attempts (attempt, at, response_status,
    latency_ms, error): {data: [...], next_cursor: str | None}. Keyset-paged on the delivery id."""
    if not 1 <= limit <= DELIVERIES_PAGE_MAX:
        raise WebhookError(f"limit must be between 1 and {DELIVERIES_PAGE_MAX}")
    if status is not None and status not in ("pending", "succeeded", "failed"):
        raise WebhookError("status must be pending, succeeded or failed")
    before: int | None = None
    if cursor is not None:
        if not cursor.isdigit():
            raise WebhookError("cursor must be a next_cursor value from a previous page")
        before = int(cursor)
    endpoint = get_endpoint(conn, tenant_id, endpoint_id)
    rows = conn.execute(
        "SELECT id, webhook_id, widget_id, event_id, status, attempts, next_attempt_at, created_at"
        " FROM webhook_deliveries WHERE endpoint_id = %s AND (%s::bigint IS NULL OR id < %s)"
        " AND (%s::text IS NULL OR status = %s) ORDER BY id DESC LIMIT %s",
        (endpoint.id, before, before, status, status, limit + 1),
    ).fetchall()
    page = rows[:limit]
    attempts: dict[int, list[dict[str, Any]]] = {r[0]: [] for r in page}
    for delivery_id, attempt, at, response_status, latency_ms, error in conn.execute(
        "SELECT delivery_id, attempt, at, response_status, latency_ms, error FROM webhook_attempts"
        " WHERE delivery_id = ANY(%s) ORDER BY delivery_id, id",
        (list(attempts),),
    ):
        attempts[delivery_id].append(
            {
                "attempt": attempt,
                "at": at.isoformat(),
                "response_status": response_status,
                "latency_ms": round(latency_ms, 1),
                "error": error,
            }
        )
    data = [
        {
            "id": str(r[0]),
            "webhook_id": r[1],
            "widget_id": str(r[2]),
            "event_id": str(r[3]),
            "status": r[4],
            "attempts": r[5],
            "next_attempt_at": r[6].isoformat() if r[4] == "pending" else None,
            "created_at": r[7].isoformat(),
            "attempt_log": attempts[r[0]],
        }
        for r in page
    ]
    return {"data": data, "next_cursor": data[-1]["id"] if len(rows) > limit else None}


def replay(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    endpoint_id: uuid.UUID | str,
    since: datetime,
    until: datetime,
    *,
    actor: str,
    request_id: str | None = None,
) -> int:
    """Queues again every stored event of the tenant with `since <= occurred_at < until` that matches the
    endpoint's filters: a delivery that succeeded or failed starts a new round (same webhook-id), a missing one
    is created, a pending one keeps its schedule. Returns how many were queued. Audited."""
    get_endpoint(conn, tenant_id, endpoint_id)  # 404 before 400: another tenant's endpoint reveals nothing
    if since.tzinfo is None or until.tzinfo is None:
        raise WebhookError("from and to need a time zone (e.g. 2026-11-30T12:00:00Z)")
    if not since < until:
        raise WebhookError("from must be before to")
    if until - since > timedelta(days=REPLAY_MAX_DAYS):
        raise WebhookError(f"a replay covers at most {REPLAY_MAX_DAYS} days; split it")
    with conn.transaction():
        endpoint = get_endpoint(conn, tenant_id, endpoint_id, for_update=True)
        queued = conn.execute(
            f"INSERT INTO webhook_deliveries (endpoint_id, widget_id, event_id, webhook_id)"
            f" SELECT ep.id, e.widget_id, e.event_id, {WEBHOOK_ID}"
            f" FROM webhook_endpoints ep JOIN visitor_events e ON e.widget_id IN"
            f"  (SELECT w.id FROM widget_configs w WHERE w.tenant_id = ep.tenant_id)"
            f"  AND e.occurred_at >= %s AND e.occurred_at < %s AND {MATCHES_FILTERS}"
            f" WHERE ep.id = %s"
            f" ON CONFLICT (endpoint_id, widget_id, event_id) DO UPDATE"
            f" SET status = 'pending', attempts = 0, next_attempt_at = now()"
            f" WHERE webhook_deliveries.status <> 'pending'",
            (since, until, endpoint.id),
        ).rowcount
        _audit(
            conn,
            actor,
            "webhook_endpoint.replay",
            endpoint,
            None,
            {"from": since.isoformat(), "to": until.isoformat(), "queued": queued},
            request_id,
        )
    return queued
