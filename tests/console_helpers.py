"""Shared by the console test modules: a running console process and tenants with members and keys."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import psycopg

from console import accounts
from site_activity import widgets
from site_activity.settings import Settings


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "command_line", *args],
        env={**settings.to_env(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Tenant:
    id: uuid.UUID
    widget: widgets.Widget
    keys: dict[str, str] = field(default_factory=dict)  # role -> API key secret
    emails: dict[str, str] = field(default_factory=dict)  # role -> member email

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def make_tenant(dsn: str, name: str = "Acme") -> Tenant:
    """A tenant with one widget (tracking on) and an owner, an admin and a member, each with an API key."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        w = widgets.create_widget(conn, name=f"{name} site", tenant_name=name, actor="tests", tracking_enabled=True)
        t = Tenant(w.tenant_id, w)
        tag = uuid.uuid4().hex[:6]
        for role in ("owner", "admin", "member"):
            email = f"{role}-{tag}@{name.lower()}.example"
            accounts.add_member(conn, t.id, email, role, actor="tests")
            _, secret = accounts.create_key(conn, t.id, email, "tests", actor="tests")
            t.keys[role], t.emails[role] = secret, email
    return t
