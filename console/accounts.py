"""Tenant members, personal API keys and one-time sign-in links (shared by the console and the CLI).

Secrets (API keys, sign-in tokens) are 256-bit random strings; only their SHA-256 is stored, so a database
dump reveals no usable credential. Member changes are audited in the same transaction."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import psycopg
from psycopg.rows import class_row

from site_activity.audit import JsonFields, audit

Role = Literal["owner", "admin", "member"]
ROLES: tuple[Role, ...] = ("owner", "admin", "member")
KEY_PREFIX = "sak_"  # marks a Site Activity API key (secret scanners can match it)
_DISPLAY_CHARS = 12  # how much of a key is kept for display: "sak_" + 8 random characters


class AccountError(ValueError):
    """A member/key request that cannot be carried out; the message is meant for the operator."""


@dataclass(frozen=True)
class Member(JsonFields):
    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    role: str
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role in ("owner", "admin")


@dataclass(frozen=True)
class ApiKey(JsonFields):
    id: uuid.UUID
    member_id: uuid.UUID
    email: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def sha256(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise AccountError(f"not an email address: {email!r}")
    return email


def _role(role: str) -> Role:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


_MEMBER_COLUMNS = "id, tenant_id, email, role, created_at"


def get_member(conn: psycopg.Connection, tenant_id: uuid.UUID, email: str) -> Member:
    with conn.cursor(row_factory=class_row(Member)) as cur:
        row = cur.execute(
            f"SELECT {_MEMBER_COLUMNS} FROM members WHERE tenant_id = %s AND email = %s",
            (tenant_id, normalize_email(email)),
        ).fetchone()
    if row is None:
        raise AccountError(f"no member {email} in tenant {tenant_id}")
    return row


def member_by_id(conn: psycopg.Connection, member_id: uuid.UUID) -> Member | None:
    with conn.cursor(row_factory=class_row(Member)) as cur:
        return cur.execute(f"SELECT {_MEMBER_COLUMNS} FROM members WHERE id = %s", (member_id,)).fetchone()


def list_members(conn: psycopg.Connection, tenant_id: uuid.UUID) -> list[Member]:
    with conn.cursor(row_factory=class_row(Member)) as cur:
        return cur.execute(
            f"SELECT {_MEMBER_COLUMNS} FROM members WHERE tenant_id = %s ORDER BY email", (tenant_id,)
        ).fetchall()


def add_member(conn: psycopg.Connection, tenant_id: uuid.UUID, email: str, role: str, *, actor: str) -> Member:
    email, role = normalize_email(email), _role(role)
    with conn.transaction():
        if conn.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant_id,)).fetchone() is None:
            raise AccountError(f"no tenant with id {tenant_id}")
        member_id = uuid.uuid4()
        inserted = conn.execute(
            "INSERT INTO members (id, tenant_id, email, role) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, email) DO NOTHING",
            (member_id, tenant_id, email, role),
        ).rowcount
        if not inserted:
            raise AccountError(f"{email} is already a member of tenant {tenant_id}")
        member = get_member(conn, tenant_id, email)
        audit(
            conn,
            actor=actor,
            action="member.add",
            tenant_id=tenant_id,
            entity="member",
            entity_id=email,
            old=None,
            new={"email": email, "role": role},
        )
    return member


def _lock_tenant_members(conn: psycopg.Connection, tenant_id: uuid.UUID) -> None:
    # Serialises role changes per tenant so two concurrent demotions cannot both see "another owner left".
    conn.execute("SELECT id FROM members WHERE tenant_id = %s ORDER BY id FOR UPDATE", (tenant_id,))


def _ensure_owner_left(conn: psycopg.Connection, tenant_id: uuid.UUID, leaving: uuid.UUID) -> None:
    row = conn.execute(
        "SELECT count(*) FROM members WHERE tenant_id = %s AND role = 'owner' AND id <> %s", (tenant_id, leaving)
    ).fetchone()
    if not row or row[0] == 0:
        raise AccountError("a tenant must keep at least one owner; make someone else owner first")


def set_role(conn: psycopg.Connection, tenant_id: uuid.UUID, email: str, role: str, *, actor: str) -> Member:
    role = _role(role)
    with conn.transaction():
        _lock_tenant_members(conn, tenant_id)
        old = get_member(conn, tenant_id, email)
        if old.role == role:
            return old
        if old.role == "owner":
            _ensure_owner_left(conn, tenant_id, old.id)
        conn.execute("UPDATE members SET role = %s WHERE id = %s", (role, old.id))
        audit(
            conn,
            actor=actor,
            action="member.set-role",
            tenant_id=tenant_id,
            entity="member",
            entity_id=old.email,
            old={"role": old.role},
            new={"role": role},
        )
        return get_member(conn, tenant_id, email)


def remove_member(conn: psycopg.Connection, tenant_id: uuid.UUID, email: str, *, actor: str) -> None:
    """Removes the member; their API keys and sign-in links go with them (ON DELETE CASCADE)."""
    with conn.transaction():
        _lock_tenant_members(conn, tenant_id)
        old = get_member(conn, tenant_id, email)
        if old.role == "owner":
            _ensure_owner_left(conn, tenant_id, old.id)
        conn.execute("DELETE FROM members WHERE id = %s", (old.id,))
        audit(
            conn,
            actor=actor,
            action="member.remove",
            tenant_id=tenant_id,
            entity="member",
            entity_id=old.email,
            old={"email": old.email, "role": old.role},
            new=None,
        )


# --- API keys ------------------------------------------------------------------------------------
_KEY_COLUMNS = (
    "k.id, k.member_id, m.email, k.name, k.prefix, k.created_at, k.revoked_at, k.last_used_at"
    " FROM api_keys k JOIN members m ON m.id = k.member_id"
)


def create_key(
    conn: psycopg.Connection, tenant_id: uuid.UUID, email: str, name: str, *, actor: str
) -> tuple[ApiKey, str]:
    """Creates a key for the member; returns it and the secret, which is never retrievable again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with conn.transaction():
        member = get_member(conn, tenant_id, email)
        key_id = uuid.uuid4()
        conn.execute(
            "INSERT INTO api_keys (id, member_id, tenant_id, name, prefix, secret_sha256)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (key_id, member.id, tenant_id, name, secret[:_DISPLAY_CHARS], sha256(secret)),
        )
        audit(
            conn,
            actor=actor,
            action="api-key.create",
            tenant_id=tenant_id,
            entity="api_key",
            entity_id=str(key_id),
            old=None,
            new={"member": member.email, "name": name, "prefix": secret[:_DISPLAY_CHARS]},
        )
        with conn.cursor(row_factory=class_row(ApiKey)) as cur:
            key = cur.execute(f"SELECT {_KEY_COLUMNS} WHERE k.id = %s", (key_id,)).fetchone()
    assert key is not None
    return key, secret


def list_keys(conn: psycopg.Connection, tenant_id: uuid.UUID, email: str | None = None) -> list[ApiKey]:
    with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        return cur.execute(
            f"SELECT {_KEY_COLUMNS} WHERE k.tenant_id = %s AND (%s::text IS NULL OR m.email = %s)"
            " ORDER BY k.created_at",
            (tenant_id, email and normalize_email(email), email and normalize_email(email)),
        ).fetchall()


def revoke_key(conn: psycopg.Connection, tenant_id: uuid.UUID, key_id: uuid.UUID, *, actor: str) -> None:
    with conn.transaction():
        revoked = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND tenant_id = %s AND revoked_at IS NULL",
            (key_id, tenant_id),
        ).rowcount
        if not revoked:
            raise AccountError(f"no active key {key_id} in tenant {tenant_id}")
        audit(
            conn,
            actor=actor,
            action="api-key.revoke",
            tenant_id=tenant_id,
            entity="api_key",
            entity_id=str(key_id),
            old={"revoked": False},
            new={"revoked": True},
        )


def member_for_key(conn: psycopg.Connection, secret: str) -> Member | None:
    """The member owning an active key, or None (unknown or revoked). Records last use (at most once a minute,
    so a busy key does not write on every request)."""
    row = conn.execute(
        "UPDATE api_keys SET last_used_at = now() WHERE secret_sha256 = %s AND revoked_at IS NULL"
        " AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute') RETURNING member_id",
        (sha256(secret),),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT member_id FROM api_keys WHERE secret_sha256 = %s AND revoked_at IS NULL", (sha256(secret),)
        ).fetchone()
    return member_by_id(conn, row[0]) if row else None


# --- sign-in links -------------------------------------------------------------------------------
def create_login_token(conn: psycopg.Connection, tenant_id: uuid.UUID, email: str, ttl_s: int) -> str:
    """A one-time sign-in token for the member, valid for ttl_s seconds; only its hash is stored."""
    token = secrets.token_urlsafe(32)
    with conn.transaction():
        member = get_member(conn, tenant_id, email)
        conn.execute(
            "INSERT INTO login_links (token_sha256, member_id, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))",
            (sha256(token), member.id, ttl_s),
        )
    return token


def login_link(
    conn: psycopg.Connection,
    console_origin: str,
    tenant_id: uuid.UUID,
    email: str,
    ttl_s: int,
    next_path: str | None = None,
) -> str:
    """A one-time sign-in URL for the console at console_origin; after signing in, the member lands on
    next_path (a path on the console, e.g. "/site-activity") or the default page. ValueError for a next_path
    that is not a local path."""
    from urllib.parse import quote

    url = f"{console_origin.rstrip('/')}/login?token={quote(create_login_token(conn, tenant_id, email, ttl_s))}"
    if next_path is not None:
        if not is_local_path(next_path):
            raise ValueError(f"not a path on the console: {next_path!r}")
        url += f"&next={quote(next_path, safe='/?=&')}"
    return url


def is_local_path(path: str) -> bool:
    """A redirect target on this site only: "/x…", never "//host", "/\\host", a scheme or control characters
    (an open redirect would let a phishing link pass through the console's sign-in page)."""
    return (
        path.startswith("/")
        and not path.startswith(("//", "/\\"))
        and "\\" not in path
        and all(32 < ord(c) < 127 for c in path)
    )


def consume_login_token(conn: psycopg.Connection, token: str) -> Member | None:
    """Spends the token: the member it signs in, or None when it is unknown, used or expired. Atomic, so two
    concurrent uses of one link cannot both succeed."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE login_links SET used_at = now() WHERE token_sha256 = %s AND used_at IS NULL"
            " AND expires_at > now() RETURNING member_id",
            (sha256(token),),
        ).fetchone()
    return member_by_id(conn, row[0]) if row else None
