"""Server-rendered pages (session cookie + CSRF-protected forms). Thin: the rules live in console.services."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from console import accounts, services
from console.deps import ConnDep, PageAuthDep, RequestIdDep, SettingsDep, SignerDep, require_admin
from console.errors import ConsoleError
from console.security import COOKIE
from console.templating import render

router = APIRouter()


@router.get("/")
def home() -> Response:
    return RedirectResponse("/settings/widgets", status_code=303)


@router.get("/login")
def login_form(request: Request, token: str = "", next: str = "") -> Response:
    # The link only shows a button: link scanners in mail clients fetch URLs, and must not spend the token.
    return render(request, "login.html", {"token": token, "next": next if accounts.is_local_path(next) else ""})


@router.post("/login")
def login(
    conn: ConnDep,
    signer: SignerDep,
    settings: SettingsDep,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "",
) -> Response:
    member = accounts.consume_login_token(conn, token) if token else None
    if member is None:
        raise ConsoleError(
            401, "This sign-in link is invalid, already used or expired. Ask for a new one.", error="sign_in_failed"
        )
    response = RedirectResponse(next if accounts.is_local_path(next) else "/settings/widgets", status_code=303)
    response.set_cookie(
        COOKIE,
        signer.new_session(member.id),
        max_age=settings.console_session_ttl_s,
        httponly=True,
        samesite="lax",
        secure=settings.console_cookie_secure,
        path="/",
    )
    return response


@router.post("/logout")
def logout(auth: PageAuthDep, csrf_token: Annotated[str, Form()] = "") -> Response:
    auth.check_csrf(csrf_token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/settings/widgets")
def widgets_page(request: Request, auth: PageAuthDep, conn: ConnDep) -> Response:
    return render(request, "widgets.html", {"auth": auth, "widgets": services.list_widgets(conn, auth.member)})


@router.get("/settings/widgets/{widget_id}/tracking")
def tracking_page(request: Request, widget_id: str, auth: PageAuthDep, conn: ConnDep) -> Response:
    widget = services.widget_for(conn, auth.member, widget_id)
    return render(request, "tracking.html", {"auth": auth, "widget": widget, "saved": "saved" in request.query_params})


@router.post("/settings/widgets/{widget_id}/tracking")
def tracking_save(
    request: Request,
    widget_id: str,
    auth: PageAuthDep,
    conn: ConnDep,
    request_id: RequestIdDep,
    csrf_token: Annotated[str, Form()] = "",
    event_retention_days: Annotated[str, Form()] = "",
    tracking_enabled: Annotated[str | None, Form()] = None,
) -> Response:
    auth.check_csrf(csrf_token)
    require_admin(auth.member)
    try:
        days = int(event_retention_days)
    except ValueError:
        raise ConsoleError(400, f"retention must be a whole number of days, got {event_retention_days!r}") from None
    services.update_widget(
        conn,
        auth.member,
        widget_id,
        tracking_enabled=tracking_enabled is not None,
        event_retention_days=days,
        request_id=request_id,
    )
    return RedirectResponse(f"/settings/widgets/{widget_id}/tracking?saved=1", status_code=303)


@router.get("/settings/audit-log")
def audit_page(request: Request, auth: PageAuthDep, conn: ConnDep, cursor: str | None = None) -> Response:
    require_admin(auth.member)
    page = services.audit_page(conn, auth.member, limit=50, cursor=cursor)
    return render(request, "audit.html", {"auth": auth, "page": page})
