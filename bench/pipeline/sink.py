"""Sink: rows/s from a preloaded raw topic into visitor_events, next to a bare binary COPY of the same rows."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.harness import Row, bare_produce, say, verdict
from bench.pipeline.stack import Profile, Stack
from bench.workload import (
    COPY_COLUMNS,
    EVENTS_PER_BODY,
    JsonText,
    JsonTextBinaryDumper,
    copy_row,
    encoded_requests,
    make_bodies,
    to_records,
)
from dev_stack.process import StageProcess
from site_activity.topics import Topics

SINK_TARGET_RATIO = 0.5


def bare_copy(dsn: str, rows: list[tuple[Any, ...]], batch: int = 10_000, foreign_keys: bool = True) -> dict[str, Any]:
    """The limit for the sink: binary COPY of the same rows into an empty copy of visitor_events.

    LIKE … INCLUDING ALL copies columns, checks, the primary key and the indexes but not the foreign keys;
    with `foreign_keys` they are added too, so the copy checks exactly what visitor_events checks."""
    cols = ", ".join(COPY_COLUMNS)
    with psycopg.connect(dsn) as conn:
        conn.adapters.register_dumper(JsonText, JsonTextBinaryDumper)
        conn.execute("DROP TABLE IF EXISTS bench_copy")
        conn.execute("CREATE TABLE bench_copy (LIKE visitor_events INCLUDING ALL)")
        if foreign_keys:
            conn.execute(
                "ALTER TABLE bench_copy"
                " ADD FOREIGN KEY (widget_id) REFERENCES widget_configs (id) ON DELETE CASCADE,"
                " ADD FOREIGN KEY (customer_id) REFERENCES customers (id) ON DELETE SET NULL"
            )
        conn.commit()
        start = time.perf_counter()
        for at in range(0, len(rows), batch):
            with conn.cursor() as cur, cur.copy(f"COPY bench_copy ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                for row in rows[at : at + batch]:
                    copy.write_row(row)
            conn.commit()
        elapsed = time.perf_counter() - start
        count = conn.execute("SELECT count(*) FROM bench_copy").fetchone()[0]
        conn.execute("DROP TABLE bench_copy")
        conn.commit()
    if count != len(rows):
        raise RuntimeError(f"bare COPY wrote {count} rows, expected {len(rows)}")
    return {"rows": len(rows), "seconds": round(elapsed, 3), "rows_per_s": len(rows) / elapsed, "batch": batch}


def section_sink(stack: Stack, prof: Profile, out: dict[str, Any]) -> list[Row]:
    stack.truncate_events()
    n = prof.sink_events - prof.sink_events % EVENTS_PER_BODY
    with stack.kafka("sink") as broker:
        s = stack.settings("sink", broker)
        topic = Topics.from_settings(s).raw_events
        widget_id, tenant_id = stack.widget("bench sink")
        bodies = make_bodies(widget_id, n // EVENTS_PER_BODY, seed=3)
        received_at = datetime.now(UTC)
        records = [r for b in bodies for r in to_records(b, tenant_id, received_at)]
        say(f"[sink] preloading {n:,} events into {topic}")
        preload = bare_produce(s, topic, encoded_requests(bodies, tenant_id), "preload")

        say(f"[sink] bare binary COPY of the same {n:,} rows (10k-row batches), with and without foreign keys")
        copy_rows = [copy_row(r) for r in records]
        copy = bare_copy(stack.postgres.dsn, copy_rows)
        copy_no_fk = bare_copy(stack.postgres.dsn, copy_rows, foreign_keys=False)
        del records, bodies, copy_rows
        say(
            f"[sink] bare COPY: {copy['rows_per_s']:,.0f} rows/s ({copy_no_fk['rows_per_s']:,.0f} without foreign keys)"
        )

        with (
            stack.stage("sink", s, None) as proc,
            psycopg.connect(stack.postgres.dsn, autocommit=True) as conn,
            stack.profiler.record("sink", proc),
            stack.cpu.measure("sink"),
        ):
            sink = poll_sink(conn, proc, widget_id, n, timeout=max(60.0, n / 2_000))
    out["sink"] = {"preload": preload, "bare_copy": copy, "bare_copy_without_foreign_keys": copy_no_fk, "sink": sink}
    ratio = sink["rows_per_s"] / copy["rows_per_s"]
    ratio_no_fk = sink["rows_per_s"] / copy_no_fk["rows_per_s"]
    return [
        Row(
            "sink: rows/s raw topic -> visitor_events",
            f"{sink['rows_per_s']:,.0f} rows/s",
            f"{copy['rows_per_s']:,.0f} rows/s bare binary COPY (same constraints)",
            f"{ratio:.1%}",
            f">= {SINK_TARGET_RATIO:.0%} of bare COPY",
            verdict(ratio >= SINK_TARGET_RATIO and sink["complete"]),
        ),
        Row(
            "sink: same, vs a COPY that skips the foreign-key checks",
            f"{sink['rows_per_s']:,.0f} rows/s",
            f"{copy_no_fk['rows_per_s']:,.0f} rows/s bare binary COPY (no FKs)",
            f"{ratio_no_fk:.1%}",
            "-",
            "info",
        ),
    ]


def poll_sink(conn: psycopg.Connection, proc: StageProcess, widget_id: str, n: int, timeout: float) -> dict[str, Any]:
    """Rows/s from the first row visible to all n rows visible (start-up and group join are not counted).

    count(*) over a growing table costs the database real CPU on 2 cores, so the first row is found with a
    cheap LIMIT 1 probe, progress is counted every 250 ms, and only near the end every 50 ms."""
    start = time.monotonic()
    first: tuple[float, int] | None = None
    count, last_report, t = 0, start, start
    while time.monotonic() - start < timeout:
        if not proc.alive():
            raise RuntimeError(f"sink exited:\n{proc.log_tail()}")
        t = time.monotonic()
        if first is None:
            if conn.execute("SELECT 1 FROM visitor_events WHERE widget_id = %s LIMIT 1", (widget_id,)).fetchone():
                count = count_sent_events(conn, widget_id)
                first = (t, count)
        else:
            count = count_sent_events(conn, widget_id)
        if count >= n:
            break
        if first is not None and t - last_report >= 1.0:
            say(f"    [sink] {count:,} / {n:,} rows")
            last_report = t
        time.sleep(0.05 if first is None or count >= 0.85 * n else 0.25)
    end = t  # the snapshot of the poll that saw all n rows
    if first is None or count < n:
        raise RuntimeError(f"sink wrote {count} of {n} rows within {timeout:.0f}s:\n{proc.log_tail()}")
    rows_per_s = (count - first[1]) / (end - first[0]) if end > first[0] else float("nan")
    return {
        "rows": count,
        "complete": count == n,
        "startup_s": round(first[0] - start, 3),
        "first_poll_rows": first[1],
        "seconds": round(end - first[0], 3),
        "rows_per_s": rows_per_s,
    }


def count_sent_events(conn: psycopg.Connection, widget_id: str) -> int:
    """Events of the widget as sent (the processors' derived session_start rows are not counted)."""
    return int(
        conn.execute(
            "SELECT count(*) FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start'", (widget_id,)
        ).fetchone()[0]
    )
