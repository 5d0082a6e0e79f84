"""The activity pages in real Chromium: the visitor browser (with search), visitor and contact timelines show
what the read API returns; the inbox rail panel (signed URL, framed by an allowed origin) shows only its
contact's pageviews and custom events, newest first. Each page is saved to docs/screenshots/ for the README."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from dev_stack.embedded import EmbeddedPostgres
from site_activity.settings import Settings
from tests.console_helpers import Tenant, cli, make_tenant
from tests.test_console_pages import console_settings  # noqa: F401 - module fixture reused
from tests.test_read_api import contact_id, insert, visitor_rows

pytestmark = pytest.mark.browser
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def tenant(postgres: EmbeddedPostgres) -> dict[str, Any]:
    t = make_tenant(postgres.dsn, "Pages")
    rng = random.Random(5)
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        ada = contact_id(conn, t.id, "u-ada", "ada@pages.example", "Ada Lovelace")
        bob = contact_id(conn, t.id, "u-bob", "bob@pages.example", "Bob Babbage")
        rows = []
        for i in range(8):
            c = ("u-ada", ada) if i in (0, 1) else ("u-bob", bob) if i == 2 else None
            rows += visitor_rows(t.widget, f"visitor-{i}", rng, 6, c)
        insert(conn, rows)
    return {"t": t, "ada": ada, "bob": bob}


def api(settings: Settings, t: Tenant, path: str, **params: Any) -> dict[str, Any]:
    resp = httpx.get(f"{settings.console_origin}{path}", params=params, headers=t.auth("member"), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def signed_in(browser: Browser, settings: Settings, t: Tenant) -> Page:
    link = cli(settings, "login-link", "--tenant", str(t.id), "--email", t.emails["member"]).stdout.strip()
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(link)
    page.click("#sign-in")
    expect(page.locator("#whoami")).to_contain_text(t.emails["member"])
    return page


def shown_events(page: Page) -> list[str]:
    return page.locator("#timeline tr.event").evaluate_all("rows => rows.map(r => r.dataset.eventId)")


def api_events(timeline: dict[str, Any]) -> list[str]:
    return [e["event_id"] for s in timeline["sessions"] for e in s["events"]]


def test_visitor_browser_and_timelines_show_the_api_data(
    browser: Browser, console_settings: Settings, tenant: dict[str, Any]
) -> None:
    t: Tenant = tenant["t"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = signed_in(browser, console_settings, t)
    page.click("header >> text=Visitors")
    expect(page.locator("nav.crumbs")).to_contain_text("Site Activity → Visitors")
    visitors = api(console_settings, t, "/api/v1/visitors", widget_id=str(t.widget.id))["results"]
    rows = page.locator("#visitors tr.visitor")
    expect(rows).to_have_count(len(visitors))
    for i, v in enumerate(visitors):
        row = rows.nth(i)
        expect(row.locator("td").nth(0)).to_have_text(v["visitor_id"])
        expect(row.locator(".pageviews")).to_have_text(str(v["pageviews"]))
        expect(row.locator(".sessions")).to_have_text(str(v["sessions"]))
        expect(row.locator(".custom-events")).to_have_text(str(v["custom_events"]))
        expect(row.locator(".contact")).to_contain_text(v["contact"]["name"] if v["contact"] else "")
    page.screenshot(path=str(SHOTS / "visitors.png"), full_page=True)
    # Search by the contact's email.
    page.fill("#q", "ADA@pages")
    page.click("#search-button")
    expect(rows).to_have_count(2)
    found = api(console_settings, t, "/api/v1/visitors", widget_id=str(t.widget.id), q="ADA@pages")["results"]
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.visitorId)")) == sorted(v["visitor_id"] for v in found)
    # A visitor → its timeline.
    page.locator("#visitors tr.visitor").first.locator("a.visitor-link").click()
    vid = found[0]["visitor_id"]
    expect(page.locator("#title")).to_have_text(f"Visitor {vid}")
    timeline = api(console_settings, t, f"/api/v1/visitors/{vid}/timeline", widget_id=str(t.widget.id))
    assert shown_events(page) == api_events(timeline)
    page.screenshot(path=str(SHOTS / "visitor-timeline.png"), full_page=True)
    # Back to the list → the contact → its timeline (both of Ada's browsers).
    page.go_back()
    page.locator("#visitors tr.visitor").first.locator("a.contact-link").click()
    expect(page.locator("#title")).to_have_text("Contact Ada Lovelace")
    timeline = api(console_settings, t, f"/api/v1/contacts/{tenant['ada']}/timeline")
    assert shown_events(page) == api_events(timeline)
    assert {s["visitor_id"] for s in timeline["sessions"]} == {"visitor-0", "visitor-1"}
    page.screenshot(path=str(SHOTS / "contact-timeline.png"), full_page=True)
    page.context.close()


def test_rail_panel_shows_only_its_contacts_activity(
    browser: Browser, console_settings: Settings, tenant: dict[str, Any], postgres: EmbeddedPostgres
) -> None:
    t: Tenant = tenant["t"]
    resp = httpx.post(
        f"{console_settings.console_origin}/api/v1/rail-tokens",
        json={"contact_id": str(tenant["ada"])},
        headers=t.auth("member"),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    url = resp.json()["url"]
    with psycopg.connect(postgres.dsn) as conn:
        expected = [
            str(r[0])
            for r in conn.execute(
                "SELECT event_id FROM visitor_events WHERE customer_id = %s AND event_type IN ('pageview', 'custom')"
                " ORDER BY occurred_at DESC, widget_id DESC, event_id DESC LIMIT 50",
                (tenant["ada"],),
            )
        ]
    assert expected
    context = browser.new_context(viewport={"width": 320, "height": 640})
    page = context.new_page()
    # Framed by an allowed origin (the default frame-ancestors is 'self': a console page frames it).
    page.goto(f"{console_settings.console_origin}/healthz")
    page.set_content(f'<iframe id="rail" src="{url}" width="300" height="600"></iframe>')
    frame = page.frame_locator("#rail")
    expect(frame.locator("#who")).to_contain_text("Ada Lovelace")
    direct = context.new_page()
    direct.goto(url)
    shown = direct.locator("#activity li.event").evaluate_all("rows => rows.map(r => r.dataset.eventId)")
    assert shown == expected
    direct.screenshot(path=str(SHOTS / "inbox-rail.png"), full_page=True)
    headers = httpx.get(url, timeout=30).headers
    assert "frame-ancestors 'self'" in headers["content-security-policy"] and "x-frame-options" not in headers
    # A tampered token is refused.
    bad = httpx.get(url[:-3] + "abc", timeout=30)
    assert bad.status_code == 401
    context.close()
