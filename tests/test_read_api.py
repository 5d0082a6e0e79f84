"""The read API (/api/v1/events, /visitors, timelines, rail tokens) against a real console process and Postgres:
every answer equals SQL over the raw rows of a generated workload (late events, duplicates, several widgets and
tenants, deletes); keyset pages stay exact while rows are inserted; the received-order feed never misses a row
that commits late; tenant isolation, bad cursors, rate limit and the OpenAPI document."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from console import reads
from console.app import create_app
from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from site_activity import widgets
from site_activity.events import session_id_for, session_start_event_id_text
from site_activity.settings import Settings
from tests.conftest import make_settings
from tests.console_helpers import Tenant

NOW = datetime.now(UTC).replace(microsecond=0)
INSERT = """INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, name, url, properties,
                                        user_id, customer_id, session_id, occurred_at, received_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, '{}', %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"""


def contact_id(conn: psycopg.Connection, tenant: uuid.UUID, user_id: str, email: str, name: str) -> uuid.UUID:
    cid = uuid.uuid5(tenant, user_id)
    conn.execute(
        "INSERT INTO customers (id, tenant_id, external_id, email, name) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (cid, tenant, user_id, email, name),
    )
    return cid


def visitor_rows(
    w: widgets.Widget, visitor: str, rng: random.Random, n: int, contact: tuple[str, uuid.UUID | None] | None = None
) -> list[tuple[Any, ...]]:
    """Events of one visitor: sessions with a session_start, pageviews, custom events, optionally an identify;
    times scattered over three days (inserted in a shuffled order: late events)."""
    rows: list[tuple[Any, ...]] = []
    # As the sink stores them once linked: every row of an identified visitor carries the contact.
    user, customer = contact if contact else (None, None)
    start = NOW - timedelta(days=3) + timedelta(seconds=rng.randrange(0, 3 * 86400 - 7200))
    sid = first_sid = session_id_for(w.id, visitor, start)
    rows.append(
        (
            w.id,
            uuid.UUID(session_start_event_id_text(str(sid))),
            w.tenant_id,
            visitor,
            "session_start",
            None,
            None,
            user,
            customer,
            sid,
            start,
            start,
        )
    )
    for i in range(n):
        at = start + timedelta(seconds=10 * i, microseconds=rng.randrange(0, 999_999))
        if i == n // 2 and rng.random() < 0.5:  # a second session
            sid = session_id_for(w.id, visitor, at)
            rows.append(
                (
                    w.id,
                    uuid.UUID(session_start_event_id_text(str(sid))),
                    w.tenant_id,
                    visitor,
                    "session_start",
                    None,
                    None,
                    user,
                    customer,
                    sid,
                    at,
                    at,
                )
            )
        kind = rng.choice(["pageview", "pageview", "custom"])
        rows.append(
            (
                w.id,
                uuid.uuid4(),
                w.tenant_id,
                visitor,
                kind,
                rng.choice(["signup", "cart"]) if kind == "custom" else None,
                f"https://shop.example/p{rng.randrange(5)}" if kind == "pageview" else None,
                contact[0] if contact else None,
                contact[1] if contact else None,
                sid,
                at,
                at + timedelta(seconds=rng.randrange(0, 600)),
            )
        )
    if contact:
        at = start + timedelta(seconds=5)
        rows.append(
            (w.id, uuid.uuid4(), w.tenant_id, visitor, "identify", None, None, user, customer, first_sid, at, at)
        )
    return rows


def insert(conn: psycopg.Connection, rows: list[tuple]) -> None:
    """One INSERT statement per transaction, like the sink (sink/writer.py): the summary trigger then locks the
    visitors' summaries once, in key order."""
    if not rows:
        return
    values = ", ".join(
        [
            "(%s::uuid, %s::uuid, %s::uuid, %s, %s, %s, %s, '{}'::jsonb, %s, %s::uuid, %s::uuid, %s::timestamptz,"
            " %s::timestamptz)"
        ]
        * len(rows)
    )
    sql = INSERT.replace("VALUES (%s, %s, %s, %s, %s, %s, %s, '{}', %s, %s, %s, %s, %s)", f"VALUES {values}")
    with conn.transaction():
        conn.execute(sql, [v for r in rows for v in r[:12]])


@pytest.fixture(scope="module")
def console_settings(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    # Paging tests make hundreds of requests a minute; the limit itself is tested on its own app below.
    return make_settings(
        kafka,
        postgres,
        tmp_path_factory.mktemp("read-api") / "data",
        console_port=free_port(),
        console_api_rate_limit_per_min=1_000_000,
    )


@pytest.fixture(scope="module")
def workload(postgres: EmbeddedPostgres, acme: Tenant, globex: Tenant) -> dict[str, Any]:
    """Two widgets for Acme, one for Globex (which reuses Acme's visitor ids), contacts, duplicates, a delete."""
    rng = random.Random(12)
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        second = widgets.create_widget(conn, name="Acme app", tenant_id=acme.id, actor="tests", tracking_enabled=True)
        ada = contact_id(conn, acme.id, "u-ada", "ada@acme.example", "Ada Lovelace")
        bob = contact_id(conn, acme.id, "u-bob", "bob@acme.example", "Bob Babbage")
        eve = contact_id(conn, globex.id, "u-eve", "eve@globex.example", "Eve Globex")
        rows: list[tuple] = []
        for i in range(24):
            c = ("u-ada", ada) if i in (0, 1) else ("u-bob", bob) if i == 2 else None
            rows += visitor_rows(acme.widget if i % 3 else second, f"v-{i}", rng, rng.randrange(3, 16), c)
        for i in range(6):
            rows += visitor_rows(globex.widget, f"v-{i}", rng, 8, ("u-eve", eve) if i == 0 else None)
        rng.shuffle(rows)
        for i in range(0, len(rows), 37):
            insert(conn, rows[i : i + 37])
        insert(conn, rng.sample(rows, 40))  # duplicates: re-sent events change nothing
        # A delete (as retention or erasure would): the summaries follow.
        conn.execute(
            "DELETE FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-4' AND event_type = 'pageview'",
            (acme.widget.id,),
        )
    return {"second": second, "ada": ada, "bob": bob, "eve": eve}


def get(console: httpx.Client, tenant: Tenant, path: str, **params: Any) -> httpx.Response:
    return console.get(path, params={k: v for k, v in params.items() if v is not None}, headers=tenant.auth("member"))


def all_pages(console: httpx.Client, tenant: Tenant, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        resp = get(console, tenant, path, cursor=cursor, **params)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        out += body["results"]
        cursor = body["next"]
        if cursor is None:
            return out
    raise AssertionError("pagination did not end")


def sql_events(db: psycopg.Connection, where: str, params: tuple) -> list[str]:
    return [
        str(r[0])
        for r in db.execute(
            f"SELECT event_id FROM visitor_events WHERE {where} ORDER BY occurred_at DESC, widget_id DESC, event_id DESC",
            params,
        )
    ]


def test_events_equal_sql_for_every_filter(
    console: httpx.Client, db: psycopg.Connection, acme: Tenant, workload: dict[str, Any]
) -> None:
    w = acme.widget.id
    since, until = NOW - timedelta(days=2), NOW - timedelta(days=1)
    cases: list[tuple[dict[str, Any], str, tuple[Any, ...]]] = [
        ({}, "tenant_id = %s", (acme.id,)),
        ({"widget_id": w}, "widget_id = %s", (w,)),
        (
            {"widget_id": w, "type": "custom", "name": "cart"},
            "widget_id = %s AND event_type = 'custom' AND name = 'cart'",
            (w,),
        ),
        ({"visitor_id": "v-1"}, "tenant_id = %s AND visitor_id = 'v-1'", (acme.id,)),
        ({"customer_id": str(workload["ada"])}, "tenant_id = %s AND customer_id = %s", (acme.id, workload["ada"])),
        (
            {"widget_id": w, "since": since.isoformat(), "until": until.isoformat()},
            "widget_id = %s AND occurred_at >= %s AND occurred_at < %s",
            (w, since, until),
        ),
    ]
    for params, where, args in cases:
        expected = sql_events(db, where, args)
        assert expected, params  # not vacuous
        got = all_pages(console, acme, "/api/v1/events", limit=7, **params)
        assert [e["event_id"] for e in got] == expected, params
    # Every column as stored.
    one = get(console, acme, "/api/v1/events", widget_id=w, limit=1).json()["results"][0]
    row = db.execute(
        "SELECT visitor_id, event_type, session_id, occurred_at FROM visitor_events WHERE event_id = %s",
        (one["event_id"],),
    ).fetchone()
    assert (one["visitor_id"], one["type"], one["session_id"], datetime.fromisoformat(one["occurred_at"])) == (
        row[0],
        row[1],
        str(row[2]),
        row[3],
    )


def test_received_order_returns_every_row_once(
    console: httpx.Client, db: psycopg.Connection, acme: Tenant, workload: dict[str, Any]
) -> None:
    got = all_received(console, acme, limit=50)
    expected = {str(r[0]) for r in db.execute("SELECT event_id FROM visitor_events WHERE tenant_id = %s", (acme.id,))}
    assert len(got) == len(set(got)) and set(got) == expected


def all_received(console: httpx.Client, tenant: Tenant, cursor: str | None = None, **params: Any) -> list[str]:
    """Polls order=received until a page is empty; returns the event ids in the order served."""
    out: list[str] = []
    while True:
        body = get(console, tenant, "/api/v1/events", order="received", cursor=cursor, **params).json()
        assert body["next"] is not None
        out += [e["event_id"] for e in body["results"]]
        cursor = body["next"]
        if not body["results"]:
            return out


def test_received_feed_never_misses_a_row_that_commits_late(
    console: httpx.Client, postgres: EmbeddedPostgres, globex: Tenant, workload: dict[str, Any]
) -> None:
    """Two sink-like transactions: the one holding the EARLIER received_at commits LAST. A client polling in
    between must still get that row afterwards (a received_at cursor would have skipped it for ever)."""
    rng = random.Random(3)
    cursor = None
    body = get(console, globex, "/api/v1/events", order="received", limit=1000).json()
    seen = [e["event_id"] for e in body["results"]]
    cursor = body["next"]
    slow_rows = visitor_rows(globex.widget, "slow", rng, 2)
    fast_rows = visitor_rows(globex.widget, "fast", rng, 2)
    fast_rows = [r[:11] + (r[11] + timedelta(hours=1),) for r in fast_rows]  # received later than slow's
    with psycopg.connect(postgres.dsn) as slow, psycopg.connect(postgres.dsn, autocommit=True) as fast:
        slow.execute("SELECT 1")  # opens the transaction: insert() below is then a savepoint inside it
        insert(slow, slow_rows)  # in flight: not committed yet
        insert(fast, fast_rows)
        body = get(console, globex, "/api/v1/events", order="received", cursor=cursor).json()
        # The committed rows are held back while an older transaction is in flight, not served past it.
        assert body["results"] == []
        slow.commit()
    late = all_received(console, globex, cursor)
    assert sorted(late) == sorted(str(r[1]) for r in slow_rows + fast_rows)
    assert not set(late) & set(seen)


def test_pages_stable_while_rows_are_inserted(
    console: httpx.Client, postgres: EmbeddedPostgres, db: psycopg.Connection, acme: Tenant, workload: dict[str, Any]
) -> None:
    w = workload["second"]
    before = sql_events(db, "widget_id = %s", (w.id,))
    start_cursor = get(console, acme, "/api/v1/events", order="received", limit=1000, widget_id=w.id).json()
    feed_before = {e["event_id"] for e in start_cursor["results"]}
    stop = threading.Event()
    inserted: list[str] = []

    def writer() -> None:
        rng = random.Random(7)
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set() and i < 200:  # bounded
                rows = visitor_rows(w, f"live-{i}", rng, 3)  # times anywhere in the last 3 days (late and new)
                insert(conn, rows)
                inserted.extend(str(r[1]) for r in rows)
                i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        paged = all_pages(console, acme, "/api/v1/events", limit=5, widget_id=w.id)
    finally:
        stop.set()
        t.join()
    ids = [e["event_id"] for e in paged]
    assert len(ids) == len(set(ids)), "a row was repeated"
    assert set(before) <= set(ids), "a row that existed at the start was skipped"
    assert set(ids) <= set(before) | set(inserted)
    assert inserted  # the writer really ran while paging
    # A polling client sees every row exactly once, old and new.
    fed = all_received(console, acme, start_cursor["next"], widget_id=w.id, limit=9)
    assert len(fed) == len(set(fed))
    assert set(fed) | feed_before == set(sql_events(db, "widget_id = %s", (w.id,)))


def test_visitors_equal_sql(
    console: httpx.Client, db: psycopg.Connection, acme: Tenant, workload: dict[str, Any]
) -> None:
    w = acme.widget.id
    expected = db.execute(
        """
        SELECT e.visitor_id, min(e.occurred_at), max(e.occurred_at),
               count(*) FILTER (WHERE event_type = 'pageview'), count(DISTINCT session_id),
               count(*) FILTER (WHERE event_type = 'custom'),
               (array_agg(c.email ORDER BY e.occurred_at DESC, e.event_id DESC) FILTER (WHERE event_type = 'identify'))[1]
        FROM visitor_events e LEFT JOIN customers c ON c.id = e.customer_id
        WHERE e.widget_id = %s GROUP BY e.visitor_id
        ORDER BY max(e.occurred_at) DESC, e.visitor_id DESC""",
        (w,),
    ).fetchall()
    got = all_pages(console, acme, "/api/v1/visitors", widget_id=w, limit=4)
    assert [
        (
            v["visitor_id"],
            datetime.fromisoformat(v["first_seen"]),
            datetime.fromisoformat(v["last_seen"]),
            v["pageviews"],
            v["sessions"],
            v["custom_events"],
            v["contact"] and v["contact"]["email"],
        )
        for v in got
    ] == [tuple(r) for r in expected]
    assert any(v["visitor_id"] == "v-4" and v["pageviews"] == 0 for v in got)  # the delete was applied
    # q: visitor id, user id, email, name (case-insensitive substring); LIKE wildcards are literal.
    for q, who in [
        ("V-1", None),
        ("u-ada", "ada@acme.example"),
        ("ADA@acme", "ada@acme.example"),
        ("babbage", "bob@acme.example"),
    ]:
        found = all_pages(console, acme, "/api/v1/visitors", q=q)
        assert found, q
        if who:
            assert {v["contact"]["email"] for v in found} == {who}
        else:
            assert all("v-1" in v["visitor_id"] for v in found)
    assert get(console, acme, "/api/v1/visitors", q="%").json()["results"] == []


def flatten(timeline: dict[str, Any]) -> list[str]:
    events = [e for s in timeline["sessions"] for e in s["events"]]
    for s in timeline["sessions"]:  # grouped: every event of a group has the group's session
        assert {e["session_id"] for e in s["events"]} == {s["session_id"]}
    return [
        e["event_id"]
        for e in sorted(events, key=lambda e: (e["occurred_at"], e["widget_id"], e["event_id"]), reverse=True)
    ]


def test_timelines_equal_sql(
    console: httpx.Client, db: psycopg.Connection, acme: Tenant, workload: dict[str, Any]
) -> None:
    w = acme.widget.id
    expected = sql_events(db, "widget_id = %s AND visitor_id = 'v-1'", (w,))
    body = get(console, acme, "/api/v1/visitors/v-1/timeline", widget_id=w).json()
    assert flatten(body) == expected
    starts = [s["started_at"] for s in body["sessions"]]
    assert starts == sorted(starts)
    # Paged: older pages through `next`.
    ids, cursor = [], None
    while True:
        page = get(console, acme, "/api/v1/visitors/v-1/timeline", widget_id=w, limit=2, cursor=cursor).json()
        ids += flatten(page)
        cursor = page["next"]
        if cursor is None:
            break
    assert ids == expected
    # Contact: both of Ada's browsers, on both widgets.
    ada = workload["ada"]
    body = get(console, acme, f"/api/v1/contacts/{ada}/timeline").json()
    assert flatten(body) == sql_events(db, "customer_id = %s", (ada,))
    assert {v["visitor_id"] for v in body["visitors"]} == {"v-0", "v-1"}
    assert body["contact"] == {
        "customer_id": str(ada),
        "user_id": "u-ada",
        "email": "ada@acme.example",
        "name": "Ada Lovelace",
    }


def test_other_tenants_ids_are_404(
    console: httpx.Client, acme: Tenant, globex: Tenant, workload: dict[str, Any]
) -> None:
    eve = workload["eve"]
    for path, params in [
        ("/api/v1/events", {"widget_id": globex.widget.id}),
        ("/api/v1/events", {"customer_id": eve}),
        ("/api/v1/visitors", {"widget_id": globex.widget.id}),
        ("/api/v1/visitors/v-0/timeline", {"widget_id": globex.widget.id}),
        (f"/api/v1/contacts/{eve}/timeline", {}),
        ("/api/v1/visitors/never-seen/timeline", {}),
        ("/api/v1/contacts/not-a-uuid/timeline", {}),
    ]:
        resp = get(console, acme, path, **params)
        assert resp.status_code == 404 and resp.json()["error"] == "not_found", (path, resp.text)
    # Globex's visitor "v-0" exists, but Acme's own "v-0" timeline shows only Acme's rows.
    body = get(console, acme, "/api/v1/visitors/v-0/timeline").json()
    assert {e["widget_id"] for s in body["sessions"] for e in s["events"]} <= {
        str(acme.widget.id),
        str(workload["second"].id),
    }
    resp = console.post("/api/v1/rail-tokens", json={"contact_id": str(eve)}, headers=acme.auth("member"))
    assert resp.status_code == 404


def test_bad_cursors_and_parameters_are_400(console: httpx.Client, acme: Tenant, workload: dict[str, Any]) -> None:
    first = get(console, acme, "/api/v1/events", limit=1).json()
    good = first["next"]
    visitors_cursor = get(console, acme, "/api/v1/visitors", limit=1).json()["next"]
    for cursor in [
        "garbage",
        good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
        good + "x",
        visitors_cursor,
        "eyJrIjoiZXZlbnRzLW9jY3VycmVkIiwicCI6WzFdfQ.forged",
    ]:
        resp = get(console, acme, "/api/v1/events", cursor=cursor)
        assert resp.status_code == 400 and resp.json()["error"] == "bad_cursor", (cursor, resp.text)
    # The same listing's cursor of the other order is refused too.
    resp = get(console, acme, "/api/v1/events", cursor=good, order="received")
    assert resp.status_code == 400
    invalid: list[dict[str, Any]] = [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "x"},
        {"type": "click"},
        {"since": "yesterday"},
        {"order": "random"},
    ]
    for params in invalid:
        resp = get(console, acme, "/api/v1/events", **params)
        assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", (params, resp.text)


def test_openapi_lists_the_read_endpoints_with_models(console: httpx.Client) -> None:
    doc = console.get("/api/v1/openapi.json").json()
    for path, model in [
        ("/api/v1/events", "EventPage"),
        ("/api/v1/visitors", "VisitorPage"),
        ("/api/v1/visitors/{visitor_id}/timeline", "VisitorTimeline"),
        ("/api/v1/contacts/{customer_id}/timeline", "ContactTimeline"),
    ]:
        schema = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(f"/{model}"), (path, schema)
    assert "Event" in doc["components"]["schemas"]


def test_rate_limit_is_per_key_429_with_retry_after(
    postgres: EmbeddedPostgres, acme: Tenant, globex: Tenant, tmp_path: Any
) -> None:
    settings = Settings(postgres_dsn=postgres.dsn, data_dir=tmp_path, console_api_rate_limit_per_min=3)
    with TestClient(create_app(settings)) as client:
        codes = [client.get("/api/v1/me", headers=acme.auth("member")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        resp = client.get("/api/v1/events", headers=acme.auth("member"))
        assert resp.status_code == 429 and resp.json()["error"] == "rate_limited"
        assert 1 <= int(resp.headers["Retry-After"]) <= 20
        # Another key has its own budget.
        assert client.get("/api/v1/me", headers=globex.auth("member")).status_code == 200


def test_query_functions_for_the_benchmark(postgres: EmbeddedPostgres, acme: Tenant, workload: dict[str, Any]) -> None:
    """The functions bench/ calls directly answer like the endpoints."""
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        rows, nxt = reads.list_events(conn, acme.id, reads.EventFilter(widget_id=acme.widget.id), limit=3)
        assert len(rows) == 3 and nxt is not None
        tl = reads.visitor_timeline(conn, acme.id, "v-1", widget_id=acme.widget.id)
        assert tl is not None and tl["sessions"]


def test_visitor_summaries_stay_exact_under_concurrent_inserts_and_deletes(
    postgres: EmbeddedPostgres, db: psycopg.Connection, make_widget: Any
) -> None:
    """Sink-like inserts (several transactions at once, duplicates) while purge-like deletes hit the same
    visitors: afterwards every summary equals the aggregate over the rows left."""
    w = make_widget()
    visitors = [f"c-{i}" for i in range(12)]
    errors: list[BaseException] = []

    def inserter(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                for _ in range(25):  # bounded
                    # Half the visitors' requests identify (a different user each time): the latest identify of
                    # a visitor changes with inserts and must be re-read when a delete takes it.
                    rows = [
                        r
                        for v in rng.sample(visitors, 4)
                        for r in visitor_rows(
                            w, v, rng, 3, contact=(f"user-{rng.randrange(1000)}", None) if rng.random() < 0.5 else None
                        )
                    ]
                    insert(conn, rows + rng.sample(rows, 3))
        except BaseException as exc:
            errors.append(exc)

    def deleter() -> None:
        rng = random.Random(99)
        try:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                for _ in range(25):
                    conn.execute(
                        "DELETE FROM visitor_events WHERE ctid = ANY(ARRAY(SELECT ctid FROM visitor_events"
                        " WHERE widget_id = %s AND visitor_id = ANY(%s) LIMIT 15))",
                        (w.id, rng.sample(visitors, 3)),
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=inserter, args=(s,)) for s in (1, 2, 3)] + [threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    raw = db.execute(
        """
        SELECT visitor_id, min(occurred_at), max(occurred_at), count(*), count(*) FILTER (WHERE event_type = 'pageview'),
               count(*) FILTER (WHERE event_type = 'session_start'), count(*) FILTER (WHERE event_type = 'custom'),
               (array_agg(user_id ORDER BY occurred_at DESC, event_id DESC) FILTER (WHERE event_type = 'identify'))[1],
               (array_agg(event_id ORDER BY occurred_at DESC, event_id DESC) FILTER (WHERE event_type = 'identify'))[1]
        FROM visitor_events WHERE widget_id = %s GROUP BY visitor_id ORDER BY visitor_id""",
        (w.id,),
    ).fetchall()
    summary = db.execute(
        "SELECT visitor_id, first_seen, last_seen, events, pageviews, sessions, custom_events,"
        " user_id, identify_event_id"
        " FROM visitor_summaries WHERE widget_id = %s ORDER BY visitor_id",
        (w.id,),
    ).fetchall()
    assert raw and summary == raw
    assert any(r[7] is not None for r in raw)  # the latest identify (some of them re-read after a delete) too


def test_rail_token_for_a_visitor_shows_only_that_visitor(
    console: httpx.Client, db: psycopg.Connection, acme: Tenant, workload: dict[str, Any]
) -> None:
    w = acme.widget.id
    resp = console.post(
        "/api/v1/rail-tokens", json={"widget_id": str(w), "visitor_id": "v-2"}, headers=acme.auth("member")
    )
    assert resp.status_code == 200, resp.text
    url = resp.json()["url"]
    panel = httpx.get(url, timeout=30)
    shown = [m.split('"')[0] for m in panel.text.split('data-event-id="')[1:]]
    assert shown == [
        str(r[0])
        for r in db.execute(
            "SELECT event_id FROM visitor_events WHERE widget_id = %s AND visitor_id = 'v-2'"
            " AND event_type IN ('pageview', 'custom') ORDER BY occurred_at DESC, event_id DESC LIMIT 50",
            (w,),
        )
    ]
    assert shown
    for body in [
        {},
        {"contact_id": str(workload["ada"]), "visitor_id": "v-2"},
        {"widget_id": str(w)},
        {"contact_id": str(workload["ada"]), "extra": 1},
    ]:
        resp = console.post("/api/v1/rail-tokens", json=body, headers=acme.auth("member"))
        assert resp.status_code == 400 and resp.json()["reason"], (body, resp.text)
    assert httpx.get(url.split("?")[0], timeout=30).status_code == 401  # no token
