"""`site-activity export`: write an export bundle (site_activity/export.py) to a local file, with progress.

Progress goes to stderr: a rich progress bar on a terminal; otherwise (piped, CI, logs) one plain line per
file at most every second and when it completes, e.g. `events.csv: 120,000 / 200,000 rows (60%)`. The
archive is written next to --out as a hidden temporary file and renamed into place only when complete, and
the export is audited (action export.written) with its filters, counts and the archive's SHA-256."""

from __future__ import annotations

import getpass
import sys
import time
import uuid
from pathlib import Path

from site_activity.audit import audit
from site_activity.db import connect
from site_activity.export import BundleResult, Format, Progress, make_filter, write_bundle
from site_activity.settings import Settings


def _plain_progress() -> Progress:
    last: dict[str, float] = {}

    def show(name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last.get(name, 0.0) < 1.0:
            return
        if done == total and last.get(name) == -1.0:
            return  # already printed the final line of this file
        last[name] = -1.0 if done == total else now
        pct = f"{done / total:.0%}" if total else "100%"
        print(f"{name}: {done:,} / {total:,} rows ({pct})", file=sys.stderr, flush=True)

    return show


def run_export(
    settings: Settings,
    *,
    tenant: uuid.UUID,
    widget: uuid.UUID | None,
    from_: str | None,
    to: str | None,
    fmt: Format,
    out: Path,
    actor: str | None,
) -> int:
    flt = make_filter(tenant, widget, from_, to)
    export_id = uuid.uuid4()
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{export_id.hex[:8]}.partial")
    try:
        if sys.stderr.isatty():
            result = _with_bar(settings, flt, fmt, tmp, export_id)
        else:
            result = write_bundle(
                settings.postgres_dsn, flt, fmt, tmp, export_id=export_id, on_progress=_plain_progress()
            )
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with connect(settings.postgres_dsn, autocommit=True) as conn, conn.transaction():
        audit(
            conn,
            actor=actor or f"cli:{getpass.getuser()}",
            action="export.written",
            tenant_id=tenant,
            entity="export",
            entity_id=str(export_id),
            old=None,
            new={
                "format": fmt,
                **flt.public(),
                "row_counts": result.rows,
                "bytes": result.bytes,
                "sha256": result.sha256,
                "out": str(out),
            },
        )
    counts = result.rows
    print(
        f"wrote {out} ({result.bytes:,} bytes, sha256 {result.sha256}): {counts['events']:,} events, "
        f"{counts['contacts']:,} contacts in {result.seconds:.1f} s"
    )
    return 0


def _with_bar(settings: Settings, flt: object, fmt: Format, tmp: Path, export_id: uuid.UUID) -> BundleResult:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as progress:

        def show(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done)

        return write_bundle(
            settings.postgres_dsn,
            flt,  # type: ignore[arg-type]
            fmt,
            tmp,
            export_id=export_id,
            on_progress=show,
        )
