"""Activity pages (issue 12): the visitor browser, visitor and contact timelines (signed-in members, cookie),
and the inbox rail panel (a signed short-lived URL, meant for an iframe). Same queries as the read API."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from console import reads, services
from console.deps import ConnDep, PageAuthDep, SettingsDep
from console.errors import ConsoleError, not_found
from console.routes.read_api import contact_uuid, cursors, paged, position, rail_tokens, widget_uuid
from console.templating import render

router = APIRouter(prefix="/site-activity", include_in_schema=False)


@router.get("/visitors")
def visitors_page(
    request: Request,
    auth: PageAuthDep,
    conn: ConnDep,
    widget_id: str | None = None,
    q: str | None = None,
    cursor: str | None = None,
) -> Response:
    widgets = services.list_widgets(conn, auth.member)
    if widget_id is None and widgets:
        widget_id = str(widgets[0].id)
    wid = widget_uuid(conn, auth.member, widget_id)
    after = position(request, "visitors", cursor)
    rows, nxt = (
        paged(lambda: reads.list_visitors(conn, auth.member.tenant_id, widget_id=wid, q=q or None, after=after))
        if wid
        else ([], None)
    )
    return render(
        request,
        "activity_visitors.html",
        {
            "auth": auth,
            "widgets": widgets,
            "widget_id": widget_id,
            "q": q or "",
            "visitors": rows,
            "next": cursors(request).dump("visitors", nxt),
        },
    )


@router.get("/visitors/{visitor_id:path}/timeline")
def visitor_timeline_page(
    request: Request,
    visitor_id: str,
    auth: PageAuthDep,
    conn: ConnDep,
    widget_id: str | None = None,
    cursor: str | None = None,
) -> Response:
    wid = widget_uuid(conn, auth.member, widget_id)
    before = position(request, "timeline", cursor)
    result = paged(
        lambda: reads.visitor_timeline(conn, auth.member.tenant_id, visitor_id, widget_id=wid, before=before)
    )
    if result is None:
        raise not_found(f"no visitor {visitor_id}")
    return render(
        request,
        "activity_timeline.html",
        {
            "auth": auth,
            "title": f"Visitor {visitor_id}",
            "kind": "visitor",
            "timeline": result,
            "widget_id": widget_id,
            "next": cursors(request).dump("timeline", result["next"]),
        },
    )


@router.get("/contacts/{customer_id}")
def contact_timeline_page(
    request: Request, customer_id: str, auth: PageAuthDep, conn: ConnDep, cursor: str | None = None
) -> Response:
    cid = contact_uuid(conn, auth.member, customer_id)
    before = position(request, "timeline", cursor)
    result = paged(lambda: reads.contact_timeline(conn, auth.member.tenant_id, cid, before=before))
    if result is None:
        raise not_found(f"no contact {customer_id}")
    who = result["contact"]
    return render(
        request,
        "activity_timeline.html",
        {
            "auth": auth,
            "title": f"Contact {who['name'] or who['email'] or who['user_id']}",
            "kind": "contact",
            "timeline": result,
            "widget_id": None,
            "next": cursors(request).dump("timeline", result["next"]),
        },
    )


@router.get("/rail")
def rail_panel(request: Request, conn: ConnDep, settings: SettingsDep, token: str | None = None) -> Response:
    """The inbox right-rail panel. Auth is the signed token in the URL (issued by POST /api/v1/rail-tokens), not
    the member cookie: an inbox on another site frames it, and the SameSite=Lax cookie is not sent in a
    cross-site iframe. The token names the tenant and the one subject it may show."""
    if not token:
        raise ConsoleError(401, "this panel needs a signed link (POST /api/v1/rail-tokens)", error="rail_token_invalid")
    subject = rail_tokens(request).subject(token)
    try:
        tenant = uuid.UUID(subject["t"])
        if "c" in subject:
            customer = uuid.UUID(subject["c"])
            who: dict[str, Any] | None = reads.contact(conn, tenant, customer)
            if who is None:
                raise not_found("this contact no longer exists")
            events = reads.recent_activity(conn, tenant, customer_id=customer)
        else:
            who = {"visitor_id": subject["v"]}
            events = reads.recent_activity(conn, tenant, widget_id=uuid.UUID(subject["w"]), visitor_id=subject["v"])
    except (KeyError, ValueError):
        raise ConsoleError(401, "this panel link is invalid", error="rail_token_invalid") from None
    response = render(
        request,
        "activity_rail.html",
        {"who": who, "events": events},
        headers={
            # Framable only by the configured inbox origins; the token in the URL never leaks through a Referer.
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
            f"frame-ancestors {settings.console_rail_frame_ancestors}; form-action 'none'",
            "Referrer-Policy": "no-referrer",
        },
    )
    del response.headers["x-frame-options"]  # superseded by frame-ancestors (X-Frame-Options cannot list origins)
    return response
