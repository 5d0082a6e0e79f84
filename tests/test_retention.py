"""Retention: `site-activity purge` removes exactly the events older than each widget's retention, and events
that arrive already that old are never stored."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from dev_stack.embedded import wait_until
from site_activity import widgets
from site_activity.retention import WidgetPurge, _Pace, purge
from site_activity.settings import Settings
from tests.conftest import Service, iso, wait_for_rows
from tests.console_helpers import cli


def seed(
    conn: psycopg.Connection, widget: widgets.Widget, n: int, age: timedelta, visitor: str = "v"
) -> list[uuid.UUID]:
    """n events of the widget, `age` ago (a second apart), written straight into the table."""
    ids = [uuid.uuid4() for _ in range(n)]
    at = datetime.now(UTC) - age
    with conn.cursor().copy(
        "COPY visitor_events (widget_id, event_id, tenant_id, visitor_id, event_type, url,"
        " occurred_at, received_at) FROM STDIN"
    ) as copy:
        for i, event_id in enumerate(ids):
            copy.write_row(
                (
                    widget.id,
                    event_id,
                    widget.tenant_id,
                    f"{visitor}-{i % 3}",
                    "pageview",
                    "https://shop.example/",
                    at - timedelta(seconds=i),
                    at,
                )
            )
    return ids


def stored(conn: psycopg.Connection, widget: widgets.Widget) -> set[uuid.UUID]:
    return {r[0] for r in conn.execute("SELECT event_id FROM visitor_events WHERE widget_id = %s", (widget.id,))}


def test_purge_removes_exactly_the_expired_events(
    settings: Settings, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    short, default, year = make_widget(name="short"), make_widget(name="default"), make_widget(name="year")
    widgets.set_retention(db, short.id, 7, actor="tests")
    widgets.set_retention(db, year.id, 365, actor="tests")
    old = seed(db, short, 7, timedelta(days=30))
    edge_old = seed(db, short, 1, timedelta(days=7, minutes=5))  # just past the cutoff
    today = seed(db, short, 5, timedelta(hours=1))
    edge_new = seed(db, short, 1, timedelta(days=6, hours=23))  # just inside it
    default_kept = seed(db, default, 4, timedelta(days=30)) + seed(db, default, 2, timedelta(days=89))
    default_old = seed(db, default, 3, timedelta(days=91))
    year_kept = seed(db, year, 3, timedelta(days=364))
    year_old = seed(db, year, 2, timedelta(days=400))

    dry = cli(settings, "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert re.search(rf"{short.id}.*\bshort\b.*\b8\b", dry.stdout), dry.stdout
    assert stored(db, short) == set(old + edge_old + today + edge_new)  # a dry run deletes nothing
    assert stored(db, default) == set(default_kept + default_old)
    assert stored(db, year) == set(year_kept + year_old)
    assert re.search(rf"{default.id}.*\bdefault\b.*\b3\b", dry.stdout), dry.stdout
    assert re.search(rf"{year.id}.*\byear\b.*\b2\b", dry.stdout), dry.stdout

    # Several chunks per widget; unpaced (duty cycle 1): the shared test database holds every test's widgets,
    # and the pacing itself is tested on its own below.
    done = cli(settings.model_copy(update={"purge_duty_cycle": 1.0}), "purge", "--chunk-rows", "3")
    assert done.returncode == 0, done.stderr
    assert stored(db, short) == set(today + edge_new)
    assert stored(db, default) == set(default_kept)  # default_old (91 days) went
    assert stored(db, year) == set(year_kept)  # year_old (400 days) went
    gone = default_old + year_old + old + edge_old
    assert db.execute("SELECT count(*) FROM visitor_events WHERE event_id = ANY(%s)", (gone,)).fetchone()[0] == 0
    assert re.search(rf"{short.id}.*\bshort\b.*\b8\b", done.stdout) and "removed" in done.stdout
    summary = [json.loads(line) for line in done.stderr.splitlines() if '"purge finished"' in line]
    assert len(summary) == 1 and summary[0]["rows"] >= 13 and summary[0]["widgets"] >= 3  # the summary log line
    # A second run finds nothing more to remove.
    again = purge(settings.postgres_dsn, chunk_rows=3)
    assert {w.widget_id: w.rows for w in again.widgets if w.widget_id in (short.id, default.id, year.id)} == {
        short.id: 0,
        default.id: 0,
        year.id: 0,
    }


def test_shortening_retention_takes_effect_at_the_next_purge(
    settings: Settings, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    month_old = seed(db, w, 4, timedelta(days=30))
    recent = seed(db, w, 2, timedelta(days=1, hours=1))
    purge(settings.postgres_dsn)
    assert stored(db, w) == set(month_old + recent)  # 90 days: nothing expired
    widgets.set_retention(db, w.id, 1, actor="tests")
    purge(settings.postgres_dsn)
    assert stored(db, w) == set()
    # Lengthening keeps only what has not been purged yet.
    widgets.set_retention(db, w.id, 365, actor="tests")
    assert stored(db, w) == set()


def test_events_already_past_retention_are_not_stored(
    settings: Settings,
    db: psycopg.Connection,
    make_widget: Callable[..., widgets.Widget],
    start_service: Callable[..., Service],
    api_url: str,
) -> None:
    w = make_widget()
    widgets.set_retention(db, w.id, 7, actor="tests")
    start_service("sink")
    start_service("processors")
    start_service("api")
    now = datetime.now(UTC)

    def event(age: timedelta) -> dict[str, str]:
        return {
            "event_id": str(uuid.uuid4()),
            "type": "pageview",
            "url": "https://shop.example/",
            "occurred_at": iso(now - age),
        }

    old = [event(timedelta(days=30)), event(timedelta(days=8))]
    fresh = [event(timedelta(days=6)), event(timedelta(seconds=1))]
    # The late one arrives after a purge has run: the purge cannot help; the sink must not store it.
    purge(settings.postgres_dsn)
    with httpx.Client(base_url=api_url, timeout=10) as api:
        resp = api.post(
            "/api/widget/track",
            json={"widget_id": str(w.id), "visitor_id": "late-visitor", "sent_at": iso(now), "events": [*old, *fresh]},
        )
        assert resp.status_code == 204, resp.text  # accepted: the API does not know retention; nothing to retry
    rows = wait_for_rows(
        db, "SELECT event_id FROM visitor_events WHERE widget_id = %s AND event_type = 'pageview'", (w.id,), 2
    )
    assert {str(r[0]) for r in rows} == {e["event_id"] for e in fresh}
    # The session_start the processors derived for the 30-day-old event is just as old: not stored either.
    assert db.execute(
        "SELECT count(*) FROM visitor_events WHERE widget_id = %s AND occurred_at < now() - interval '7 days'", (w.id,)
    ).fetchone() == (0,)

    def expired_metric() -> float:
        text = httpx.get(f"http://127.0.0.1:{settings.sink_http_port}/metrics").text
        match = re.search(r"^site_activity_sink_rows_expired_total (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    deadline = time.monotonic() + 10
    while expired_metric() < 2:
        assert time.monotonic() < deadline, f"rows_expired stayed at {expired_metric()}"
        time.sleep(0.2)


def test_purge_validates_its_chunk_size_and_duty_cycle(settings: Settings) -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        purge(settings.postgres_dsn, chunk_rows=0)
    for duty in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="duty_cycle"):
            purge(settings.postgres_dsn, duty_cycle=duty)
    with pytest.raises(ValueError, match="purge_duty_cycle"):
        Settings(purge_duty_cycle=0)


class _RecordingStop(threading.Event):
    """A stop event that records how long the purge asked to rest (and does not really sleep)."""

    def __init__(self) -> None:
        super().__init__()
        self.rests: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.rests.append(float(timeout or 0.0))
        return self.is_set()


def test_purge_rests_between_chunks_in_proportion_to_its_duty_cycle() -> None:
    """At duty cycle d, a chunk that took t seconds is followed by a rest of t·(1 − d)/d."""
    stop = _RecordingStop()
    pace = _Pace(0.25, stop)
    assert pace.after_chunk(0.2) and pace.after_chunk(0.04)
    assert stop.rests == pytest.approx([0.6, 0.12])
    unpaced = _Pace(1.0, _RecordingStop())
    assert unpaced.after_chunk(0.5) and unpaced.stop.rests == []  # type: ignore[attr-defined]


def test_a_stopped_purge_ends_after_its_current_chunk_and_the_next_run_finishes(
    settings: Settings, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget]
) -> None:
    w = make_widget()
    widgets.set_retention(db, w.id, 7, actor="tests")
    old = seed(db, w, 9, timedelta(days=30))
    fresh = seed(db, w, 2, timedelta(hours=1))
    stop = threading.Event()

    def stop_after_first_chunk(widget: WidgetPurge, done: bool) -> None:
        if widget.widget_id == w.id and not done:
            stop.set()

    first = purge(settings.postgres_dsn, chunk_rows=3, duty_cycle=0.5, stop=stop, on_progress=stop_after_first_chunk)
    assert next(x for x in first.widgets if x.widget_id == w.id).rows == 3
    assert len(stored(db, w) & set(old)) == 6  # the rest waits for the next run
    purge(settings.postgres_dsn, chunk_rows=3, duty_cycle=0.5)
    assert stored(db, w) == set(fresh)


def test_purge_loop_runs_on_schedule_and_stops_on_sigterm(
    settings: Settings, db: psycopg.Connection, make_widget: Callable[..., widgets.Widget], tmp_path: Path
) -> None:
    """`purge --loop` (the compose service): purges at start and again every interval; SIGTERM ends it cleanly."""
    w = make_widget()
    widgets.set_retention(db, w.id, 7, actor="tests")
    s = settings.model_copy(update={"purge_interval_s": 1.0})
    log = open(tmp_path / "purge.log", "wb")  # written by the child until it is stopped below  # noqa: SIM115
    loop = subprocess.Popen(
        [sys.executable, "-m", "command_line", "purge", "--loop"],
        env={**os.environ, **s.to_env()},
        stdout=log,
        stderr=log,
    )
    try:
        seed(db, w, 3, timedelta(days=30))
        wait_until(lambda: not stored(db, w), 20, "first purge")
        later = seed(db, w, 2, timedelta(days=8))  # expired rows that appear after the first run
        kept = seed(db, w, 2, timedelta(days=1))
        wait_until(lambda: stored(db, w) == set(kept), 20, "a later scheduled purge")
        assert later
        loop.send_signal(signal.SIGTERM)
        assert loop.wait(20) == 0
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait(10)
        log.close()
