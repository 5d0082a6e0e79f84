"""Timelines through the real pipeline (API → Kafka → processors → sink → Postgres → console): a contact's
timeline holds the anonymous history its browsers had before they identified, in separate requests sent before
the identify, merged over two browsers; another visitor's events never appear in it. The visitor summary the
sink's inserts maintain (migration 0007) equals the rows."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import psycopg

from dev_stack.embedded import free_port
from site_activity import widgets
from site_activity.settings import Settings
from tests.conftest import Service, iso, wait_for_rows
from tests.console_helpers import make_tenant


def post(api_url: str, widget_id: uuid.UUID, visitor: str, events: list[dict]) -> None:
    body = {"widget_id": str(widget_id), "visitor_id": visitor, "sent_at": iso(datetime.now(UTC)), "events": events}
    resp = httpx.post(f"{api_url}/api/widget/track", json=body, timeout=10)
    assert resp.status_code == 204, resp.text


def pageview(at: datetime, path: str) -> dict:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "pageview",
        "occurred_at": iso(at),
        "url": f"https://shop.example{path}",
    }


def test_contact_timeline_includes_anonymous_history_before_identify(
    settings: Settings, full_pipeline: None, start_service: Callable[..., Service], api_url: str, db: psycopg.Connection
) -> None:
    tenant = make_tenant(settings.postgres_dsn, "Timeline")
    w: widgets.Widget = tenant.widget
    console_settings = settings.model_copy(update={"console_port": free_port()})
    start_service("console", settings_override=console_settings)
    now = datetime.now(UTC)
    # Browser 1: anonymous pages (their own request, before any identify), then identify, then a page.
    post(
        api_url,
        w.id,
        "browser-1",
        [pageview(now - timedelta(minutes=9), "/pricing"), pageview(now - timedelta(minutes=8), "/features")],
    )
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND event_type = 'pageview'", (w.id,), 2)
    post(
        api_url,
        w.id,
        "browser-1",
        [
            {
                "event_id": str(uuid.uuid4()),
                "type": "identify",
                "user_id": "u-42",
                "occurred_at": iso(now - timedelta(minutes=7)),
                "traits": {"email": "grace@example.com", "name": "Grace Hopper"},
            },
            pageview(now - timedelta(minutes=6), "/app"),
        ],
    )
    # Browser 2 (another device): anonymous page, then the same user identifies.
    post(api_url, w.id, "browser-2", [pageview(now - timedelta(minutes=5), "/blog")])
    post(
        api_url,
        w.id,
        "browser-2",
        [
            {
                "event_id": str(uuid.uuid4()),
                "type": "identify",
                "user_id": "u-42",
                "occurred_at": iso(now - timedelta(minutes=4)),
            }
        ],
    )
    # A stranger on the same widget.
    post(api_url, w.id, "stranger", [pageview(now - timedelta(minutes=3), "/pricing")])
    # Every row of the two browsers (5 + 3 with their session_starts) linked to the contact (the sink's re-link
    # ran), and the stranger's 2 rows stored.
    wait_for_rows(
        db,
        "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id LIKE 'browser-%%'"
        " AND customer_id IS NOT NULL",
        (w.id,),
        8,
        timeout=60,
    )
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND visitor_id = 'stranger'", (w.id,), 2)
    assert (
        db.execute(
            "SELECT count(*) FROM visitor_events WHERE widget_id = %s AND visitor_id LIKE 'browser-%%'", (w.id,)
        ).fetchone()[0]
        == 8
    )
    customer = db.execute(
        "SELECT id FROM customers WHERE tenant_id = %s AND external_id = 'u-42'", (tenant.id,)
    ).fetchone()[0]
    with httpx.Client(base_url=f"http://127.0.0.1:{console_settings.console_port}", timeout=30) as console:
        body = console.get(f"/api/v1/contacts/{customer}/timeline", headers=tenant.auth("member")).json()
        rail = console.post(
            "/api/v1/rail-tokens", json={"contact_id": str(customer)}, headers=tenant.auth("member")
        ).json()
        panel = httpx.get(rail["url"], timeout=30)
    events = [e for s in body["sessions"] for e in s["events"]]
    pages = sorted((e["occurred_at"], e["visitor_id"], e["url"]) for e in events if e["type"] == "pageview")
    assert [(v, u) for _, v, u in pages] == [
        ("browser-1", "https://shop.example/pricing"),
        ("browser-1", "https://shop.example/features"),
        ("browser-1", "https://shop.example/app"),
        ("browser-2", "https://shop.example/blog"),
    ]
    assert {v["visitor_id"] for v in body["visitors"]} == {"browser-1", "browser-2"}
    assert body["contact"]["email"] == "grace@example.com"
    expected = db.execute("SELECT count(*) FROM visitor_events WHERE customer_id = %s", (customer,)).fetchone()[0]
    assert len(events) == expected
    # The rail panel (signed URL) shows the contact's pages, newest first, and not the stranger's.
    assert panel.status_code == 200
    assert panel.text.index("/blog") < panel.text.index("/app") < panel.text.index("/features")
    assert "stranger" not in panel.text and panel.text.count("shop.example/pricing") == 1
    # The summaries kept by the sink's inserts equal the rows.
    summary = db.execute(
        "SELECT visitor_id, events, pageviews, sessions, user_id, customer_id FROM visitor_summaries"
        " WHERE widget_id = %s ORDER BY visitor_id",
        (w.id,),
    ).fetchall()
    raw = db.execute(
        "SELECT visitor_id, count(*), count(*) FILTER (WHERE event_type = 'pageview'),"
        " count(*) FILTER (WHERE event_type = 'session_start'),"
        " max(user_id) FILTER (WHERE event_type = 'identify'),"
        " (array_agg(customer_id) FILTER (WHERE event_type = 'identify'))[1]"
        " FROM visitor_events WHERE widget_id = %s GROUP BY visitor_id ORDER BY visitor_id",
        (w.id,),
    ).fetchall()
    assert summary == raw
