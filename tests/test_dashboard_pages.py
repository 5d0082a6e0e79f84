"""Marketing → Site Activity in real Chromium: the page shows the same numbers as /api/v1/stats, the uPlot chart
renders the API's series, "visitors now" refreshes by itself, and the range picker works. Saves the README's
screenshot (docs/screenshots/dashboard.png)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
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

pytestmark = pytest.mark.browser
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshots" / "dashboard.png"
PAGES = [
    "https://shop.example/",
    "https://shop.example/pricing?plan=pro",
    "https://shop.example/docs/install",
    "https://shop.example/blog/launch",
    "https://shop.example/pricing",
    "https://shop.example/about",
]
NAMES = ["signup", "download", "play video", "add to cart"]


def seed(dsn: str, t: Tenant) -> None:
    """A week of traffic (more on recent days), inserted as the sink does (the rollup triggers count it)."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    rows: list[tuple[str, str, str | None, str, datetime]] = []
    for v in range(60):
        visitor = f"v-{v}"
        for _ in range(rng.randint(1, 4)):
            start = now - timedelta(minutes=rng.randint(10, 7 * 24 * 60 - 60) * rng.random() ** 0.5)
            rows.append((visitor, "session_start", None, rng.choice(PAGES), start))
            for i in range(rng.randint(1, 8)):
                kind = "pageview" if rng.random() < 0.75 else "custom"
                rows.append(
                    (
                        visitor,
                        kind,
                        rng.choice(NAMES) if kind == "custom" else None,
                        rng.choice(PAGES),
                        start + timedelta(seconds=30 * i),
                    )
                )
    for v in range(3):  # on the site right now
        rows.append((f"now-{v}", "pageview", None, PAGES[v], now - timedelta(seconds=40)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, name, url, occurred_at,"
            " received_at) SELECT %s, gen_random_uuid(), %s, v, k, n, u, o, now()"
            " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[]) AS b (v, k, n, u, o)",
            (t.widget.id, t.id, *map(list, zip(*rows, strict=False))),
        )


@pytest.fixture(scope="module")
def tenant(postgres: EmbeddedPostgres) -> Tenant:
    t = make_tenant(postgres.dsn, "Dashboard")
    seed(postgres.dsn, t)
    return t


def api(settings: Settings, t: Tenant, path: str, **params: Any) -> dict[str, Any]:
    resp = httpx.get(
        f"http://127.0.0.1:{settings.console_port}/api/v1/stats/{path}",
        params={"widget_id": str(t.widget.id), **params},
        headers=t.auth("member"),
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def signed_in(browser: Browser, settings: Settings, t: Tenant) -> Page:
    link = cli(settings, "login-link", "--tenant", str(t.id), "--email", t.emails["member"]).stdout.strip()
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(link)
    page.click("#sign-in")
    expect(page.locator("#whoami")).to_contain_text(t.emails["member"])
    page.click("#nav-site-activity")
    expect(page.locator("nav.crumbs")).to_contain_text("Marketing → Site Activity")
    return page


def table(page: Page, selector: str) -> list[tuple[str, int]]:
    rows = page.locator(f"{selector} tr").all()[1:]
    return [(r.locator("td").nth(0).inner_text(), int(r.locator("td").nth(1).inner_text())) for r in rows]


def test_dashboard_shows_the_api_numbers_and_a_chart(
    browser: Browser, console_settings: Settings, tenant: Tenant
) -> None:
    page = signed_in(browser, console_settings, tenant)
    expect(page.locator("#widget")).to_have_value(str(tenant.widget.id))
    expect(page.locator("#range")).to_have_value("7d")
    today = datetime.now(UTC).date()
    window = {"from": (today - timedelta(days=6)).isoformat(), "to": (today + timedelta(days=1)).isoformat()}
    series = api(console_settings, tenant, "timeseries", interval="day", **window)
    assert series["totals"]["pageviews"] > 100
    for metric in ("pageviews", "visitors", "sessions"):
        expect(page.locator(f"#total-{metric}")).to_have_text(str(series["totals"][metric]))
    pages = api(console_settings, tenant, "top-pages", limit=10, **window)["results"]
    assert table(page, "#top-pages") == [(p["page"], p["pageviews"]) for p in pages]
    events = api(console_settings, tenant, "top-events", limit=10, **window)["results"]
    assert table(page, "#top-events") == [(e["name"], e["events"]) for e in events]
    # The chart is uPlot's, drawn from the same series.
    expect(page.locator("#chart .uplot canvas")).to_be_visible()
    drawn = page.evaluate("() => window.siteActivityChart.data.map(s => Array.from(s))")
    assert drawn[1] == [b["pageviews"] for b in series["results"]]
    assert drawn[2] == [b["visitors"] for b in series["results"]]
    assert drawn[0] == [
        int(datetime.fromisoformat(b["time"].replace("Z", "+00:00")).timestamp()) for b in series["results"]
    ]
    expect(page.locator("#visitor-browser")).to_have_attribute(
        "href", f"/site-activity/visitors?widget_id={tenant.widget.id}"
    )
    # Visitors now: what the API says, and it refreshes by itself when someone new arrives.
    now_before = api(console_settings, tenant, "realtime")["visitors"]
    expect(page.locator("#visitors-now")).to_have_text(str(now_before))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    with psycopg.connect(console_settings.postgres_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, url,"
            " occurred_at, received_at) VALUES (%s, %s, %s, 'newcomer', 'pageview', %s, now(), now())",
            (tenant.widget.id, uuid.uuid4(), tenant.id, PAGES[0]),
        )
    expect(page.locator("#visitors-now")).to_have_text(str(now_before + 1), timeout=25_000)
    page.context.close()


def test_range_picker_today_and_custom(browser: Browser, console_settings: Settings, tenant: Tenant) -> None:
    page = signed_in(browser, console_settings, tenant)
    page.select_option("#range", "today")
    page.click("#apply")
    today = datetime.now(UTC).date()
    series = api(
        console_settings,
        tenant,
        "timeseries",
        interval="hour",
        **{"from": today.isoformat(), "to": (today + timedelta(days=1)).isoformat()},
    )
    expect(page.locator("#period")).to_contain_text("hourly")
    expect(page.locator("#total-pageviews")).to_have_text(str(series["totals"]["pageviews"]))
    assert len(page.evaluate("() => window.siteActivityChart.data[0]")) == 24
    day = today - timedelta(days=2)
    page.select_option("#range", "custom")
    page.fill("#start", (day - timedelta(days=2)).isoformat())
    page.fill("#end", day.isoformat())
    page.click("#apply")
    series = api(
        console_settings,
        tenant,
        "timeseries",
        interval="day",
        **{"from": (day - timedelta(days=2)).isoformat(), "to": (day + timedelta(days=1)).isoformat()},
    )
    expect(page.locator("#total-visitors")).to_have_text(str(series["totals"]["visitors"]))
    assert len(page.evaluate("() => window.siteActivityChart.data[0]")) == 3
    page.goto(page.url.replace("range=custom", "range=forever"))
    expect(page.locator("body")).to_contain_text("range must be one of")
    page.context.close()


def test_dashboard_needs_sign_in_and_hides_other_tenants(
    browser: Browser, console_settings: Settings, tenant: Tenant, postgres: EmbeddedPostgres
) -> None:
    base = f"http://127.0.0.1:{console_settings.console_port}"
    assert httpx.get(f"{base}/site-activity").status_code == 401
    assert (
        httpx.get(f"{base}/site-activity/realtime.json", params={"widget_id": str(tenant.widget.id)}).status_code == 401
    )
    other = make_tenant(postgres.dsn, "Elsewhere")
    page = signed_in(browser, console_settings, other)
    resp = page.goto(f"{base}/site-activity?widget_id={tenant.widget.id}")
    assert resp is not None and resp.status == 404
    resp = page.goto(f"{base}/site-activity/realtime.json?widget_id={tenant.widget.id}")
    assert resp is not None and resp.status == 404
    page.context.close()
