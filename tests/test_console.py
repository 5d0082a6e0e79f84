"""The console's management API and its rules: who may read and change what, audited, tenant-scoped; sign-in
links, session cookie and CSRF. Runs a real `site-activity console` process against the session's Postgres."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from console import accounts
from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from site_activity.settings import Settings
from tests.conftest import Service, http_ok, iso, make_settings
from tests.console_helpers import Tenant, cli, make_tenant


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert body["error"] and body["reason"], body
    return body


# Every API endpoint, with the smallest valid request for it; {w} is replaced by a widget id.
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, bool]] = [  # method, path, json, admin only
    ("GET", "/api/v1/widgets", None, False),
    ("GET", "/api/v1/widgets/{w}", None, False),
    ("PATCH", "/api/v1/widgets/{w}", {"tracking_enabled": True}, True),
    ("GET", "/api/v1/audit-log", None, True),
    ("DELETE", "/api/v1/visitors/visitor-x?widget_id={w}", None, True),
    ("DELETE", "/api/v1/contacts/{c}", None, True),
]


def new_contact(dsn: str, tenant: Tenant) -> uuid.UUID:
    contact = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (id, tenant_id, external_id) VALUES (%s, %s, %s)",
            (contact, tenant.id, f"user-{contact.hex[:8]}"),
        )
    return contact


@pytest.mark.parametrize(("method", "path", "body", "_admin"), ENDPOINTS)
@pytest.mark.parametrize("auth", [None, "Basic abc", "Bearer", "Bearer sak_not-a-key", "revoked"])
def test_missing_invalid_or_revoked_key_is_401(
    console: httpx.Client,
    acme: Tenant,
    postgres: EmbeddedPostgres,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    _admin: bool,
    auth: str | None,
) -> None:
    headers = {}
    if auth == "revoked":
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            key, secret = accounts.create_key(conn, acme.id, acme.emails["owner"], "to revoke", actor="tests")
            accounts.revoke_key(conn, acme.id, key.id, actor="tests")
        headers["Authorization"] = f"Bearer {secret}"
    elif auth is not None:
        headers["Authorization"] = auth
    resp = console.request(
        method, path.format(w=acme.widget.id, c=new_contact(postgres.dsn, acme)), json=body, headers=headers
    )
    error_of(resp, 401)
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body", "admin_only"), ENDPOINTS)
@pytest.mark.parametrize("role", ["owner", "admin", "member"])
def test_roles(
    console: httpx.Client,
    acme: Tenant,
    postgres: EmbeddedPostgres,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    admin_only: bool,
    role: str,
) -> None:
    contact = new_contact(postgres.dsn, acme)
    resp = console.request(method, path.format(w=acme.widget.id, c=contact), json=body, headers=acme.auth(role))
    if admin_only and role == "member":
        assert "admin" in error_of(resp, 403)["reason"]
    else:
        assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("method", "path", "body", "admin_only"), [e for e in ENDPOINTS if "{w}" in e[1] or "{c}" in e[1]]
)
@pytest.mark.parametrize("role", ["owner", "admin"])
def test_other_tenants_and_unknown_objects_are_404(
    console: httpx.Client,
    acme: Tenant,
    globex: Tenant,
    postgres: EmbeddedPostgres,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    admin_only: bool,
    role: str,
) -> None:
    theirs = new_contact(postgres.dsn, globex)
    for widget_id, contact in ((globex.widget.id, theirs), (uuid.uuid4(), uuid.uuid4()), ("not-a-uuid", "nope")):
        resp = console.request(method, path.format(w=widget_id, c=contact), json=body, headers=acme.auth(role))
        error_of(resp, 404)
    with psycopg.connect(postgres.dsn) as conn:  # nothing of the other tenant was touched
        assert conn.execute("SELECT count(*) FROM customers WHERE id = %s", (theirs,)).fetchone() == (1,)
    listed = console.get("/api/v1/widgets", headers=acme.auth(role)).json()["data"]
    assert [w["id"] for w in listed] == [str(acme.widget.id)]


def test_member_sees_settings(console: httpx.Client, acme: Tenant) -> None:
    body = console.get(f"/api/v1/widgets/{acme.widget.id}", headers=acme.auth("member")).json()
    assert body["id"] == str(acme.widget.id)
    assert set(body) >= {"tracking_enabled", "event_retention_days", "name"}


def test_metrics_count_requests_by_route_template_and_show_the_pool(console: httpx.Client, acme: Tenant) -> None:
    for _ in range(3):
        assert console.get(f"/api/v1/widgets/{acme.widget.id}", headers=acme.auth("member")).status_code == 200
    unknown = f"/no/such/{uuid.uuid4()}"
    assert console.get(unknown).status_code == 404
    text = console.get("/metrics").text
    sample = 'site_activity_console_requests_total{method="GET",route="/api/v1/widgets/{widget_id}",status="200"}'
    assert any(line.startswith(sample) and float(line.split()[-1]) >= 3 for line in text.splitlines()), text
    assert 'method="GET",route="other",status="404"' in text
    assert unknown not in text  # a random URL does not become a label
    assert "site_activity_console_db_pool_connections" in text
    assert 'site_activity_console_db_pool_connections{state="max"}' in text
    assert "site_activity_console_request_seconds_bucket" in text


def test_patch_changes_and_audits_in_one_go(console: httpx.Client, postgres: EmbeddedPostgres) -> None:
    t = make_tenant(postgres.dsn, "Initech")
    request_id = f"req-{uuid.uuid4().hex}"
    resp = console.patch(
        f"/api/v1/widgets/{t.widget.id}",
        json={"tracking_enabled": False, "event_retention_days": 30},
        headers={**t.auth("admin"), "X-Request-ID": request_id},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["tracking_enabled"] is False and resp.json()["event_retention_days"] == 30
    assert resp.headers["x-request-id"] == request_id
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute(
            "SELECT actor, action, old_value, new_value, request_id, tenant_id FROM audit_log"
            " WHERE entity_id = %s AND request_id IS NOT NULL ORDER BY id",
            (str(t.widget.id),),
        ).fetchall()
    assert rows == [
        (t.emails["admin"], "disable", {"tracking_enabled": True}, {"tracking_enabled": False}, request_id, t.id),
        (
            t.emails["admin"],
            "set-retention",
            {"event_retention_days": 90},
            {"event_retention_days": 30},
            request_id,
            t.id,
        ),
    ]
    audit = console.get("/api/v1/audit-log", params={"limit": 2}, headers=t.auth("owner")).json()["data"]
    assert [(a["actor"], a["action"], a["before"], a["after"], a["request_id"]) for a in audit] == [
        (t.emails["admin"], "set-retention", {"event_retention_days": 90}, {"event_retention_days": 30}, request_id),
        (t.emails["admin"], "disable", {"tracking_enabled": True}, {"tracking_enabled": False}, request_id),
    ]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"event_retention_days": 0}, "between 1 and 365"),
        ({"event_retention_days": 366}, "between 1 and 365"),
        ({"event_retention_days": -5, "tracking_enabled": False}, "between 1 and 365"),
        ({"event_retention_days": "30"}, "event_retention_days"),
        ({"event_retention_days": 30.5}, "event_retention_days"),
        ({"tracking_enabled": "yes"}, "tracking_enabled"),
        ({"tracking_enabled": None}, "give tracking_enabled"),
        ({}, "give tracking_enabled"),
        ({"retention": 30}, "retention"),
        ([1, 2], "body"),
    ],
)
def test_bad_patch_is_400_with_reason_and_changes_nothing(
    console: httpx.Client, acme: Tenant, body: Any, reason: str
) -> None:
    before = console.get(f"/api/v1/widgets/{acme.widget.id}", headers=acme.auth("admin")).json()
    resp = console.patch(f"/api/v1/widgets/{acme.widget.id}", json=body, headers=acme.auth("admin"))
    assert reason in error_of(resp, 400)["reason"]
    assert console.get(f"/api/v1/widgets/{acme.widget.id}", headers=acme.auth("admin")).json() == before


def test_malformed_json_is_400(console: httpx.Client, acme: Tenant) -> None:
    resp = console.patch(
        f"/api/v1/widgets/{acme.widget.id}",
        content=b"{nope",
        headers={**acme.auth("admin"), "content-type": "application/json"},
    )
    error_of(resp, 400)


def test_audit_log_keyset_pages_are_complete_and_tenant_scoped(
    console: httpx.Client, postgres: EmbeddedPostgres, globex: Tenant
) -> None:
    t = make_tenant(postgres.dsn, "Umbrella")
    for days in range(10, 17):
        assert (
            console.patch(
                f"/api/v1/widgets/{t.widget.id}", json={"event_retention_days": days}, headers=t.auth("owner")
            ).status_code
            == 200
        )
    with psycopg.connect(postgres.dsn) as conn:
        expected = [
            str(r[0]) for r in conn.execute("SELECT id FROM audit_log WHERE tenant_id = %s ORDER BY id DESC", (t.id,))
        ]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = console.get("/api/v1/audit-log", params=params, headers=t.auth("admin")).json()
        seen += [row["id"] for row in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected and len(seen) >= 7 + 6  # the changes, plus create/enable and 3 members + 3 keys
    for params in ({"limit": 0}, {"limit": 1000}, {"cursor": "abc"}, {"limit": "x"}):
        error_of(console.get("/api/v1/audit-log", params=params, headers=t.auth("admin")), 400)


def test_audit_log_is_append_only(postgres: EmbeddedPostgres, acme: Tenant) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        for sql in (
            "UPDATE audit_log SET actor = 'someone else' WHERE tenant_id = %s",
            "DELETE FROM audit_log WHERE tenant_id = %s",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(sql, (acme.id,) if "%s" in sql else None)
        assert conn.execute("SELECT count(*) FROM audit_log WHERE tenant_id = %s", (acme.id,)).fetchone()[0] > 0


def test_keys_are_stored_hashed(
    console_settings: Settings, postgres: EmbeddedPostgres, acme: Tenant, console: httpx.Client
) -> None:
    made = cli(
        console_settings,
        "keys",
        "create",
        "--tenant",
        str(acme.id),
        "--email",
        acme.emails["member"],
        "--name",
        "laptop",
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("sak_") and len(secret) > 40 and "shown only now" in made.stderr
    assert (
        console.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).json()["email"]
        == acme.emails["member"]
    )
    with psycopg.connect(postgres.dsn) as conn:
        dump = "\n".join(
            str(r) for r in conn.execute("SELECT k.*, m.* FROM api_keys k JOIN members m ON m.id = k.member_id")
        )
        audit = "\n".join(str(r) for r in conn.execute("SELECT * FROM audit_log"))
        row = conn.execute(
            "SELECT prefix, secret_sha256, last_used_at FROM api_keys WHERE secret_sha256 = %s",
            (hashlib.sha256(secret.encode()).digest(),),
        ).fetchone()
    assert secret not in dump and secret[12:] not in dump and secret[12:] not in audit
    assert row is not None and row[0] == secret[:12] and row[2] is not None  # prefix for display; last use recorded
    listed = cli(console_settings, "keys", "list", "--tenant", str(acme.id), "--email", acme.emails["member"])
    assert "laptop" in listed.stdout and secret[:12] in listed.stdout and secret not in listed.stdout


def test_members_cli(console_settings: Settings, postgres: EmbeddedPostgres, console: httpx.Client) -> None:
    t = make_tenant(postgres.dsn, "Hooli")
    tid = str(t.id)
    add = cli(
        console_settings,
        "members",
        "add",
        "--tenant",
        tid,
        "--email",
        "Gavin@Hooli.example",
        "--role",
        "member",
        "--actor",
        "ops@hydra",
    )
    assert add.returncode == 0, add.stderr
    again = cli(
        console_settings,
        "members",
        "add",
        "--tenant",
        tid,
        "--email",
        "gavin@hooli.example",
        "--role",
        "admin",
        "--actor",
        "ops@hydra",
    )
    assert again.returncode == 2 and "already a member" in again.stderr
    assert (
        cli(
            console_settings,
            "members",
            "set-role",
            "--tenant",
            tid,
            "--email",
            "gavin@hooli.example",
            "--role",
            "admin",
            "--actor",
            "ops@hydra",
        ).returncode
        == 0
    )
    listed = cli(console_settings, "members", "list", "--tenant", tid).stdout
    assert re.search(r"gavin@hooli\.example\s+admin", listed)
    # The last owner cannot leave or be demoted: the tenant would be unmanageable.
    demote = cli(
        console_settings,
        "members",
        "set-role",
        "--tenant",
        tid,
        "--email",
        t.emails["owner"],
        "--role",
        "member",
        "--actor",
        "ops@hydra",
    )
    assert demote.returncode == 2 and "at least one owner" in demote.stderr
    # Removing a member revokes their keys with them.
    key = cli(console_settings, "keys", "create", "--tenant", tid, "--email", "gavin@hooli.example").stdout.strip()
    assert console.get("/api/v1/widgets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert (
        cli(
            console_settings,
            "members",
            "remove",
            "--tenant",
            tid,
            "--email",
            "gavin@hooli.example",
            "--actor",
            "ops@hydra",
        ).returncode
        == 0
    )
    assert console.get("/api/v1/widgets", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    bad_role = cli(
        console_settings, "members", "add", "--tenant", tid, "--email", "x@y.z", "--role", "god", "--actor", "ops"
    )
    assert bad_role.returncode == 2
    with psycopg.connect(postgres.dsn) as conn:
        actions = [
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_log WHERE tenant_id = %s AND actor = 'ops@hydra' ORDER BY id", (t.id,)
            )
        ]
    assert actions == ["member.add", "member.set-role", "member.remove"]


def test_keys_revoke_cli(console_settings: Settings, acme: Tenant, console: httpx.Client) -> None:
    secret = cli(
        console_settings, "keys", "create", "--tenant", str(acme.id), "--email", acme.emails["admin"]
    ).stdout.strip()
    key_id = next(
        line.split()[0]
        for line in cli(console_settings, "keys", "list", "--tenant", str(acme.id)).stdout.splitlines()
        if secret[:12] in line
    )
    assert console.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    revoked = cli(console_settings, "keys", "revoke", key_id, "--tenant", str(acme.id), "--actor", "ops")
    assert revoked.returncode == 0, revoked.stderr
    assert console.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    # Another tenant cannot revoke it (and is not told it exists).
    again = cli(console_settings, "keys", "revoke", key_id, "--tenant", str(uuid.uuid4()), "--actor", "ops")
    assert again.returncode == 2


# --- sign-in links, session cookie, CSRF -------------------------------------------------------------------
def sign_in(console: httpx.Client, settings: Settings, tenant: Tenant, role: str) -> httpx.Client:
    made = cli(settings, "login-link", "--tenant", str(tenant.id), "--email", tenant.emails[role])
    assert made.returncode == 0, made.stderr
    link = made.stdout.strip()
    assert link.startswith(settings.console_origin + "/login?token=")
    token = link.split("token=", 1)[1]
    client = httpx.Client(base_url=str(console.base_url), timeout=10)
    assert "sign-in" in client.get(f"/login?token={token}").text  # showing the link spends nothing
    resp = client.post("/login", data={"token": token})
    assert resp.status_code == 303, resp.text
    return client


def test_sign_in_link_is_single_use_and_sets_a_safe_cookie(
    console: httpx.Client, console_settings: Settings, acme: Tenant
) -> None:
    link = cli(
        console_settings, "login-link", "--tenant", str(acme.id), "--email", acme.emails["member"]
    ).stdout.strip()
    token = link.split("token=", 1)[1]
    first = httpx.post(f"{console.base_url}/login", data={"token": token})
    assert first.status_code == 303
    cookie = first.headers["set-cookie"]
    assert "sa_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert f"Max-Age={console_settings.console_session_ttl_s}" in cookie
    page = httpx.get(f"{console.base_url}/settings/widgets", cookies=first.cookies)
    assert page.status_code == 200 and acme.widget.name in page.text
    second = httpx.post(f"{console.base_url}/login", data={"token": token})
    assert second.status_code == 401 and "set-cookie" not in second.headers
    assert "already used or expired" in second.text


def test_sign_in_link_opens_the_page_it_names_and_only_pages_of_the_console(
    console: httpx.Client, console_settings: Settings, acme: Tenant
) -> None:
    link = cli(
        console_settings,
        "login-link",
        "--tenant",
        str(acme.id),
        "--email",
        acme.emails["member"],
        "--next",
        "/settings/audit-log?limit=5",
    ).stdout.strip()
    assert link.endswith("&next=/settings/audit-log?limit=5")
    shown = httpx.get(link.replace(console_settings.console_origin, str(console.base_url)))
    assert 'name="next" value="/settings/audit-log?limit=5"' in shown.text
    token = link.split("token=", 1)[1].split("&", 1)[0]
    resp = httpx.post(f"{console.base_url}/login", data={"token": token, "next": "/settings/audit-log?limit=5"})
    assert resp.status_code == 303 and resp.headers["location"] == "/settings/audit-log?limit=5"
    # Anywhere else (another site, scheme-relative, backslash tricks, header injection) lands on the default page.
    for hostile in (
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example",
        "/\\/evil.example",
        "javascript:alert(1)",
        "/ok\r\nSet-Cookie: x=1",
        "settings/widgets",
    ):
        made = cli(console_settings, "login-link", "--tenant", str(acme.id), "--email", acme.emails["member"])
        token = made.stdout.strip().split("token=", 1)[1]
        assert (
            f'value="{hostile}"'
            not in httpx.get(f"{console.base_url}/login", params={"token": token, "next": hostile}).text
        )
        resp = httpx.post(f"{console.base_url}/login", data={"token": token, "next": hostile})
        assert resp.status_code == 303 and resp.headers["location"] == "/settings/widgets", hostile
        refused = cli(
            console_settings,
            "login-link",
            "--tenant",
            str(acme.id),
            "--email",
            acme.emails["member"],
            "--next",
            hostile,
        )
        assert refused.returncode == 2 and "--next must be a path" in refused.stderr


def test_sign_in_link_expires(console: httpx.Client, postgres: EmbeddedPostgres, acme: Tenant) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        token = accounts.create_login_token(conn, acme.id, acme.emails["owner"], ttl_s=60)
        conn.execute(
            "UPDATE login_links SET expires_at = now() - interval '1 second' WHERE token_sha256 = %s",
            (accounts.sha256(token),),
        )
        stored = conn.execute("SELECT count(*) FROM login_links WHERE token_sha256 = %s", (token.encode(),)).fetchone()
    assert stored == (0,)  # only the hash is stored
    assert httpx.post(f"{console.base_url}/login", data={"token": token}).status_code == 401
    assert httpx.post(f"{console.base_url}/login", data={"token": "made-up"}).status_code == 401


def test_default_link_lifetime_is_15_minutes(
    postgres: EmbeddedPostgres, acme: Tenant, console_settings: Settings
) -> None:
    assert console_settings.console_login_link_ttl_s == 15 * 60
    cli(console_settings, "login-link", "--tenant", str(acme.id), "--email", acme.emails["admin"])
    with psycopg.connect(postgres.dsn) as conn:
        lifetime = conn.execute(
            "SELECT extract(epoch FROM expires_at - created_at) FROM login_links ORDER BY created_at DESC LIMIT 1"
        ).fetchone()[0]
    assert float(lifetime) == 900


def test_pages_need_a_valid_session(console: httpx.Client, acme: Tenant) -> None:
    for path in ("/settings/widgets", f"/settings/widgets/{acme.widget.id}/tracking", "/settings/audit-log"):
        assert console.get(path).status_code == 401
        with httpx.Client(base_url=str(console.base_url), cookies={"sa_session": "forged.value.sig"}) as forged:
            assert forged.get(path).status_code == 401


def test_csrf_token_is_required_and_bound_to_the_session(
    console: httpx.Client, console_settings: Settings, acme: Tenant, postgres: EmbeddedPostgres
) -> None:
    admin = sign_in(console, console_settings, acme, "admin")
    other = sign_in(console, console_settings, acme, "owner")
    page = other.get(f"/settings/widgets/{acme.widget.id}/tracking").text
    foreign_token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    before = admin.get(f"/api/v1/widgets/{acme.widget.id}", headers=acme.auth("admin")).json()
    url = f"/settings/widgets/{acme.widget.id}/tracking"
    for token in (None, "", "garbage", foreign_token):
        data = {"event_retention_days": "3"} | ({"csrf_token": token} if token is not None else {})
        resp = admin.post(url, data=data)
        assert resp.status_code == 403 and "security token" in resp.text, (token, resp.status_code)
    assert admin.get(f"/api/v1/widgets/{acme.widget.id}", headers=acme.auth("admin")).json() == before
    # The session cookie does not authenticate the API (so a page's cookie is no CSRF path into it).
    assert admin.get("/api/v1/widgets").status_code == 401
    admin.close()
    other.close()


def test_member_cannot_post_the_form(console: httpx.Client, console_settings: Settings, acme: Tenant) -> None:
    member = sign_in(console, console_settings, acme, "member")
    url = f"/settings/widgets/{acme.widget.id}/tracking"
    page = member.get(url).text
    assert "Only admins and owners can change" in page and 'name="csrf_token"' in page  # the sign-out form's
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    resp = member.post(url, data={"csrf_token": token, "event_retention_days": "3"})
    assert resp.status_code == 403
    assert member.get("/settings/audit-log").status_code == 403
    member.close()


def test_ingest_honours_a_console_flip_within_5_s(
    console: httpx.Client, postgres: EmbeddedPostgres, start_service: Callable[..., Service], settings: Settings
) -> None:
    t = make_tenant(postgres.dsn, "Vandelay")
    start_service("api")
    api = httpx.Client(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10)

    def post() -> None:
        at = iso(datetime.now(UTC))
        event = {
            "event_id": str(uuid.uuid4()),
            "type": "pageview",
            "url": "https://vandelay.example/",
            "occurred_at": at,
        }
        resp = api.post(
            "/api/widget/track",
            json={"widget_id": str(t.widget.id), "visitor_id": "v-1", "sent_at": at, "events": [event]},
        )
        assert resp.status_code == 204, resp.text

    def dropped() -> float:
        for line in api.get("/metrics").text.splitlines():
            if line.startswith('site_activity_api_events_total{outcome="dropped_disabled"}'):
                return float(line.split()[-1])
        return 0.0

    post()
    assert dropped() == 0
    assert (
        console.patch(
            f"/api/v1/widgets/{t.widget.id}", json={"tracking_enabled": False}, headers=t.auth("admin")
        ).status_code
        == 200
    )
    flipped = time.monotonic()
    while dropped() == 0:  # every post answers 204 either way; the counter shows when the switch took effect
        assert time.monotonic() - flipped < 5, "disabling tracking in the console took more than 5 s at ingest"
        post()
        time.sleep(0.1)
    api.close()


def test_sign_out_needs_the_form_token_and_ends_the_page_session(
    console: httpx.Client, console_settings: Settings, acme: Tenant
) -> None:
    client = sign_in(console, console_settings, acme, "member")
    page = client.get("/settings/widgets").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert client.post("/logout", data={}).status_code == 403  # a cross-site POST cannot sign anyone out
    resp = client.post("/logout", data={"csrf_token": token})
    assert resp.status_code == 303 and 'sa_session=""' in resp.headers["set-cookie"]
    assert client.get("/settings/widgets").status_code == 401
    client.close()


def test_removed_member_loses_page_access_at_once(
    console: httpx.Client, console_settings: Settings, postgres: EmbeddedPostgres
) -> None:
    t = make_tenant(postgres.dsn, "Leaver")
    client = sign_in(console, console_settings, t, "admin")
    assert client.get("/settings/widgets").status_code == 200
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        accounts.remove_member(conn, t.id, t.emails["admin"], actor="tests")
    assert client.get("/settings/widgets").status_code == 401  # the cookie is still signed, the member gone
    client.close()


# --- signing key --------------------------------------------------------------------------------------
def _secret_in(data_dir: str, _: int) -> str:
    from console.security import load_secret

    return load_secret(Settings(data_dir=Path(data_dir)))


def test_console_processes_starting_together_share_one_nonempty_key(tmp_path) -> None:
    """Several consoles on one data dir create the key at once: every one reads the same, whole key (a reader
    racing the writer must never get an empty file and sign with an empty key)."""
    import functools
    from concurrent.futures import ProcessPoolExecutor

    for attempt in range(5):
        data_dir = str(tmp_path / f"d{attempt}")
        with ProcessPoolExecutor(4) as pool:
            keys = set(pool.map(functools.partial(_secret_in, data_dir), range(8)))
        assert len(keys) == 1 and len(keys.pop()) >= 48


@pytest.mark.parametrize("key", ["   ", "REPLACE_ME_WITH_A_LONG_RANDOM_STRING", "change-me-to-a-long-random-string"])
def test_console_refuses_an_empty_or_placeholder_key(tmp_path, key: str) -> None:
    from console.security import SecretError, load_secret

    with pytest.raises(SecretError):
        load_secret(Settings(data_dir=tmp_path, console_secret_key=key))
    (tmp_path / "console-secret").write_text("")
    with pytest.raises(SecretError):
        load_secret(Settings(data_dir=tmp_path))


def test_console_without_its_database_answers_503_with_retry_after(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """Postgres unreachable: /healthz still answers (the process is alive), and a request that needs the database
    gets a 503 a client may retry, not a 500 or a hang."""
    s = make_settings(
        kafka,
        postgres,
        tmp_path / "data",
        postgres_dsn=f"postgresql://127.0.0.1:{free_port()}/nowhere?connect_timeout=1",
    )
    svc = Service("console", s, tmp_path / "logs")
    svc.ready = http_ok(s.health_url("console"))
    svc.start()
    try:
        resp = httpx.get(
            f"http://127.0.0.1:{s.console_port}/api/v1/me", headers={"Authorization": "Bearer sak_made_up"}, timeout=30
        )
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "5" and resp.json()["error"] == "unavailable"
    finally:
        svc.stop()
