"""Dashboard benchmark: the /api/v1/stats calls on rollups against the same numbers from a plain scan of
visitor_events, and the sink's write rate with rollups on and off, all in one run.

    .venv/bin/python bench/bench_dashboard.py                                   # 5,000,000 events (README row)
    .venv/bin/python bench/bench_dashboard.py --events 200000 --sink-events 50000   # smoke test, a few minutes

Own embedded Postgres + the configured embedded broker on free ports in a temp dir, stopped at the end;
127.0.0.1 only.

1. Seed: one widget with --events events over the last 30 days (binary COPY straight into visitor_events with
   the rollup triggers switched off for the session, `SET site_activity.rollups = off`), then the rollups are
   built by rollups_rebuild() — the SQL of `site-activity rollups rebuild` and of migration 0006's backfill.
   Traffic: sessions of 1-15 events (pageviews, custom events from 20 names, some identifies) by visitors of
   whom 30 % return, on 300 pages with query strings, more traffic on weekdays and in daytime.
2. Dashboard: a real `site-activity console` process; for 24 h (hourly), 7 d and 30 d (daily): p95 of each
   call (timeseries pageviews+visitors+sessions, top pages, top events) and of the three in a row, over
   --iterations runs; next to it the same numbers by plain SQL over visitor_events (checked equal).
3. Sink: --sink-events fresh events (bench/workload.py's mix) are produced to the raw topic and drained by a
   `site-activity sink`, three times, each into its own widget: rollups on; `sink_rollups=false` (the
   triggers skip their work); and the insert trigger disabled (no rollup work at all: the true baseline);
   --rounds times, interleaved, median per phase.
   Target: rollups on keeps >= 80 % of the baseline's rows/s.

Writes bench/results/dashboard.json and prints a markdown table for the README.

EXTRA_ENDPOINTS (below) times the read API's "visitor timeline" and "page of events" the same way, with
their own p95 target (50 ms), reported as extra rows."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_purge import produce, running_sink, say, stack  # noqa: E402
from bench.harness import report  # noqa: E402
from bench.workload import EVENTS_PER_BODY  # noqa: E402
from console import accounts  # noqa: E402
from dev_stack.embedded import free_port, wait_until  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from site_activity import widgets  # noqa: E402
from site_activity.settings import Settings  # noqa: E402

SPAN_DAYS = 30
API_P95_TARGET_MS = 100.0
SINK_KEPT_TARGET = 0.8
PAGES = [
    f"https://shop.example.com/{section}/{i}"
    for section in ("docs", "blog", "product", "help", "pricing", "app")
    for i in range(50)
]
NAMES = [
    "signup",
    "download",
    "play_video",
    "add_to_cart",
    "checkout",
    "search",
    "share",
    "subscribe",
    "open_chat",
    "close_chat",
    "upgrade",
    "invite",
    "export",
    "filter",
    "sort",
    "login",
    "logout",
    "rate",
    "comment",
    "bookmark",
]


# --- HOOK: more endpoints to time (read API helper's endpoints, after merging) ---------------------------------
@dataclass
class Extra:
    """One more timed call: `request(ctx)` returns (path, params) for the console; ctx has widget_id, visitor_id
    (a visitor with many events), customer_id (or None)."""

    label: str
    request: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
    p95_target_ms: float = 50.0


EXTRA_ENDPOINTS: list[Extra] = [
    Extra(
        "visitor timeline", lambda c: (f"/api/v1/visitors/{c['visitor_id']}/timeline", {"widget_id": c["widget_id"]})
    ),
    Extra("page of events (100)", lambda c: ("/api/v1/events", {"widget_id": c["widget_id"], "limit": 100})),
]


# --- seeding -----------------------------------------------------------------------------------------------------
def seed(dsn: str, w: widgets.Widget, events: int, now: datetime) -> dict[str, Any]:
    rng = random.Random(11)
    span_s = SPAN_DAYS * 86_400
    visitors: list[str] = []
    columns = "widget_id, event_id, tenant_id, visitor_id, event_type, name, url, user_id, occurred_at, received_at"
    written = 0
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True, options="-c site_activity.rollups=off") as conn:
        while written < events:
            with (
                conn.transaction(),
                conn.cursor().copy(f"COPY visitor_events ({columns}) FROM STDIN (FORMAT BINARY)") as cp,
            ):
                cp.set_types(
                    ["uuid", "uuid", "uuid", "text", "text", "text", "text", "text", "timestamptz", "timestamptz"]
                )
                chunk_end = min(events, written + 200_000)
                while written < chunk_end:
                    if visitors and rng.random() < 0.3:
                        visitor = rng.choice(visitors)
                    else:
                        visitor = f"v_{rng.getrandbits(64):016x}"
                        visitors.append(visitor)
                    while True:  # weekdays and daytime (UTC) get more sessions
                        at = now - timedelta(seconds=rng.randrange(span_s))
                        if rng.random() < (0.5 if at.weekday() >= 5 else 1.0) * (1.0 if 7 <= at.hour < 22 else 0.35):
                            break
                    n = min(rng.randint(1, 15), chunk_end - written)
                    rows: list[tuple[str, str | None, str | None, str | None]] = [
                        ("session_start", None, rng.choice(PAGES), None)
                    ]
                    for _ in range(n - 1):
                        r = rng.random()
                        if r < 0.78:
                            rows.append(("pageview", None, f"{rng.choice(PAGES)}?ref={rng.randrange(5)}", None))
                        elif r < 0.97:
                            rows.append(("custom", rng.choice(NAMES), None, None))
                        else:
                            rows.append(("identify", None, None, f"user-{visitor}"))
                    for i, (kind, name, url, user) in enumerate(rows):
                        t = at + timedelta(seconds=20 * i)
                        cp.write_row(
                            (
                                w.id,
                                uuid.UUID(int=rng.getrandbits(128), version=4),
                                w.tenant_id,
                                visitor,
                                kind,
                                name,
                                url,
                                user,
                                t,
                                t,
                            )
                        )
                    written += len(rows)
            say(f"  seeded {written:,} / {events:,} events")
        copy_s = time.perf_counter() - t0
        conn.execute("VACUUM ANALYZE visitor_events")
        t1 = time.perf_counter()
        with conn.transaction():
            counted = conn.execute("SELECT rollups_rebuild(%s)", (w.id,)).fetchone()[0]
        rebuild_s = time.perf_counter() - t1
        for table in (
            "rollup_hourly",
            "rollup_daily",
            "rollup_visitor_hours",
            "rollup_visitor_days",
            "rollup_pages",
            "rollup_event_names",
        ):
            conn.execute(f"VACUUM ANALYZE {table}")
        sizes = {
            t: conn.execute(f"SELECT count(*) FROM {t} WHERE widget_id = %s", (w.id,)).fetchone()[0]
            for t in ("rollup_hourly", "rollup_visitor_hours", "rollup_visitor_days", "rollup_pages")
        }
        conn.execute("CHECKPOINT")
    assert counted == written, (counted, written)
    return {
        "events": written,
        "visitors": len(visitors),
        "copy_seconds": round(copy_s, 1),
        "rebuild_seconds": round(rebuild_s, 1),
        "rollup_rows": sizes,
    }


# --- the dashboard calls, and the same numbers by a scan ----------------------------------------------------------
def ranges(now: datetime) -> dict[str, dict[str, str]]:
    today = now.date()
    hour = now.replace(minute=0, second=0, microsecond=0)
    return {
        "24 h": {
            "from": (hour - timedelta(hours=23)).isoformat(),
            "to": (hour + timedelta(hours=1)).isoformat(),
            "interval": "hour",
        },
        "7 d": {
            "from": (today - timedelta(days=6)).isoformat(),
            "to": (today + timedelta(days=1)).isoformat(),
            "interval": "day",
        },
        "30 d": {
            "from": (today - timedelta(days=29)).isoformat(),
            "to": (today + timedelta(days=1)).isoformat(),
            "interval": "day",
        },
    }


def dashboard_calls(client: httpx.Client, widget_id: str, r: dict[str, str]) -> tuple[dict[str, float], dict[str, Any]]:
    """The page's three API calls in a row: per-call ms and the bodies."""
    window = {"widget_id": widget_id, "from": r["from"], "to": r["to"]}
    calls: dict[str, tuple[str, dict[str, Any]]] = {
        "timeseries": (
            "/api/v1/stats/timeseries",
            {**window, "interval": r["interval"], "metrics": "pageviews,visitors,sessions"},
        ),
        "top pages": ("/api/v1/stats/top-pages", {**window, "limit": 10}),
        "top events": ("/api/v1/stats/top-events", {**window, "limit": 10}),
    }
    ms, bodies = {}, {}
    for name, (path, params) in calls.items():
        t = time.perf_counter()
        resp = client.get(path, params=params)
        ms[name] = (time.perf_counter() - t) * 1000
        resp.raise_for_status()
        bodies[name] = resp.json()
    return ms, bodies


_SCAN_SERIES = """
SELECT date_trunc(%(unit)s, occurred_at, 'UTC') AS t, count(*) FILTER (WHERE event_type = 'pageview'),
       count(DISTINCT visitor_id), count(*) FILTER (WHERE event_type = 'session_start')
FROM visitor_events WHERE widget_id = %(w)s AND occurred_at >= %(a)s AND occurred_at < %(b)s GROUP BY 1 ORDER BY 1"""
_SCAN_TOTALS = """
SELECT count(*) FILTER (WHERE event_type = 'pageview'), count(DISTINCT visitor_id),
       count(*) FILTER (WHERE event_type = 'session_start')
FROM visitor_events WHERE widget_id = %(w)s AND occurred_at >= %(a)s AND occurred_at < %(b)s"""
_SCAN_PAGES = """
SELECT rollup_page(url) AS page, count(*) AS n FROM visitor_events
WHERE widget_id = %(w)s AND event_type = 'pageview' AND occurred_at >= %(a)s AND occurred_at < %(b)s
GROUP BY 1 ORDER BY n DESC, page LIMIT 10"""
_SCAN_EVENTS = """
SELECT name, count(*) AS n FROM visitor_events
WHERE widget_id = %(w)s AND event_type = 'custom' AND occurred_at >= %(a)s AND occurred_at < %(b)s
GROUP BY 1 ORDER BY n DESC, name LIMIT 10"""


def scan(conn: psycopg.Connection, widget_id: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The same numbers as the API bodies, by plain SQL over visitor_events: (ms, numbers)."""
    p = {"w": widget_id, "a": body["from"], "b": body["to"], "unit": body["interval"]}
    t = time.perf_counter()
    series = conn.execute(_SCAN_SERIES, p).fetchall()
    totals = conn.execute(_SCAN_TOTALS, p).fetchone()
    pages = conn.execute(_SCAN_PAGES, p).fetchall()
    names = conn.execute(_SCAN_EVENTS, p).fetchall()
    ms = (time.perf_counter() - t) * 1000
    return ms, {
        "series": {s[0].astimezone(UTC).isoformat().replace("+00:00", "Z"): list(s[1:]) for s in series},
        "totals": list(totals) if totals else [],
        "pages": [list(x) for x in pages],
        "names": [list(x) for x in names],
    }


def same_numbers(bodies: dict[str, Any], scanned: dict[str, Any]) -> tuple[bool, float]:
    """(every number equal, relative error of totals.visitors). When the API says visitors_estimated (KMV), the
    range's unique visitors may differ by the estimate's error (README); it passes within 5 %."""
    ts = bodies["timeseries"]
    api_series = {
        b["time"]: [b["pageviews"], b["visitors"], b["sessions"]]
        for b in ts["results"]
        if b["pageviews"] or b["visitors"] or b["sessions"]
    }
    api_totals = [ts["totals"][m] for m in ("pageviews", "visitors", "sessions")]
    exact_visitors = scanned["totals"][1]
    error = abs(api_totals[1] - exact_visitors) / exact_visitors if exact_visitors else 0.0
    visitors_ok = error <= 0.05 if ts.get("visitors_estimated") else api_totals[1] == exact_visitors
    return (
        api_series == scanned["series"]
        and api_totals[0] == scanned["totals"][0]
        and api_totals[2] == scanned["totals"][2]
        and visitors_ok
        and [[p["page"], p["pageviews"]] for p in bodies["top pages"]["results"]] == scanned["pages"]
        and [[e["name"], e["events"]] for e in bodies["top events"]["results"]] == scanned["names"]
    ), error


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(0.95 * len(ordered)) - 1))]


def measure_dashboard(
    settings: Settings, dsn: str, w: widgets.Widget, secret: str, iterations: int, scans: int, workdir: Path
) -> dict[str, Any]:
    console = StageProcess("console", settings, workdir / "console.log")
    console.start()
    out: dict[str, Any] = {}
    try:
        base = f"http://127.0.0.1:{settings.console_port}"
        wait_until(lambda: _ok(f"{base}/healthz"), 60, "console", interval=0.2)
        with (
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as client,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            for label, r in ranges(datetime.now(UTC)).items():
                dashboard_calls(client, str(w.id), r)  # warm-up
                per_call: dict[str, list[float]] = {}
                loads: list[float] = []
                bodies: dict[str, Any] = {}
                for _ in range(iterations):
                    ms, bodies = dashboard_calls(client, str(w.id), r)
                    for k, v in ms.items():
                        per_call.setdefault(k, []).append(v)
                    loads.append(sum(ms.values()))
                scan_ms: list[float] = []
                scanned: dict[str, Any] = {}
                for _ in range(scans):
                    ms_, scanned = scan(conn, str(w.id), bodies["timeseries"])
                    scan_ms.append(ms_)
                equal, visitors_error = same_numbers(bodies, scanned)
                out[label] = {
                    "iterations": iterations,
                    "p95_ms": {k: round(p95(v), 1) for k, v in per_call.items()},
                    "load_p95_ms": round(p95(loads), 1),
                    "load_median_ms": round(statistics.median(loads), 1),
                    "scan_runs": scans,
                    "scan_p95_ms": round(p95(scan_ms), 1),
                    "scan_median_ms": round(statistics.median(scan_ms), 1),
                    "same_numbers": equal,
                    "pageviews": bodies["timeseries"]["totals"]["pageviews"],
                    "visitors": bodies["timeseries"]["totals"]["visitors"],
                    "visitors_estimated": bodies["timeseries"].get("visitors_estimated"),
                    "visitors_error": round(visitors_error, 4),
                }
                say(
                    f"  {label}: dashboard p95 {out[label]['load_p95_ms']} ms (calls {out[label]['p95_ms']}), "
                    f"scan p95 {out[label]['scan_p95_ms']} ms, same numbers: {equal}"
                )
            if EXTRA_ENDPOINTS:
                ctx = extra_context(conn, w)
                for extra in EXTRA_ENDPOINTS:
                    path, params = extra.request(ctx)
                    times = []
                    for _ in range(iterations + 1):
                        t = time.perf_counter()
                        client.get(path, params=params).raise_for_status()
                        times.append((time.perf_counter() - t) * 1000)
                    out.setdefault("extra", {})[extra.label] = {
                        "p95_ms": round(p95(times[1:]), 1),
                        "target_ms": extra.p95_target_ms,
                    }
    finally:
        console.stop()
    return out


def extra_context(conn: psycopg.Connection, w: widgets.Widget) -> dict[str, Any]:
    visitor = conn.execute(
        "SELECT visitor_id FROM rollup_visitor_days WHERE widget_id = %s GROUP BY 1 ORDER BY sum(events) DESC LIMIT 1",
        (w.id,),
    ).fetchone()
    customer = conn.execute(
        "SELECT customer_id FROM visitor_events WHERE widget_id = %s AND customer_id IS NOT NULL LIMIT 1", (w.id,)
    ).fetchone()
    return {
        "widget_id": str(w.id),
        "visitor_id": visitor[0] if visitor else None,
        "customer_id": str(customer[0]) if customer else None,
    }


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- the sink with rollups on and off -------------------------------------------------------------------------------
def measure_sink(settings: Settings, dsn: str, events: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Each phase `rounds` times, interleaved (on, off, none, on, off, none, ...), each drain into a fresh widget;
    the median rate per phase, so a burst of other load on the machine does not decide the ratio."""
    # The baseline switches off every trigger that derives a table from visitor_events: the rollups' and the
    # visitor summaries' (the visitor browser's per-visitor counts, migration 0007).
    phases = {"rollups on": (True, True), "sink_rollups=false": (False, True), "no rollup trigger": (True, False)}
    insert_triggers = ("visitor_events_rollups_insert", "visitor_summaries_on_insert")
    rates: dict[str, list[float]] = {label: [] for label in phases}
    run = 0
    for _ in range(rounds):
        for label, (setting, trigger) in phases.items():
            run += 1
            with psycopg.connect(dsn, autocommit=True) as conn:
                w = widgets.create_widget(conn, name=f"bench sink {label} {run}", actor="bench", tracking_enabled=True)
                for name in insert_triggers:
                    conn.execute(f"ALTER TABLE visitor_events {'ENABLE' if trigger else 'DISABLE'} TRIGGER {name}")
            try:
                say(f"sink, {label} (run {run}): producing {events:,} events, then the sink drains them")
                produce(settings, w, events, seed=100 + run)
                s = settings.model_copy(update={"sink_rollups": setting, "sink_group": f"bench-dash-sink-{run}"})
                with running_sink(s, workdir / f"sink-{run}.log") as meter:
                    t0 = time.monotonic()
                    meter.wait_for(events, timeout=max(120.0, events / 500))
                    rate, seconds = meter.rate(t0, time.monotonic())
            finally:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    for name in insert_triggers:
                        conn.execute(f"ALTER TABLE visitor_events ENABLE TRIGGER {name}")
            rates[label].append(rate)
            say(f"  {label}: {rate:,.0f} rows/s over {seconds:.1f} s")
    out: dict[str, Any] = {label: {"rows_per_s": statistics.median(r), "runs": r} for label, r in rates.items()}
    base = out["no rollup trigger"]["rows_per_s"]
    out["kept"] = out["rollups on"]["rows_per_s"] / base if base else None
    return out


# --- report ---------------------------------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    n = res["seed"]["events"]
    for label, d in res["dashboard"].items():
        if label == "extra":
            continue
        worst = max(d["p95_ms"].values())  # the target is per API call; the page makes the three in a row
        ok = worst <= API_P95_TARGET_MS and d["same_numbers"]
        calls = ", ".join(f"{k} {v:.0f}" for k, v in d["p95_ms"].items())
        rows.append(
            (
                f"dashboard API, {label} ({n:,} events / 30 d)",
                f"p95 per call: {calls} ms; all three in a row p95 {d['load_p95_ms']:.0f} ms",
                f"plain scan of visitor_events, same numbers: p95 {d['scan_p95_ms']:,.0f} ms"
                + (f" (unique visitors estimated, {d['visitors_error']:.1%} off)" if d["visitors_estimated"] else "")
                + ("" if d["same_numbers"] else " — NUMBERS DIFFER"),
                f"{'PASS' if ok else 'FAIL'} (each call <= {API_P95_TARGET_MS:.0f} ms, same numbers)",
            )
        )
    for label, d in res["dashboard"].get("extra", {}).items():
        rows.append(
            (
                label,
                f"p95 {d['p95_ms']:.0f} ms",
                "-",
                f"{'PASS' if d['p95_ms'] <= d['target_ms'] else 'FAIL'} (<= {d['target_ms']:.0f} ms)",
            )
        )
    s = res["sink"]
    rows.append(
        (
            "sink rows/s with rollups on (median of interleaved runs)",
            f"{s['rollups on']['rows_per_s']:,.0f} rows/s",
            f"{s['no rollup trigger']['rows_per_s']:,.0f} rows/s without (same run); "
            f"sink_rollups=false {s['sink_rollups=false']['rows_per_s']:,.0f}",
            f"{s['kept']:.0%} ({'PASS' if s['kept'] >= SINK_KEPT_TARGET else 'FAIL'} >= {SINK_KEPT_TARGET:.0%})",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=5_000_000, help="events seeded over 30 days (default 5,000,000)")
    p.add_argument("--sink-events", type=int, default=500_000, help="fresh events the sink writes per phase")
    p.add_argument("--iterations", type=int, default=50, help="dashboard loads timed per range")
    p.add_argument("--scans", type=int, default=5, help="plain-scan runs per range")
    p.add_argument("--rounds", type=int, default=2, help="sink drains per phase (interleaved; median reported)")
    args = p.parse_args(argv)
    sink_events = args.sink_events - args.sink_events % EVENTS_PER_BODY
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp, stack(Path(tmp)) as (pg, settings):
        # The benchmark times the API itself: one key's requests far beyond the per-key rate limit are its load.
        settings = settings.model_copy(
            update={
                "console_port": free_port(),
                "topic_prefix": "bench-dash",
                "console_api_rate_limit_per_min": 1_000_000,
            }
        )
        from site_activity.kafka import ensure_topics

        ensure_topics(settings)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            w = widgets.create_widget(conn, name="bench dashboard", actor="bench", tracking_enabled=True)
            accounts.add_member(conn, w.tenant_id, "bench@example.com", "member", actor="bench")
            _, secret = accounts.create_key(conn, w.tenant_id, "bench@example.com", "bench", actor="bench")
        say(f"seeding {args.events:,} events over {SPAN_DAYS} days")
        seeded = seed(pg.dsn, w, args.events, datetime.now(UTC))
        say(f"  {seeded}")
        dashboard = measure_dashboard(settings, pg.dsn, w, secret, args.iterations, args.scans, Path(tmp))
        sink = measure_sink(settings, pg.dsn, sink_events, args.rounds, Path(tmp))
    res = {
        "seed": seeded,
        "dashboard": dashboard,
        "sink": {**sink, "events_per_phase": sink_events},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return report("dashboard", res, ("row", "measured", "same-run baseline", "verdict"), table(res), 3)


if __name__ == "__main__":
    sys.exit(main())
