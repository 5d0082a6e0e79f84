"""The retention purge: for every widget, delete its events with occurred_at older than now − event_retention_days.

Cost follows the rows removed, not the table: each widget's expired rows are found through the
(widget_id, occurred_at) index and deleted in chunks of `chunk_rows`, each chunk its own short transaction
(autocommit), so no lock is held for long, WAL per transaction is bounded, and the sink's inserts (new rows,
other pages) never wait on it. Every widget's cutoff (now − its retention) is computed once, when the run
starts reading the widget list, and kept for the whole run, so a run ends even while events keep arriving;
rows that expire during a long run are left for the next one. See ARCHITECTURE.md "Retention" for why the table is not partitioned.

The purge is paced by a duty cycle: after a chunk that took t seconds it rests t·(1 − d)/d, so it uses at most
the fraction d of one Postgres backend's time. A purge has a whole day to finish, the sink has seconds of
freshness to keep: on a small machine an unpaced purge takes a full core from Postgres and the sink loses a
quarter of its rate while it runs (bench/bench_purge.py measures both)."""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

log = logging.getLogger(__name__)

# Deadlock with a concurrent sink transaction (its retro-link UPDATE touches old anonymous rows too): Postgres
# aborts one side; the purge simply runs the chunk again.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable)

# ctid = ANY(ARRAY(...)) runs as a TID scan: the chunk is chosen through the index, then deleted by address.
_DELETE_CHUNK = """
DELETE FROM visitor_events WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM visitor_events WHERE widget_id = %(w)s AND occurred_at < %(cutoff)s LIMIT %(n)s))
"""
_COUNT = "SELECT count(*) FROM visitor_events WHERE widget_id = %(w)s AND occurred_at < %(cutoff)s"
_WIDGETS = (
    "SELECT id, tenant_id, name, event_retention_days, now() - make_interval(days => event_retention_days)"
    " FROM widget_configs ORDER BY id"
)


@dataclass
class WidgetPurge:
    widget_id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    retention_days: int
    cutoff: datetime
    rows: int = 0  # removed (or, in a dry run, that would be removed)
    chunks: int = 0
    seconds: float = 0.0


@dataclass
class PurgeReport:
    dry_run: bool
    widgets: list[WidgetPurge] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(w.rows for w in self.widgets)

    def summary(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "widgets": len(self.widgets),
            "rows": self.rows,
            "widgets_with_rows": sum(1 for w in self.widgets if w.rows),
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds) if self.seconds > 0 else None,
        }


def purge(
    dsn: str,
    *,
    chunk_rows: int = 10_000,
    dry_run: bool = False,
    duty_cycle: float = 1.0,
    on_progress: Callable[[WidgetPurge, bool], None] = lambda w, done: None,
    stop: threading.Event | None = None,
) -> PurgeReport:
    """Runs one purge over every widget. `duty_cycle` (0 < d <= 1) is the largest fraction of wall time spent
    deleting (1.0: no pauses). `on_progress(widget, done)` is called after every chunk and once when a widget
    is finished. A set `stop` ends the run after the current chunk (what was deleted stays deleted; the next
    run goes on from there). Returns what was removed (or would be, with dry_run). Raises ValueError for a bad
    chunk size or duty cycle, and psycopg errors other than deadlocks/serialization failures (retried)."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    if not 0 < duty_cycle <= 1:
        raise ValueError("duty_cycle must be in (0, 1]")
    pace = _Pace(duty_cycle, stop or threading.Event())
    report = PurgeReport(dry_run)
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True, application_name="site-activity-purge") as conn:
        for row in conn.execute(_WIDGETS).fetchall():
            widget = WidgetPurge(*row)
            report.widgets.append(widget)
            _purge_widget(conn, widget, chunk_rows, dry_run, on_progress, pace)
            on_progress(widget, True)
            log.info(
                "purged widget" if not dry_run else "purge dry run: widget",
                extra={
                    "widget_id": str(widget.widget_id),
                    "retention_days": widget.retention_days,
                    "cutoff": widget.cutoff.isoformat(),
                    "rows": widget.rows,
                    "chunks": widget.chunks,
                    "seconds": round(widget.seconds, 3),
                },
            )
    report.seconds = time.perf_counter() - started
    log.info("purge finished" if not dry_run else "purge dry run finished", extra=report.summary())
    return report


class _Pace:
    """Rests between chunks so deleting takes at most `duty_cycle` of the wall time; `stop` cuts a rest short
    and ends the run."""

    def __init__(self, duty_cycle: float, stop: threading.Event) -> None:
        self.rest_per_busy_s = (1 - duty_cycle) / duty_cycle
        self.stop = stop

    def after_chunk(self, busy_s: float) -> bool:
        """Rests in proportion to the chunk just done; False when the run should end."""
        if self.rest_per_busy_s > 0:
            self.stop.wait(busy_s * self.rest_per_busy_s)
        return not self.stop.is_set()


def _purge_widget(
    conn: psycopg.Connection,
    widget: WidgetPurge,
    chunk_rows: int,
    dry_run: bool,
    on_progress: Callable[[WidgetPurge, bool], None],
    pace: _Pace,
) -> None:
    started = time.perf_counter()
    params = {"w": widget.widget_id, "cutoff": widget.cutoff, "n": chunk_rows}
    if dry_run:
        widget.rows = int(conn.execute(_COUNT, params).fetchone()[0])  # type: ignore[index]
    else:
        while not pace.stop.is_set():
            chunk_started = time.perf_counter()
            try:
                deleted = conn.execute(_DELETE_CHUNK, params).rowcount
            except _RETRYABLE as exc:
                log.warning(
                    "purge chunk conflicted; retrying",
                    extra={"widget_id": str(widget.widget_id), "error": type(exc).__name__},
                )
                continue
            widget.rows += max(deleted, 0)
            widget.chunks += 1
            on_progress(widget, False)
            if deleted < chunk_rows or not pace.after_chunk(time.perf_counter() - chunk_started):
                break
    widget.seconds = time.perf_counter() - started


def run_with_progress(dsn: str, *, chunk_rows: int, dry_run: bool, duty_cycle: float = 1.0) -> PurgeReport:
    """`site-activity purge`: the purge with a live progress display (rich) on stderr and a summary table."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("widgets", total=None)

        def on_progress(widget: WidgetPurge, done: bool) -> None:
            verb = "would remove" if dry_run else "removed"
            progress.update(task, description=f"{widget.name[:30]}: {verb} {widget.rows:,} rows")
            if done:
                progress.advance(task)

        report = purge(dsn, chunk_rows=chunk_rows, dry_run=dry_run, duty_cycle=duty_cycle, on_progress=on_progress)
    table = Table(title=("Retention purge (dry run: nothing deleted)" if dry_run else "Retention purge"))
    for column in (
        "widget id",
        "name",
        "retention",
        "cutoff (UTC)",
        "would remove" if dry_run else "removed",
        "seconds",
    ):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("removed", "would remove", "seconds") else "left"
        )
    for w in report.widgets:
        if w.rows:
            table.add_row(
                str(w.widget_id),
                w.name[:40],
                f"{w.retention_days} d",
                f"{w.cutoff:%Y-%m-%d %H:%M}",
                f"{w.rows:,}",
                f"{w.seconds:.2f}",
            )
    out = Console() if sys.stdout.isatty() else Console(width=200)  # piped: keep each widget on one line
    out.print(table)
    out.print(
        f"{report.rows:,} rows {'to remove' if dry_run else 'removed'} across {len(report.widgets)} "
        f"widget(s) in {report.seconds:.2f} s"
    )
    return report


def purge_every(
    dsn: str, interval_s: float, stop: threading.Event, *, chunk_rows: int, duty_cycle: float = 1.0
) -> None:
    """Runs the purge now and then every interval_s until `stop` is set (which also ends a run in progress after
    its current chunk); a failed run is logged and the next one tries again (how `dev` and the compose `purge`
    service schedule it)."""
    while not stop.is_set():
        try:
            purge(dsn, chunk_rows=chunk_rows, duty_cycle=duty_cycle, stop=stop)
        except Exception:
            log.exception("retention purge failed; retrying at the next interval")
        stop.wait(interval_s)
