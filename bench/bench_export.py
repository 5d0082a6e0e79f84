"""Export benchmark: rows/s and peak memory growth of `site_activity.export.write_bundle` per format.

    .venv/bin/python bench/bench_export.py                    # 5,000,000 events (the README row; the target)
    .venv/bin/python bench/bench_export.py --events 200000    # smoke test, about a minute

Own embedded Postgres on a free port in a temp dir (stopped at the end), 127.0.0.1 only; no broker needed.

1. Seed: `--events` events of one tenant over 4 widgets, in the benchmark workload's realistic mix
   (bench/workload.py: pageviews, custom events with properties, one identify per 25-event request), binary
   COPY in 200k-row chunks; identify events (and every 7th other event) link to one of `--events / 250`
   contacts with traits. VACUUM ANALYZE + CHECKPOINT.
2. For each format (ndjson, csv, parquet): a fresh child process imports everything (pyarrow included),
   records its RSS, then writes the whole tenant's bundle while a thread samples its RSS every 20 ms. Peak
   growth = max(sampled RSS, ru_maxrss if the export raised it) − RSS before the export. The child also checks the manifest against
   `count(*)` and every file's SHA-256.
3. Target: peak RSS growth ≤ 100 MB for 5,000,000 events (issue 13).

Prints a table (and markdown for the README) and writes bench/results/export.json."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import report  # noqa: E402
from bench.workload import (  # noqa: E402
    COPY_COLUMNS,
    EVENTS_PER_BODY,
    JsonText,
    JsonTextBinaryDumper,
    copy_row,
    make_bodies,
    to_records,
)
from dev_stack.embedded import EmbeddedPostgres, free_port  # noqa: E402
from site_activity import widgets  # noqa: E402
from site_activity.db import migrate  # noqa: E402

TARGET_MB = 100.0
TARGET_AT_EVENTS = 5_000_000
FORMATS = ("ndjson", "csv", "parquet")
CHUNK = 200_000
_CUSTOMER = COPY_COLUMNS.index("customer_id")


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --- seeding ---------------------------------------------------------------------------------------------
def seed(dsn: str, events: int) -> tuple[uuid.UUID, float]:
    """Returns (tenant id, seconds)."""
    started = time.perf_counter()
    rng = random.Random(13)
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = widgets.create_widget(conn, name="bench export 0", actor="bench", tracking_enabled=True)
        tenant = first.tenant_id
        targets = [first] + [
            widgets.create_widget(
                conn, name=f"bench export {i}", tenant_id=tenant, actor="bench", tracking_enabled=True
            )
            for i in range(1, 4)
        ]
        contacts = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(max(1, events // 250))]
        with conn.cursor().copy("COPY customers (id, tenant_id, external_id, email, name, traits) FROM STDIN") as copy:
            for i, cid in enumerate(contacts):
                copy.write_row(
                    (
                        cid,
                        tenant,
                        f"u_{i}",
                        f"user{i}@example.com",
                        f"User Ñame {i}",
                        json.dumps({"plan": "pro", "seats": i % 50, "company": "Ünïcode GmbH"}),
                    )
                )
        conn.adapters.register_dumper(JsonText, JsonTextBinaryDumper)
        # The export reads visitor_events and customers only: the tables derived on insert (rollups, visitor
        # summaries) are not maintained while seeding, which makes seeding several times faster.
        conn.execute("ALTER TABLE visitor_events DISABLE TRIGGER USER")
        done = 0
        received = datetime.now(UTC)
        while done < events:
            n = min(CHUNK, events - done)
            rows: list[tuple[Any, ...]] = []
            for b, body in enumerate(
                make_bodies(str(targets[(done // CHUNK) % len(targets)].id), -(-n // EVENTS_PER_BODY), seed=done)
            ):
                body["widget_id"] = str(targets[b % len(targets)].id)
                for rec in to_records(body, str(tenant), received):
                    row = list(copy_row(rec))
                    if rec["event_type"] == "identify" or len(rows) % 7 == 0:
                        row[_CUSTOMER] = contacts[rng.randrange(len(contacts))]
                    rows.append(tuple(row))
            with (
                conn.transaction(),
                conn.cursor().copy(
                    f"COPY visitor_events ({', '.join(COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
                ) as copy,
            ):
                for values in rows[:n]:
                    copy.write_row(values)
            done += n
            say(f"  seeded {done:,} / {events:,} events")
        conn.execute("ALTER TABLE visitor_events ENABLE TRIGGER USER")
        say("  VACUUM ANALYZE + CHECKPOINT")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return tenant, time.perf_counter() - started


# --- one export in a child process -----------------------------------------------------------------------
def child(dsn: str, tenant: str, fmt: str, out: Path) -> dict[str, Any]:
    """Runs in a fresh process: one export, with its RSS sampled."""
    import psutil
    import pyarrow
    import pyarrow.parquet  # noqa: F401  (part of the program too)

    from site_activity.export import make_filter, write_bundle

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the imports' peak, not ours
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    result = write_bundle(dsn, make_filter(uuid.UUID(tenant), None, None, None), fmt, out)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    # The kernel's high-water mark catches a spike between two samples, but only counts if the export set it.
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    max_rss = max(peak[0], maxrss_after if maxrss_after > maxrss_before else 0)
    return {
        "format": fmt,
        "seconds": seconds,
        "events": result.rows["events"],
        "contacts": result.rows["contacts"],
        "archive_bytes": result.bytes,
        "baseline_rss_mb": baseline / 2**20,
        "peak_rss_growth_mb": (max_rss - baseline) / 2**20,
        "manifest": result.manifest,
    }


def verify(dsn: str, tenant: uuid.UUID, res: dict[str, Any], out: Path) -> list[str]:
    """Manifest counts = count(*) now (nothing writes during the benchmark); every file's SHA-256 matches."""
    problems = []
    with psycopg.connect(dsn) as conn:
        events = conn.execute("SELECT count(*) FROM visitor_events WHERE tenant_id = %s", (tenant,)).fetchone()[0]
        contacts = conn.execute(
            "SELECT count(*) FROM customers c WHERE tenant_id = %s AND EXISTS"
            " (SELECT 1 FROM visitor_events e WHERE e.customer_id = c.id)",
            (tenant,),
        ).fetchone()[0]
    if res["manifest"]["row_counts"] != {"events": events, "contacts": contacts}:
        problems.append(f"row counts {res['manifest']['row_counts']} != SQL {events}/{contacts}")
    with zipfile.ZipFile(out) as zf:
        for f in res["manifest"]["files"]:
            sha = hashlib.sha256()
            with zf.open(f["name"]) as fh:
                while chunk := fh.read(1 << 20):
                    sha.update(chunk)
            if sha.hexdigest() != f["sha256"]:
                problems.append(f"{f['name']}: sha256 mismatch")
    return problems


def run_child(dsn: str, tenant: uuid.UUID, fmt: str, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", fmt, "--dsn", dsn, "--tenant", str(tenant), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"export child ({fmt}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    say(f"starting Postgres on 127.0.0.1:{pg.port}")
    pg.start()
    try:
        migrate(pg.dsn)
        yield pg
    finally:
        pg.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp, postgres(Path(tmp)) as pg:
        say(f"seeding {args.events:,} events")
        tenant, seed_s = seed(pg.dsn, args.events)
        say(f"seeded in {seed_s:.1f} s")
        runs = []
        for fmt in args.formats:
            out = Path(tmp) / f"export.{fmt}.zip"
            say(f"exporting as {fmt}")
            res = run_child(pg.dsn, tenant, fmt, out)
            res["problems"] = verify(pg.dsn, tenant, res, out)
            res["rows_per_s"] = res["events"] / res["seconds"] if res["seconds"] else None
            say(
                f"  {res['events']:,} events + {res['contacts']:,} contacts in {res['seconds']:.1f} s "
                f"({res['rows_per_s']:,.0f} events/s), archive {res['archive_bytes'] / 2**20:,.1f} MiB, "
                f"peak RSS growth {res['peak_rss_growth_mb']:.1f} MB"
                + (f"; PROBLEMS {res['problems']}" if res["problems"] else "")
            )
            del res["manifest"]
            runs.append(res)
            out.unlink()
    return {
        "events": args.events,
        "seed_seconds": round(seed_s, 1),
        "runs": runs,
        "target": {"peak_rss_growth_mb": TARGET_MB, "at_events": TARGET_AT_EVENTS},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def table(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for r in res["runs"]:
        ok = r["peak_rss_growth_mb"] <= TARGET_MB and not r["problems"]
        full = res["events"] >= TARGET_AT_EVENTS
        verdict = ("PASS" if ok else "FAIL") + ("" if full else f" (at {res['events']:,} events, not the 5M target)")
        rows.append(
            (
                f"export {r['format']}: {r['events']:,} events + {r['contacts']:,} contacts",
                f"{r['seconds']:.1f} s, {r['rows_per_s']:,.0f} events/s",
                f"{r['archive_bytes'] / 2**20:,.1f} MiB",
                f"{r['peak_rss_growth_mb']:.1f} MB (≤ {TARGET_MB:.0f} MB)",
                verdict,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=TARGET_AT_EVENTS, help="events to seed (default 5,000,000)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--child", choices=FORMATS, help=argparse.SUPPRESS)
    p.add_argument("--dsn", help=argparse.SUPPRESS)
    p.add_argument("--tenant", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.dsn, args.tenant, args.child, args.out), default=str))
        return 0
    res = run(args)
    return report("export", res, ("row", "time, rate", "archive", "peak RSS growth", "verdict"), table(res), 4)


if __name__ == "__main__":
    sys.exit(main())
