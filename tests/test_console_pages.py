"""The Settings → Widgets → [widget] → Tracking page in real Chromium: a member sees it read-only, an admin
changes it (the change lands and is audited with the admin as actor)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from site_activity.settings import Settings
from tests.conftest import Service, http_ok, make_settings
from tests.console_helpers import Tenant, cli, make_tenant

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def console_settings(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    s = make_settings(kafka, postgres, tmp_path_factory.mktemp("console-pages") / "data", console_port=free_port())
    svc = Service("console", s, tmp_path_factory.mktemp("console-pages-logs"))
    svc.ready = http_ok(s.health_url("console"))
    svc.start()
    yield s
    svc.stop()


@pytest.fixture
def tenant(postgres: EmbeddedPostgres) -> Tenant:
    return make_tenant(postgres.dsn, "Pages")


def signed_in_page(browser: Browser, settings: Settings, tenant: Tenant, role: str) -> Page:
    link = cli(settings, "login-link", "--tenant", str(tenant.id), "--email", tenant.emails[role]).stdout.strip()
    page = browser.new_context().new_page()
    page.goto(link)
    page.click("#sign-in")
    expect(page.locator("#whoami")).to_contain_text(tenant.emails[role])
    page.click(f"text={tenant.widget.name}")
    expect(page.locator("nav.crumbs")).to_contain_text(f"Settings → Widgets → {tenant.widget.name} → Tracking")
    return page


def test_member_sees_tracking_read_only(browser: Browser, console_settings: Settings, tenant: Tenant) -> None:
    page = signed_in_page(browser, console_settings, tenant, "member")
    expect(page.locator("#tracking_enabled")).to_have_text("Enabled")
    expect(page.locator("#event_retention_days")).to_have_text("90 days")
    expect(page.locator("#read-only")).to_contain_text("Only admins and owners can change")
    assert page.locator("input#event_retention_days, input#tracking_enabled, #save").count() == 0
    page.context.close()


def test_admin_changes_tracking_and_it_is_audited(
    browser: Browser, console_settings: Settings, tenant: Tenant, postgres: EmbeddedPostgres
) -> None:
    page = signed_in_page(browser, console_settings, tenant, "admin")
    page.uncheck("#tracking_enabled")
    page.fill("#event_retention_days", "30")
    page.click("#save")
    expect(page.locator("#saved")).to_be_visible()
    expect(page.locator("#event_retention_days")).to_have_value("30")
    assert not page.is_checked("#tracking_enabled")
    with psycopg.connect(postgres.dsn) as conn:
        stored = conn.execute(
            "SELECT tracking_enabled, event_retention_days FROM widget_configs WHERE id = %s", (tenant.widget.id,)
        ).fetchone()
        audit = conn.execute(
            "SELECT actor, action, old_value, new_value, request_id FROM audit_log"
            " WHERE entity_id = %s AND actor = %s ORDER BY id",
            (str(tenant.widget.id), tenant.emails["admin"]),
        ).fetchall()
    assert stored == (False, 30)
    assert [a[:4] for a in audit] == [
        (tenant.emails["admin"], "disable", {"tracking_enabled": True}, {"tracking_enabled": False}),
        (tenant.emails["admin"], "set-retention", {"event_retention_days": 90}, {"event_retention_days": 30}),
    ]
    assert audit[0][4] and audit[0][4] == audit[1][4]  # one request id for the one form post
    # A value the browser would accept but the product refuses comes back as a page with the reason.
    page.goto(page.url.split("?")[0])
    page.evaluate("document.querySelector('#event_retention_days').removeAttribute('max')")
    page.fill("#event_retention_days", "400")
    page.click("#save")
    expect(page.locator("#message")).to_contain_text("between 1 and 365")
    # The audit page shows the change.
    page.goto(f"{console_settings.console_origin}/settings/audit-log")
    expect(page.locator("#audit")).to_contain_text("set-retention")
    expect(page.locator("#audit")).to_contain_text(tenant.emails["admin"])
    page.context.close()
