"""Rollups and the /api/v1/stats endpoints: every number equals the same count over the raw visitor_events rows,
on a generated workload sent through the real pipeline (late events, duplicates, a full replay of the enriched
topic by a second sink, several widgets and tenants), and still after a retention purge, an erasure and a
widget deletion; tenant isolation (404) and parameter errors (400, never 422)."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from console import stats
from console.errors import ConsoleError
from console.routes.dashboard_pages import page_range
from dev_stack.embedded import EmbeddedPostgres, free_port, wait_until
from site_activity import rollups, widgets
from site_activity.retention import purge
from site_activity.settings import Settings
from tests.conftest import Service, http_ok, iso
from tests.console_helpers import Tenant, cli, make_tenant

PAGES = [
    "https://www.shop.example/pricing?utm_source=news",
    "https://www.shop.example/pricing",
    "https://shop.example",
    "http://shop.example/",
    "https://shop.example/docs/start?x=1&y=2",
    "https://blog.shop.example/docs/start",
    "https://shop.example/Café/ü?q",
]
NAMES = ["signup", "download", "play video"]
# Ages of events when sent, in seconds: recent ones for the realtime window (kept away from its 5-minute edge),
# and late ones up to 3 days old (sent mixed into the same requests as new ones).
AGES = [60, 90, 600, 3_000, 7_200, 20_000, 50_000, 86_400 + 500, 2 * 86_400 + 100, 3 * 86_400 - 4_000]


def page_of(url: str | None) -> str:
    """What the README calls a page, computed independently of the SQL: the URL's path, '/' when empty."""
    return "(none)" if url is None else (urlsplit(url).path or "/")


# --- the workload -----------------------------------------------------------------------------------------------


def requests_for(widget_id: uuid.UUID, rng: random.Random, visitors: int, now: datetime) -> list[dict[str, Any]]:
    out = []
    for v in range(visitors):
        visitor = f"visitor-{v}-{uuid.uuid4().hex[:6]}"
        for _ in range(rng.randint(2, 4)):
            events: list[dict[str, Any]] = []
            for _ in range(rng.randint(3, 8)):
                at = iso(now - timedelta(seconds=rng.choice(AGES) + rng.randint(0, 20)))
                kind = rng.choices(["pageview", "custom", "identify"], [6, 3, 1])[0]
                e: dict[str, Any] = {"event_id": str(uuid.uuid4()), "type": kind, "occurred_at": at}
                if kind == "pageview":
                    e["url"] = rng.choice(PAGES)
                elif kind == "custom":
                    e["name"] = rng.choice(NAMES)
                else:
                    e["user_id"], e["traits"] = f"user-{v}", {"email": f"u{v}@shop.example"}
                events.append(e)
            out.append({"widget_id": str(widget_id), "visitor_id": visitor, "sent_at": iso(now), "events": events})
    return out


def send(api: httpx.Client, bodies: list[dict[str, Any]], rng: random.Random) -> set[str]:
    """Posts every body, a third of them twice (the widget's retry after a lost response); returns the ids."""
    ids: set[str] = set()
    for body in bodies:
        for _ in range(2 if rng.random() < 0.33 else 1):
            resp = api.post("/api/widget/track", json=body)
            assert resp.status_code == 204, resp.text
        ids.update(e["event_id"] for e in body["events"])
    return ids


def wait_stored(conn: psycopg.Connection, ids: set[str], timeout: float = 90.0) -> None:
    wait_until(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM visitor_events WHERE event_id = ANY(%s::uuid[])", (list(ids),)
            ).fetchone()[0]
            == len(ids)
        ),
        timeout,
        "events stored",
    )


# --- the same numbers from raw rows ---------------------------------------------------------------------------


def raw_buckets(
    conn: psycopg.Connection, widget_id: uuid.UUID, start: datetime, end: datetime, unit: str
) -> dict[str, dict[str, int]]:
    bucket = "date_trunc('hour', occurred_at, 'UTC')" if unit == "hour" else "date_trunc('day', occurred_at, 'UTC')"
    rows = conn.execute(
        f"SELECT {bucket}, count(*) FILTER (WHERE event_type = 'pageview'), count(DISTINCT visitor_id),"
        " count(*) FILTER (WHERE event_type = 'session_start'), count(*), count(*) FILTER (WHERE event_type = 'custom')"
        " FROM visitor_events WHERE widget_id = %s AND occurred_at >= %s AND occurred_at < %s GROUP BY 1",
        (widget_id, start, end),
    ).fetchall()
    return {
        stats.iso(t): {"pageviews": pv, "visitors": vis, "sessions": ss, "events": ev, "custom_events": cu}
        for t, pv, vis, ss, ev, cu in rows
    }


def raw_totals(conn: psycopg.Connection, widget_id: uuid.UUID, start: datetime, end: datetime) -> dict[str, int]:
    pv, vis, ss, ev, cu = conn.execute(
        "SELECT count(*) FILTER (WHERE event_type = 'pageview'), count(DISTINCT visitor_id),"
        " count(*) FILTER (WHERE event_type = 'session_start'), count(*), count(*) FILTER (WHERE event_type = 'custom')"
        " FROM visitor_events WHERE widget_id = %s AND occurred_at >= %s AND occurred_at < %s",
        (widget_id, start, end),
    ).fetchone()  # type: ignore[misc]
    return {"pageviews": pv, "visitors": vis, "sessions": ss, "events": ev, "custom_events": cu}


def get_ok(console: httpx.Client, t: Tenant, path: str, **params: Any) -> dict[str, Any]:
    resp = console.get(path, params=params, headers=t.auth("member"))
    assert resp.status_code == 200, resp.text
    return resp.json()


def check_widget(conn: psycopg.Connection, console: httpx.Client, t: Tenant, widget_id: uuid.UUID) -> int:
    """Asserts every stats endpoint equals SQL over the widget's raw rows; returns the widget's row count."""
    assert rollups.mismatches(conn, widget_id) == []
    today = datetime.now(UTC).date()
    metrics = ",".join(stats.METRICS)
    for params in (
        {
            "from": (today - timedelta(days=4)).isoformat(),
            "to": (today + timedelta(days=1)).isoformat(),
            "interval": "day",
        },
        {"from": iso(datetime.now(UTC) - timedelta(hours=80)), "interval": "hour"},
        {
            "from": iso(datetime.now(UTC) - timedelta(hours=30)),
            "to": iso(datetime.now(UTC) - timedelta(hours=2)),
            "interval": "hour",
        },
    ):
        body = get_ok(console, t, "/api/v1/stats/timeseries", widget_id=widget_id, metrics=metrics, **params)
        start, end = stats.parse_time(body["from"], "from"), stats.parse_time(body["to"], "to")
        raw = raw_buckets(conn, widget_id, start, end, body["interval"])
        zero = dict.fromkeys(stats.METRICS, 0)
        assert {b["time"]: {m: b[m] for m in stats.METRICS} for b in body["results"]} == {
            b["time"]: raw.get(b["time"], zero) for b in body["results"]
        }
        assert set(raw) <= {b["time"] for b in body["results"]}  # no bucket with rows is missing
        assert body["totals"] == raw_totals(conn, widget_id, start, end)
        assert body["visitors_estimated"] is False  # few visitors: the exact distinct count
    # Top pages over: whole days + partial days at both ends; less than a day; exactly whole days.
    for window in (
        {"from": iso(datetime.now(UTC) - timedelta(days=5))},
        {"from": iso(datetime.now(UTC) - timedelta(hours=20)), "to": iso(datetime.now(UTC) - timedelta(hours=3))},
        {"from": (today - timedelta(days=2)).isoformat(), "to": today.isoformat()},
    ):
        pages = get_ok(console, t, "/api/v1/stats/top-pages", widget_id=widget_id, limit=100, **window)
        start, end = stats.parse_time(pages["from"], "from"), stats.parse_time(pages["to"], "to")
        urls = conn.execute(
            "SELECT url FROM visitor_events WHERE widget_id = %s AND event_type = 'pageview'"
            " AND occurred_at >= %s AND occurred_at < %s",
            (widget_id, start, end),
        ).fetchall()
        expected_pages = Counter(page_of(u) for (u,) in urls)
        assert {p["page"]: p["pageviews"] for p in pages["results"]} == dict(expected_pages), window
        assert [p["pageviews"] for p in pages["results"]] == sorted(expected_pages.values(), reverse=True)
    week = {"from": iso(datetime.now(UTC) - timedelta(days=5))}
    start = stats.parse_time(get_ok(console, t, "/api/v1/stats/top-events", widget_id=widget_id, **week)["from"], "f")
    pages = get_ok(console, t, "/api/v1/stats/top-pages", widget_id=widget_id, limit=100, **week)
    top2 = get_ok(console, t, "/api/v1/stats/top-pages", widget_id=widget_id, limit=2, **week)["results"]
    assert top2 == pages["results"][:2]
    names = get_ok(console, t, "/api/v1/stats/top-events", widget_id=widget_id, limit=100, **week)
    raw_names = conn.execute(
        "SELECT name, count(*) FROM visitor_events WHERE widget_id = %s AND event_type = 'custom'"
        " AND occurred_at >= %s GROUP BY 1",
        (widget_id, start),
    ).fetchall()
    assert {e["name"]: e["events"] for e in names["results"]} == dict(raw_names)
    live = get_ok(console, t, "/api/v1/stats/realtime", widget_id=widget_id)
    assert (
        live["visitors"]
        == conn.execute(
            "SELECT count(DISTINCT visitor_id) FROM visitor_events WHERE widget_id = %s"
            " AND occurred_at > now() - interval '5 minutes'",
            (widget_id,),
        ).fetchone()[0]
    )
    minutes = [stats.parse_time(m["minute"], "minute") for m in live["pageviews"]]
    assert len(minutes) == 30 and minutes == sorted(minutes)
    per_minute: dict[Any, int] = dict(
        conn.execute(
            "SELECT date_trunc('minute', occurred_at, 'UTC'), count(*) FROM visitor_events WHERE widget_id = %s"
            " AND event_type = 'pageview' AND occurred_at >= %s AND occurred_at < %s GROUP BY 1",
            (widget_id, minutes[0], minutes[-1] + timedelta(minutes=1)),
        ).fetchall()
    )
    assert {m: p["pageviews"] for m, p in zip(minutes, live["pageviews"], strict=False)} == {
        m: per_minute.get(m, 0) for m in minutes
    }
    return int(conn.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (widget_id,)).fetchone()[0])


def metric(url: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(url).text.splitlines() if line.startswith(name + " "))


# --- the pipeline test ----------------------------------------------------------------------------------------


def test_stats_equal_raw_rows_through_pipeline_replay_purge_erase_and_delete(
    settings: Settings, start_service: Callable[..., Service], db: psycopg.Connection, postgres: EmbeddedPostgres
) -> None:
    rng = random.Random(12)
    acme, globex = make_tenant(postgres.dsn, "Acme"), make_tenant(postgres.dsn, "Globex")
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        acme_blog = widgets.create_widget(
            conn, name="Acme blog", tenant_id=acme.id, actor="tests", tracking_enabled=True
        )
    s = settings.model_copy(update={"console_port": free_port()})
    for stage in ("sink", "processors", "api", "console"):
        start_service(stage, settings_override=s)
    wait_until(http_ok(s.health_url("console")), 30, "console", interval=0.2)
    api = httpx.Client(base_url=f"http://127.0.0.1:{s.http_port}", timeout=10)
    console = httpx.Client(base_url=f"http://127.0.0.1:{s.console_port}", timeout=30)
    now = datetime.now(UTC)
    owners = {acme.widget.id: acme, acme_blog.id: acme, globex.widget.id: globex}
    ids = set()
    for wid in owners:
        ids |= send(api, requests_for(wid, rng, visitors=8, now=now), rng)
    wait_stored(db, ids)
    for wid, t in owners.items():
        assert check_widget(db, console, t, wid) > 0

    # A second sink in a new consumer group re-reads the whole enriched topic: every row is a replay, nothing
    # may be counted twice.
    stored = db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = ANY(%s)", (list(owners),)).fetchone()[0]
    replay = s.model_copy(update={"sink_group": f"replay-{uuid.uuid4().hex[:6]}", "sink_http_port": free_port()})
    start_service("sink", settings_override=replay)
    metrics_url = f"http://127.0.0.1:{replay.sink_http_port}/metrics"
    wait_until(lambda: metric(metrics_url, "site_activity_sink_rows_skipped_total") >= stored, 60, "replay done")
    assert metric(metrics_url, "site_activity_sink_rows_written_total") == 0
    for wid, t in owners.items():
        check_widget(db, console, t, wid)

    # Tenant isolation: Globex's key cannot read Acme's widget, whatever the endpoint.
    for path in ("timeseries", "top-pages", "top-events", "realtime"):
        resp = console.get(
            f"/api/v1/stats/{path}", params={"widget_id": str(acme.widget.id)}, headers=globex.auth("owner")
        )
        assert resp.status_code == 404 and resp.json()["error"] == "not_found", resp.text

    # Retention purge: Acme's site keeps one day; the purge's DELETEs take their counts with them.
    db.execute("UPDATE widget_configs SET event_retention_days = 1 WHERE id = %s", (acme.widget.id,))
    before = check_widget(db, console, acme, acme.widget.id)
    report = purge(postgres.dsn, chunk_rows=7)
    assert sum(w.rows for w in report.widgets if w.widget_id == acme.widget.id) > 0
    assert check_widget(db, console, acme, acme.widget.id) < before
    # Erasure of one visitor of the blog widget, through the console API.
    visitor = db.execute(
        "SELECT visitor_id FROM visitor_events WHERE widget_id = %s LIMIT 1", (acme_blog.id,)
    ).fetchone()[0]
    resp = console.delete(
        f"/api/v1/visitors/{visitor}", params={"widget_id": str(acme_blog.id)}, headers=acme.auth("owner")
    )
    assert resp.status_code == 200 and resp.json()["events_deleted"] > 0, resp.text
    check_widget(db, console, acme, acme_blog.id)
    # Erasure of a contact (every visitor linked to it).
    contact = db.execute(
        "SELECT customer_id FROM visitor_events WHERE widget_id = %s AND customer_id IS NOT NULL LIMIT 1",
        (globex.widget.id,),
    ).fetchone()
    if contact is not None:
        resp = console.delete(f"/api/v1/contacts/{contact[0]}", headers=globex.auth("owner"))
        assert resp.status_code == 200, resp.text
    check_widget(db, console, globex, globex.widget.id)
    # Deleting a widget removes its rollups with its events; the other widgets are untouched.
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        widgets.delete_widget(conn, acme_blog.id, actor="tests")
    for table in (
        "rollup_hourly",
        "rollup_daily",
        "rollup_visitor_hours",
        "rollup_visitor_days",
        "rollup_pages",
        "rollup_pages_daily",
        "rollup_event_names",
    ):
        assert db.execute(f"SELECT count(*) FROM {table} WHERE widget_id = %s", (acme_blog.id,)).fetchone()[0] == 0
    assert (
        console.get(
            "/api/v1/stats/timeseries", params={"widget_id": str(acme_blog.id)}, headers=acme.auth("member")
        ).status_code
        == 404
    )
    check_widget(db, console, acme, acme.widget.id)
    check_widget(db, console, globex, globex.widget.id)
    api.close()
    console.close()


# --- concurrency: writers and deleters on the same hot rollup rows ------------------------------------------------


def test_concurrent_inserts_duplicates_and_deletes_stay_exact(
    postgres: EmbeddedPostgres, make_widget: Callable[..., Any], db: psycopg.Connection
) -> None:
    """Four writers insert overlapping batches (same event ids across writers: duplicates racing), into the
    same hours and visitors, while a fifth deletes rows: no deadlock, and the rollups equal the rows."""
    w = make_widget()
    now = datetime.now(UTC)
    rng = random.Random(5)
    pool = [
        (
            uuid.uuid4(),
            f"v{rng.randint(0, 30)}",
            rng.choice(["pageview", "custom", "session_start"]),
            rng.choice(NAMES),
            rng.choice(PAGES),
            now - timedelta(minutes=rng.randint(0, 600)),
        )
        for _ in range(3000)
    ]
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        r = random.Random(seed)
        try:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                for _ in range(15):
                    # Sorted by event id: racing inserts of the SAME ids in different orders deadlock on the primary key
                    # itself (not a rollup matter; one sink member owns each partition). The rollup keys of the batch
                    # are in random order relative to it.
                    batch = sorted(r.sample(pool, 200))
                    cols = list(
                        zip(
                            *[(e, v, k, n if k == "custom" else None, u, t) for e, v, k, n, u, t in batch], strict=False
                        )
                    )
                    conn.execute(  # one statement per batch, as the sink does
                        "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, name,"
                        " url, occurred_at, received_at) SELECT %s, e, %s, v, k, n, u, t, now()"
                        " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[])"
                        " AS b (e, v, k, n, u, t) ON CONFLICT DO NOTHING",
                        (w.id, w.tenant_id, *map(list, cols)),
                    )
        except BaseException as exc:
            errors.append(exc)

    def deleter() -> None:
        try:
            with psycopg.connect(postgres.dsn, autocommit=True) as conn:
                for i in range(15):
                    conn.execute(
                        "DELETE FROM visitor_events WHERE widget_id = %s AND visitor_id = %s", (w.id, f"v{i * 2}")
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=deleter)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert db.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s", (w.id,)).fetchone()[0] > 0
    assert rollups.mismatches(db, w.id) == []


def test_rollups_off_goes_stale_and_rebuild_repairs(
    postgres: EmbeddedPostgres, make_widget: Callable[..., Any], db: psycopg.Connection
) -> None:
    w = make_widget()
    with psycopg.connect(postgres.dsn, autocommit=True, options="-c site_activity.rollups=off") as off:
        off.execute(
            "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, url,"
            " occurred_at, received_at) SELECT %s, gen_random_uuid(), %s, 'v' || i, 'pageview', '/p', now(),"
            " now() FROM generate_series(1, 5) i",
            (w.id, w.tenant_id),
        )
    assert rollups.mismatches(db, w.id) != []
    env = Settings(postgres_dsn=postgres.dsn)
    check = cli(env, "rollups", "check", "--widget", str(w.id))
    assert check.returncode == 1 and "rollup_hourly" in check.stdout and "rollups rebuild" in check.stdout, check
    rebuilt = cli(env, "rollups", "rebuild", "--widget", str(w.id))
    assert rebuilt.returncode == 0 and "5 events counted" in rebuilt.stdout, rebuilt
    assert cli(env, "rollups", "check", "--widget", str(w.id)).returncode == 0
    counted, _ = rollups.rebuild(db, w.id)
    assert counted == 5 and rollups.mismatches(db, w.id) == []


def test_counted_columns_cannot_change(make_widget: Callable[..., Any], db: psycopg.Connection) -> None:
    w = make_widget()
    db.execute(
        "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, url, occurred_at,"
        " received_at) VALUES (%s, gen_random_uuid(), %s, 'v', 'pageview', '/a', now(), now())",
        (w.id, w.tenant_id),
    )
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        db.execute("UPDATE visitor_events SET url = '/b' WHERE widget_id = %s", (w.id,))
    db.execute("UPDATE visitor_events SET user_id = 'u' WHERE widget_id = %s", (w.id,))  # other columns may change
    assert rollups.mismatches(db, w.id) == []


def test_unique_visitors_of_a_big_range_are_estimated_within_5_percent(
    make_widget: Callable[..., Any], db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past EXACT_UNIQUE_MAX_ROWS visitor-day rows the range's unique count is the KMV estimate (relative
    standard error ~1.6 %): 130,000 events of 100,000 visitors over 4 days."""
    w = make_widget()
    db.execute(
        "INSERT INTO visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, url, occurred_at,"
        " received_at) SELECT %s, gen_random_uuid(), %s, 'visitor-' || (i %% 100000), 'pageview', '/',"
        " date_trunc('day', now(), 'UTC') - ((i %% 4) || ' days')::interval + interval '1 hour', now()"
        " FROM generate_series(0, 129999) i",
        (w.id, w.tenant_id),
    )
    today = datetime.now(UTC).date()
    r = stats.Range(
        stats.parse_time((today - timedelta(days=3)).isoformat(), "from"),
        stats.parse_time((today + timedelta(days=1)).isoformat(), "to"),
        "day",
    )
    body = stats.timeseries(db, w.id, r, ("visitors",))
    assert body["visitors_estimated"] is True
    assert abs(body["totals"]["visitors"] - 100_000) <= 5_000, body["totals"]
    assert [b["visitors"] for b in body["results"]] == [25_000] * 4  # per-day counts stay exact
    one_day = stats.Range(r.start, r.start + timedelta(days=1), "day")  # 25,000 rows: still past the limit
    n, estimated = stats.unique_visitors(db, w.id, one_day)
    assert estimated and abs(n - 25_000) <= 1_250
    monkeypatch.setattr(stats, "EXACT_UNIQUE_MAX_ROWS", 30_000)  # under the limit: the exact count
    assert stats.unique_visitors(db, w.id, one_day) == (25_000, False)


# --- parameters ---------------------------------------------------------------------------------------------------

BAD = [
    ("timeseries", {}, "widget_id is required"),
    ("timeseries", {"interval": "week"}, "interval must be"),
    ("timeseries", {"from": "yesterday"}, "from must be an ISO 8601"),
    ("timeseries", {"to": "2026-13-40"}, "to must be an ISO 8601"),
    ("timeseries", {"from": "2026-11-02", "to": "2026-11-01"}, "from must be before to"),
    ("timeseries", {"from": "2024-01-01", "to": "2026-01-01", "interval": "day"}, "at most 366 day buckets"),
    ("timeseries", {"from": "2026-01-01", "to": "2026-03-01", "interval": "hour"}, "at most 744 hour buckets"),
    ("timeseries", {"metrics": "pageviews,bounces"}, "unknown metric"),
    ("timeseries", {"metrics": ","}, "unknown metric"),
    ("top-pages", {"limit": "0"}, "limit must be"),
    ("top-pages", {"limit": "101"}, "limit must be"),
    ("top-events", {"limit": "ten"}, "limit must be"),
    ("top-events", {"from": "2020-01-01", "to": "2026-01-01"}, "hour buckets"),
]


@pytest.fixture(scope="module")
def acme(postgres: EmbeddedPostgres) -> Tenant:
    return make_tenant(postgres.dsn, "StatsParams")


@pytest.mark.parametrize(("endpoint", "params", "reason"), BAD)
def test_bad_parameters_are_400_with_a_reason(
    console: httpx.Client, acme: Tenant, endpoint: str, params: dict[str, str], reason: str
) -> None:
    query = {"widget_id": str(acme.widget.id), **params} if endpoint != "timeseries" or params else {}
    resp = console.get(f"/api/v1/stats/{endpoint}", params=query, headers=acme.auth("member"))
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_request" and reason in resp.json()["reason"], resp.json()


@pytest.mark.parametrize("widget_id", ["not-a-uuid", "7d1f2a4e-0c3b-4e8a-9a51-2f64b0c8d3e1"])
def test_unknown_widget_is_404_and_missing_key_401(console: httpx.Client, acme: Tenant, widget_id: str) -> None:
    for endpoint in ("timeseries", "top-pages", "top-events", "realtime"):
        resp = console.get(f"/api/v1/stats/{endpoint}", params={"widget_id": widget_id}, headers=acme.auth("member"))
        assert resp.status_code == 404, resp.text
        assert console.get(f"/api/v1/stats/{endpoint}", params={"widget_id": widget_id}).status_code == 401


def test_empty_widget_has_zero_filled_buckets(console: httpx.Client, acme: Tenant) -> None:
    body = get_ok(
        console,
        acme,
        "/api/v1/stats/timeseries",
        widget_id=acme.widget.id,
        **{"from": "2026-01-01T10:30:00Z", "to": "2026-01-02T00:00:00+02:00", "interval": "hour"},
    )
    assert body["from"] == "2026-01-01T10:00:00Z" and body["to"] == "2026-01-01T22:00:00Z"
    assert len(body["results"]) == 12 and all(b["pageviews"] == 0 for b in body["results"])
    assert body["totals"] == {"pageviews": 0, "visitors": 0, "sessions": 0}


# --- pure logic -----------------------------------------------------------------------------------------------------


def test_ranges_align_to_the_interval_in_utc() -> None:
    now = datetime(2026, 11, 30, 12, 34, 56, tzinfo=UTC)
    r = stats.parse_range(None, None, None, now=now)
    assert (r.start, r.end, r.interval) == (
        datetime(2026, 11, 23, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
        "day",
    )
    r = stats.parse_range("2026-11-30T01:15:00+01:00", "2026-11-30T03:00:00Z", None, now=now)
    assert (r.start, r.end, r.interval) == (
        datetime(2026, 11, 30, 0, tzinfo=UTC),
        datetime(2026, 11, 30, 3, tzinfo=UTC),
        "hour",
    )
    assert len(r.buckets()) == 3
    assert stats.parse_time("2026-11-30T10:00:00", "from") == datetime(2026, 11, 30, 10, tzinfo=UTC)  # naive = UTC


def test_dashboard_ranges() -> None:
    today = date(2026, 11, 30)
    assert page_range("today", None, None, today).interval == "hour"
    r = page_range("30d", None, None, today)
    assert (r.start.date(), r.end.date(), len(r.buckets())) == (date(2026, 11, 1), date(2026, 12, 1), 30)
    r = page_range("custom", "2026-11-02", "2026-11-02", today)
    assert (len(r.buckets()), r.interval) == (24, "hour")
    with pytest.raises(ConsoleError):
        page_range("custom", "2026-11-03", "2026-11-02", today)
    with pytest.raises(ConsoleError):
        page_range("year", None, None, today)


@pytest.mark.parametrize("url", PAGES + [None, "/relative/path?x", "https://x.example/a/b/#frag", ""])
def test_page_is_the_url_path(db: psycopg.Connection, url: str | None) -> None:
    expected = "/" if url == "" else page_of(url)
    assert db.execute("SELECT rollup_page(%s)", (url,)).fetchone()[0] == expected
