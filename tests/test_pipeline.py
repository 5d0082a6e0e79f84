"""End to end through real processes: POST /api/widget/track -> Kafka (Avro) -> sink -> Postgres rows."""

from __future__ import annotations

import io
import json
import struct
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import avro.io
import avro.schema
import httpx
import psycopg

from dev_stack.embedded import wait_until
from schemas.codec import SCHEMA_DIR
from site_activity import widgets
from site_activity.settings import Settings
from site_activity.topics import Topics
from tests.avro_spec import crc64_avro, parsing_canonical_form
from tests.conftest import iso, read_topic, wait_for_rows

ROWS = """SELECT event_id, widget_id, tenant_id, visitor_id, event_type, name, url, referrer, properties, user_id,
                 customer_id, session_id, occurred_at, received_at
          FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start' ORDER BY occurred_at, event_id"""


def request_body(
    widget_id: uuid.UUID, events: list[dict], visitor: str = "v-1", sent_at: datetime | None = None
) -> dict:
    return {
        "widget_id": str(widget_id),
        "visitor_id": visitor,
        "sent_at": iso(sent_at or datetime.now(UTC)),
        "events": events,
    }


def pageview(at: datetime, url: str = "https://shop.example/", **extra: object) -> dict:
    return {"event_id": str(uuid.uuid4()), "type": "pageview", "occurred_at": iso(at), "url": url, **extra}


def test_posted_events_become_rows_with_every_column(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    now = datetime.now(UTC)
    events = [
        pageview(now - timedelta(seconds=4), "https://shop.example/pricing", referrer="https://google.example/"),
        {
            "event_id": str(uuid.uuid4()),
            "type": "custom",
            "name": "clicked_upgrade",
            "occurred_at": iso(now - timedelta(seconds=3)),
            "url": "https://shop.example/pricing",
            "properties": {"plan": "growth", "rows": 120, "nested": {"ok": True}},
        },
        {
            "event_id": str(uuid.uuid4()),
            "type": "identify",
            "user_id": "u_88291",
            "occurred_at": iso(now - timedelta(seconds=2)),
            "url": "https://shop.example/app",
            "traits": {"email": "paul@arrakis.example", "name": "Paul Atreides"},
        },
    ]
    # Server-side fields in the body are ignored, never trusted.
    body = request_body(w.id, events) | {"tenant_id": str(uuid.uuid4())}
    before = datetime.now(UTC)
    resp = httpx.post(f"{api_url}/api/widget/track", json=body, timeout=10)
    after = datetime.now(UTC)
    assert resp.status_code == 204, resp.text

    rows = wait_for_rows(db, ROWS, (w.id,), 3)
    assert len(rows) == 3
    by_type = {r[4]: r for r in rows}
    for sent, row in zip(events, rows, strict=False):
        assert row[0] == uuid.UUID(sent["event_id"])
        assert row[1] == w.id and row[2] == w.tenant_id and row[3] == "v-1"
        assert before - timedelta(seconds=6) < row[12] <= after
        assert before <= row[13] <= after + timedelta(seconds=1)
        assert row[10] is None  # customer_id: linked by the processors, not by the raw path
    pv, custom, ident = by_type["pageview"], by_type["custom"], by_type["identify"]
    assert pv[6:9] == ("https://shop.example/pricing", "https://google.example/", {})
    assert custom[5] == "clicked_upgrade" and custom[8] == {"plan": "growth", "rows": 120, "nested": {"ok": True}}
    assert custom[7] is None
    assert ident[9] == "u_88291" and ident[8] == {"email": "paul@arrakis.example", "name": "Paul Atreides"}


def test_client_clock_skew_is_corrected(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    client_now = datetime.now(UTC) + timedelta(hours=2)  # the visitor's clock runs two hours fast
    resp = httpx.post(
        f"{api_url}/api/widget/track",
        timeout=10,
        json=request_body(
            w.id,
            [pageview(client_now - timedelta(seconds=30)), pageview(client_now + timedelta(minutes=5))],
            sent_at=client_now,
        ),
    )
    assert resp.status_code == 204, resp.text
    rows = wait_for_rows(
        db, "SELECT occurred_at, received_at FROM visitor_events WHERE widget_id = %s ORDER BY occurred_at", (w.id,), 2
    )
    (first_at, first_rx), (second_at, second_rx) = rows
    assert abs((first_rx - first_at) - timedelta(seconds=30)) < timedelta(seconds=1)
    assert second_at == second_rx  # an event "from the future" is clamped to the moment it was received


def test_retried_request_never_duplicates_rows(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    now = datetime.now(UTC)
    body = request_body(w.id, [pageview(now - timedelta(seconds=i), f"https://shop.example/{i}") for i in range(25)])
    for _ in range(3):
        assert httpx.post(f"{api_url}/api/widget/track", json=body, timeout=10).status_code == 204
    marker = request_body(w.id, [pageview(now, "https://shop.example/last")])
    assert httpx.post(f"{api_url}/api/widget/track", json=marker, timeout=10).status_code == 204
    wait_for_rows(
        db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND url = 'https://shop.example/last'", (w.id,), 1
    )
    # one row per event sent: the rows counted per event id, against the ids the client sent (three times)
    sent = Counter(uuid.UUID(e["event_id"]) for e in body["events"] + marker["events"])
    stored: dict[Any, int] = dict(
        db.execute(
            "SELECT event_id, count(*) FROM visitor_events WHERE widget_id = %s GROUP BY event_id", (w.id,)
        ).fetchall()
    )
    assert stored == dict(sent) and sum(stored.values()) == 26


def test_no_stored_url_or_referrer_contains_a_fragment(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    """Issue 8, case 10, for clients other than the current widget (old copies, direct API calls): the API
    drops every #fragment (often a secret, e.g. #access_token=…) before anything is stored; a long fragment
    does not get an otherwise storable url refused."""
    w = make_widget()
    now = datetime.now(UTC)
    long_secret = "#access_token=" + "s" * 3000
    cases = [
        (
            "https://shop.example/a#access_token=abc",
            "https://idp.example/cb#id_token=xyz",
            "https://shop.example/a",
            "https://idp.example/cb",
        ),
        ("https://shop.example/b#", "https://shop.example/#x#y", "https://shop.example/b", "https://shop.example/"),
        ("https://shop.example/c?q=1" + long_secret, None, "https://shop.example/c?q=1", None),
        ("#only-a-fragment", "https://shop.example/d", "", "https://shop.example/d"),
    ]
    events = [
        pageview(now - timedelta(seconds=i), url, **({"referrer": ref} if ref else {}))
        for i, (url, ref, _, _) in enumerate(cases)
    ]
    events.append(
        {
            "event_id": str(uuid.uuid4()),
            "type": "custom",
            "name": "clicked",
            "occurred_at": iso(now),
            "url": "https://shop.example/e#secret",
            "referrer": "https://shop.example/f#other",
        }
    )
    resp = httpx.post(f"{api_url}/api/widget/track", json=request_body(w.id, events), timeout=10)
    assert resp.status_code == 204, resp.text
    rows = {
        str(e): (u, r)
        for e, u, r in wait_for_rows(
            db, "SELECT event_id, url, referrer FROM visitor_events WHERE widget_id = %s", (w.id,), len(events)
        )
    }
    expected = {e["event_id"]: (url, ref) for e, (_, _, url, ref) in zip(events, cases, strict=False)}
    expected[events[-1]["event_id"]] = ("https://shop.example/e", "https://shop.example/f")
    assert rows == expected
    assert not any("#" in (v or "") for pair in rows.values() for v in pair)


def test_disabled_widget_drops_silently_until_enabled(
    raw_pipeline: Settings,
    api_url: str,
    make_widget: Callable[..., widgets.Widget],
    db: psycopg.Connection,
    postgres,
) -> None:
    w = make_widget(enabled=False)
    now = datetime.now(UTC)
    dropped = httpx.post(
        f"{api_url}/api/widget/track", json=request_body(w.id, [pageview(now, "https://x.example/off")]), timeout=10
    )
    assert dropped.status_code == 204
    with psycopg.connect(postgres.dsn) as conn:
        widgets.set_tracking(conn, w.id, True, actor="tests")
    # The API's widget cache picks the flip up within its refresh interval (< 5 s).
    deadline = datetime.now(UTC) + timedelta(seconds=15)
    while datetime.now(UTC) < deadline:
        resp = httpx.post(
            f"{api_url}/api/widget/track",
            json=request_body(w.id, [pageview(datetime.now(UTC), "https://x.example/on")]),
            timeout=10,
        )
        assert resp.status_code == 204
        if db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (w.id,)).fetchone()[0]:
            break
        import time

        time.sleep(1)
    rows = wait_for_rows(db, "SELECT DISTINCT url FROM visitor_events WHERE widget_id = %s", (w.id,), 1)
    assert rows == [("https://x.example/on",)]


def test_mixed_request_keeps_the_valid_events(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection
) -> None:
    w = make_widget()
    now = datetime.now(UTC)
    good = [pageview(now, "https://shop.example/a"), pageview(now, "https://shop.example/b")]
    bad = {"event_id": str(uuid.uuid4()), "type": "custom", "name": "x" * 101, "occurred_at": iso(now)}
    resp = httpx.post(f"{api_url}/api/widget/track", json=request_body(w.id, [good[0], bad, good[1]]), timeout=10)
    assert resp.status_code == 400
    assert [r["index"] for r in resp.json()["rejected"]] == [1]
    rows = wait_for_rows(db, "SELECT url FROM visitor_events WHERE widget_id = %s ORDER BY url", (w.id,), 2)
    assert rows == [("https://shop.example/a",), ("https://shop.example/b",)]


def test_deleting_a_widget_removes_its_events(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget], db: psycopg.Connection, postgres
) -> None:
    keep, doomed = make_widget(), make_widget()
    now = datetime.now(UTC)
    for w in (keep, doomed):
        assert (
            httpx.post(f"{api_url}/api/widget/track", json=request_body(w.id, [pageview(now)]), timeout=10).status_code
            == 204
        )
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = ANY(%s)", ([keep.id, doomed.id],), 2)
    with psycopg.connect(postgres.dsn) as conn:
        assert widgets.delete_widget(conn, doomed.id, actor="tests") == 1
    assert db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (doomed.id,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (keep.id,)).fetchone() == (1,)
    # Events still in flight for the deleted widget are dropped by the API (404) rather than retried forever:
    # once the API's widget cache has seen the deletion (refreshed every widget_cache_refresh_s) it answers 404,
    # never a status the widget retries; a request it still accepted meanwhile is dropped by the sink.
    answers: list[int] = []

    def refused() -> bool:
        answers.append(
            httpx.post(
                f"{api_url}/api/widget/track", json=request_body(doomed.id, [pageview(now)]), timeout=10
            ).status_code
        )
        return answers[-1] == 404

    wait_until(refused, 10 * raw_pipeline.widget_cache_refresh_s + 5, "404 for the deleted widget", interval=0.2)
    assert set(answers) <= {204, 404}, answers
    marker = request_body(keep.id, [pageview(now, "https://shop.example/after-delete")])
    assert httpx.post(f"{api_url}/api/widget/track", json=marker, timeout=10).status_code == 204
    wait_for_rows(db, "SELECT 1 FROM visitor_events WHERE widget_id = %s AND url LIKE '%%after-delete'", (keep.id,), 1)
    assert db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (doomed.id,)).fetchone() == (0,)


def test_topic_messages_decode_with_the_reference_avro_library(
    raw_pipeline: Settings, api_url: str, make_widget: Callable[..., widgets.Widget]
) -> None:
    """Any consumer with the .avsc file alone can read the raw topic: single-object encoding, Apache `avro`."""
    w = make_widget()
    now = datetime.now(UTC)
    sent = [
        pageview(now - timedelta(seconds=1), "https://shop.example/interop"),
        {
            "event_id": str(uuid.uuid4()),
            "type": "custom",
            "name": "clicked",
            "occurred_at": iso(now),
            "properties": {"plan": "growth"},
        },
    ]
    assert httpx.post(f"{api_url}/api/widget/track", json=request_body(w.id, sent), timeout=10).status_code == 204
    [msg] = read_topic(raw_pipeline, Topics.from_settings(raw_pipeline).raw_events, 1)
    value = msg.value()
    schema_text = (SCHEMA_DIR / "visitor_event_batch.avsc").read_text()
    assert value[:2] == b"\xc3\x01"
    assert struct.unpack("<Q", value[2:10])[0] == crc64_avro(parsing_canonical_form(json.loads(schema_text)).encode())
    reader = avro.io.DatumReader(avro.schema.parse(schema_text))
    events = reader.read(avro.io.BinaryDecoder(io.BytesIO(value[10:])))["events"]
    assert [e["event_id"] for e in events] == [e["event_id"] for e in sent]
    assert [e["event_type"] for e in events] == ["pageview", "custom"]
    for e in events:
        assert e["widget_id"] == str(w.id) and e["tenant_id"] == str(w.tenant_id) and e["visitor_id"] == "v-1"
    assert events[0]["url"] == "https://shop.example/interop"
    assert json.loads(events[1]["properties"]) == {"plan": "growth"}
    assert msg.key() == f"{w.id}:v-1".encode()
