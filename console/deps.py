"""Request dependencies as Annotated aliases: the database connection, the request id, and who is asking
(a Bearer API key for /api/v1, the session cookie for pages)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import psycopg
from fastapi import Depends, Request

from console import accounts
from console.accounts import Member
from console.errors import ConsoleError
from console.security import COOKIE, Session, Signer
from site_activity.erasure import Notify
from site_activity.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_signer(request: Request) -> Signer:
    return request.app.state.signer  # type: ignore[no-any-return]


def get_conn(request: Request) -> Iterator[psycopg.Connection]:
    """A pooled connection for one request (console.app.make_pool): autocommit, so every write runs inside an
    explicit transaction block (widgets.py, accounts.py); the pool rolls back anything left open."""
    with request.app.state.pool.connection() as conn:
        yield conn


def get_notify(request: Request) -> Notify:
    return request.app.state.notify  # type: ignore[no-any-return]


def get_request_id(request: Request) -> str:
    return request.state.request_id  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
SignerDep = Annotated[Signer, Depends(get_signer)]
ConnDep = Annotated[psycopg.Connection, Depends(get_conn)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
NotifyDep = Annotated[Notify, Depends(get_notify)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def api_member(request: Request, conn: ConnDep) -> Member:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if not header:
        raise ConsoleError(401, "missing Authorization: Bearer <API key>", headers=_UNAUTHORIZED)
    if scheme.lower() != "bearer" or not secret.strip():
        raise ConsoleError(401, "Authorization must be 'Bearer <API key>'", headers=_UNAUTHORIZED)
    member = accounts.member_for_key(conn, secret.strip())
    if member is None:
        raise ConsoleError(401, "invalid or revoked API key", headers=_UNAUTHORIZED)
    return member


def require_admin(member: Member) -> Member:
    if not member.is_admin:
        raise ConsoleError(403, f"this action needs the admin or owner role; {member.email} is a {member.role}")
    return member


def api_admin(member: Annotated[Member, Depends(api_member)]) -> Member:
    return require_admin(member)


ApiMember = Annotated[Member, Depends(api_member)]
ApiAdmin = Annotated[Member, Depends(api_admin)]


class PageAuth:
    """The signed-in member of a page request, with the session its CSRF tokens are bound to."""

    def __init__(self, member: Member, session: Session, signer: Signer) -> None:
        self.member = member
        self.session = session
        self._signer = signer

    @property
    def csrf_token(self) -> str:
        return self._signer.csrf_token(self.session)

    def check_csrf(self, token: str | None) -> None:
        if not self._signer.csrf_ok(self.session, token):
            raise ConsoleError(
                403, "the form's security token is missing or stale; reload the page and try again", error="csrf_failed"
            )


def page_auth(request: Request, conn: ConnDep, signer: SignerDep) -> PageAuth:
    session = signer.session(request.cookies.get(COOKIE))
    member = accounts.member_by_id(conn, session.member_id) if session else None
    if session is None or member is None:
        raise ConsoleError(
            401,
            "You are not signed in (or your session expired). Ask an owner for a sign-in link: "
            "site-activity login-link --tenant <tenant id> --email <your email>",
            error="not_signed_in",
        )
    return PageAuth(member, session, signer)


PageAuthDep = Annotated[PageAuth, Depends(page_auth)]
