"""Read API under /api/v1 (Bearer key, tenant-scoped): events, visitors, visitor and contact timelines, and
signed URLs for the inbox rail panel. Thin: queries in console.reads, cursors in console.cursors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict

from console import reads, services
from console.accounts import Member
from console.cursors import Cursors, RailTokens
from console.deps import ApiMember, ConnDep, SettingsDep
from console.errors import ConsoleError, not_found

router = APIRouter(prefix="/api/v1", tags=["site activity reads"])


# --- response models (the OpenAPI document lists these) ------------------------------------------------------


class Event(BaseModel):
    event_id: str
    widget_id: str
    visitor_id: str
    type: Literal["pageview", "session_start", "custom", "identify"]
    name: str | None
    url: str | None
    referrer: str | None
    properties: Any
    user_id: str | None
    customer_id: str | None
    session_id: str | None
    occurred_at: str
    received_at: str


class EventPage(BaseModel):
    results: list[Event]
    next: str | None


class ContactRef(BaseModel):
    customer_id: str
    email: str | None
    name: str | None


class Visitor(BaseModel):
    visitor_id: str
    widget_id: str
    first_seen: str
    last_seen: str
    events: int
    pageviews: int
    sessions: int
    custom_events: int
    user_id: str | None
    contact: ContactRef | None


class VisitorPage(BaseModel):
    results: list[Visitor]
    next: str | None


class Session(BaseModel):
    session_id: str | None
    widget_id: str
    visitor_id: str
    started_at: str
    ended_at: str
    events: list[Event]


class VisitorTimeline(BaseModel):
    visitor_id: str
    widget_id: str | None
    sessions: list[Session]
    next: str | None


class Contact(BaseModel):
    customer_id: str
    user_id: str
    email: str | None
    name: str | None


class VisitorRef(BaseModel):
    widget_id: str
    visitor_id: str


class ContactTimeline(BaseModel):
    contact: Contact
    visitors: list[VisitorRef]
    sessions: list[Session]
    next: str | None


class RailTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contact_id: str | None = None
    widget_id: str | None = None
    visitor_id: str | None = None


class RailToken(BaseModel):
    url: str
    expires_in: int


# --- helpers shared with the pages ---------------------------------------------------------------------------


def cursors(request: Request) -> Cursors:
    return request.app.state.read_cursors  # type: ignore[no-any-return]


def rail_tokens(request: Request) -> RailTokens:
    return request.app.state.rail_tokens  # type: ignore[no-any-return]


def utc(value: datetime | None) -> datetime | None:
    """A time without an offset is taken as UTC (never as the server's zone)."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def widget_uuid(conn: Any, member: Member, widget_id: str | None) -> uuid.UUID | None:
    return None if widget_id is None else services.widget_for(conn, member, widget_id).id


def contact_uuid(conn: Any, member: Member, customer_id: str) -> uuid.UUID:
    cid = services.parse_uuid(customer_id, "contact")
    if reads.contact(conn, member.tenant_id, cid) is None:
        raise not_found(f"no contact {customer_id}")
    return cid


def position(request: Request, kind: str, cursor: str | None) -> list[Any] | None:
    return cursors(request).load(kind, cursor)


def paged(call: Any) -> Any:
    try:
        return call()
    except reads.PositionError:
        raise ConsoleError(400, "cursor is not a 'next' value returned by this endpoint", error="bad_cursor") from None


# --- routes ----------------------------------------------------------------------------------------------------


@router.get("/events", response_model=EventPage)
def list_events(
    request: Request,
    member: ApiMember,
    conn: ConnDep,
    widget_id: str | None = None,
    type: Annotated[Literal["pageview", "session_start", "custom", "identify"] | None, Query()] = None,
    name: str | None = None,
    visitor_id: str | None = None,
    customer_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=reads.EVENTS_MAX_LIMIT)] = reads.EVENTS_DEFAULT_LIMIT,
    cursor: str | None = None,
    order: Literal["occurred", "received"] = "occurred",
) -> dict[str, Any]:
    """Newest first by occurred_at (order=occurred), or in commit order, oldest first (order=received: for
    incremental sync; `next` is never null there — poll it)."""
    kind = f"events-{order}"
    after = position(request, kind, cursor)
    f = reads.EventFilter(
        widget_id=widget_uuid(conn, member, widget_id),
        event_type=type,
        name=name,
        visitor_id=visitor_id,
        customer_id=contact_uuid(conn, member, customer_id) if customer_id is not None else None,
        since=utc(since),
        until=utc(until),
    )
    rows, nxt = paged(lambda: reads.list_events(conn, member.tenant_id, f, order=order, limit=limit, after=after))
    if order == "received" and nxt is None:
        nxt = [0, str(uuid.UUID(int=0)), str(uuid.UUID(int=0))]  # the start: nothing was committed yet
    return {"results": rows, "next": cursors(request).dump(kind, nxt)}


@router.get("/visitors", response_model=VisitorPage)
def list_visitors(
    request: Request,
    member: ApiMember,
    conn: ConnDep,
    widget_id: str | None = None,
    q: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=reads.VISITORS_MAX_LIMIT)] = reads.VISITORS_DEFAULT_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Visitors most recently seen first; `q` matches visitor id, user id, contact email or name."""
    after = position(request, "visitors", cursor)
    wid = widget_uuid(conn, member, widget_id)
    rows, nxt = paged(
        lambda: reads.list_visitors(
            conn, member.tenant_id, widget_id=wid, q=q, since=utc(since), limit=limit, after=after
        )
    )
    return {"results": rows, "next": cursors(request).dump("visitors", nxt)}


# {visitor_id:path}: visitor ids may contain "/" (any 1-128 character id is ingested).
@router.get("/visitors/{visitor_id:path}/timeline", response_model=VisitorTimeline)
def visitor_timeline(
    request: Request,
    visitor_id: str,
    member: ApiMember,
    conn: ConnDep,
    widget_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=reads.TIMELINE_MAX_LIMIT)] = reads.TIMELINE_DEFAULT_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    """The visitor's newest events (older pages through `next`), in time order, grouped by session."""
    before = position(request, "timeline", cursor)
    wid = widget_uuid(conn, member, widget_id)
    result = paged(
        lambda: reads.visitor_timeline(conn, member.tenant_id, visitor_id, widget_id=wid, limit=limit, before=before)
    )
    if result is None:
        raise not_found(f"no visitor {visitor_id}")
    return {**result, "next": cursors(request).dump("timeline", result["next"])}


@router.get("/contacts/{customer_id}/timeline", response_model=ContactTimeline)
def contact_timeline(
    request: Request,
    customer_id: str,
    member: ApiMember,
    conn: ConnDep,
    limit: Annotated[int, Query(ge=1, le=reads.TIMELINE_MAX_LIMIT)] = reads.TIMELINE_DEFAULT_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Every visitor linked to the contact, anonymous history before the identify included."""
    before = position(request, "timeline", cursor)
    cid = contact_uuid(conn, member, customer_id)
    result = paged(lambda: reads.contact_timeline(conn, member.tenant_id, cid, limit=limit, before=before))
    if result is None:
        raise not_found(f"no contact {customer_id}")
    return {**result, "next": cursors(request).dump("timeline", result["next"])}


@router.post("/rail-tokens", response_model=RailToken)
def issue_rail_token(
    request: Request, body: RailTokenRequest, member: ApiMember, conn: ConnDep, settings: SettingsDep
) -> dict[str, Any]:
    """A signed, short-lived URL of the inbox rail panel for one contact (or one visitor on a widget), to put in
    an iframe. Give contact_id, or widget_id + visitor_id."""
    if body.contact_id is not None and body.widget_id is None and body.visitor_id is None:
        subject = {"t": str(member.tenant_id), "c": str(contact_uuid(conn, member, body.contact_id))}
    elif body.contact_id is None and body.widget_id is not None and body.visitor_id is not None:
        wid = services.widget_for(conn, member, body.widget_id).id
        subject = {"t": str(member.tenant_id), "w": str(wid), "v": body.visitor_id}
    else:
        raise ConsoleError(400, "give contact_id, or widget_id and visitor_id")
    token = rail_tokens(request).issue(subject)
    return {
        "url": f"{settings.console_origin}/site-activity/rail?token={token}",
        "expires_in": rail_tokens(request).ttl_s,
    }
