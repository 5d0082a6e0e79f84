"""Retention purge benchmark: how long `site-activity purge` takes on a large table, how many rows/s it removes,
and what it does to the sink's write rate, with the sink's rate without a purge measured in the same run.

    .venv/bin/python bench/bench_purge.py                  # 5,000,000 events over 400 days (the README row)
    .venv/bin/python bench/bench_purge.py --rows 20000 --sink-events 20000   # smoke test, under a minute

Own embedded Postgres + the configured embedded broker (Apache Kafka where Java 17+ is found, else Tansu) on free ports in a temp dir, stopped by PID at the end; 127.0.0.1 only.

1. Seed: `--rows` events spread evenly over 400 days (COPY, binary), across 8 widgets, two for each retention
   of 7/30/90/365 days. VACUUM ANALYZE + CHECKPOINT, so the purge starts from a settled table.
2. Sink baseline: `--sink-events` fresh events of a separate widget are produced to the raw topic; a running
   `site-activity sink` writes them; its rate is read from its own rows_written counter every 0.2 s.
3. Ingest baseline: `site-activity api` (its own topics) takes an open-loop load of `--ingest-rate` requests/s
   (10 events each) for `--ingest-seconds`; latency counts from each request's scheduled time.
4. Purge under load: the same number of fresh events is produced again; once the sink writes them the purge
   starts (paced by `--duty-cycle`, default the product's `purge_duty_cycle`) in a thread, and the sink's rate
   is taken over the window where both run. When the sink has drained, the same ingest load runs again while
   the purge goes on (the row says so if the purge ended first).
5. Check: no row of any widget is older than its cutoff; rows inside retention are all still there.

Prints a table (and markdown for the README) and writes bench/results/purge.json."""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import INGEST_P99_TARGET_MS, Loadgen, post_until_accepted, report  # noqa: E402
from bench.workload import (  # noqa: E402
    EVENTS_PER_BODY,
    encoded_requests,
    make_bodies,
    make_body,
)
from dev_stack.embedded import EmbeddedPostgres, free_port, make_broker, wait_until  # noqa: E402
from dev_stack.isolated import isolated_settings  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from site_activity import widgets  # noqa: E402
from site_activity.db import migrate  # noqa: E402
from site_activity.kafka import ensure_topics, flush_or_raise, produce_waiting, producer_config  # noqa: E402
from site_activity.retention import PurgeReport, purge  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from site_activity.topics import Topics  # noqa: E402

RETENTIONS = (7, 30, 90, 365)
WIDGETS_PER_RETENTION = 2
SPAN_DAYS = 400
SINK_SLOWDOWN_TARGET = 0.8
_BOUNDARY_GAP_US = 3600 * 1_000_000  # the sink keeps >= 80 % of its rate while a purge runs


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --- seeding ---------------------------------------------------------------------------------------------
def make_widgets(dsn: str) -> list[widgets.Widget]:
    made = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for days in RETENTIONS:
            for i in range(WIDGETS_PER_RETENTION):
                w = widgets.create_widget(conn, name=f"bench {days}d #{i}", actor="bench")
                made.append(widgets.set_retention(conn, w.id, days, actor="bench"))
    return made


def seed(dsn: str, targets: list[widgets.Widget], rows: int, now: datetime) -> float:
    """`rows` events spread evenly over SPAN_DAYS before `now`, round-robin over the widgets; binary COPY.
    Returns the seconds it took."""
    rng = random.Random(7)
    span_us = SPAN_DAYS * 86_400 * 1_000_000
    # No event within an hour of a retention edge: the check after the purge counts against cutoffs taken a
    # little later than the purge's own, and must not see rows that aged across the edge in between.
    edges = [days * 86_400 * 1_000_000 for days in RETENTIONS]
    started = time.perf_counter()
    columns = "widget_id, event_id, tenant_id, visitor_id, event_type, url, occurred_at, received_at"
    chunk = 200_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        for first in range(0, rows, chunk):
            with (
                conn.transaction(),
                conn.cursor().copy(f"COPY visitor_events ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(["uuid", "uuid", "uuid", "text", "text", "text", "timestamptz", "timestamptz"])
                for i in range(first, min(first + chunk, rows)):
                    w = targets[i % len(targets)]
                    age = rng.randrange(span_us)
                    while any(abs(age - edge) < _BOUNDARY_GAP_US for edge in edges):
                        age = rng.randrange(span_us)
                    at = now - timedelta(microseconds=age)
                    copy.write_row(
                        (
                            w.id,
                            uuid.UUID(int=rng.getrandbits(128), version=4),
                            w.tenant_id,
                            f"v-{rng.randrange(50_000)}",
                            "pageview",
                            "https://shop.example/",
                            at,
                            at,
                        )
                    )
            say(f"  seeded {min(first + chunk, rows):,} / {rows:,} rows")
        say("  VACUUM ANALYZE + CHECKPOINT")
        conn.execute("VACUUM ANALYZE visitor_events")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def counts(dsn: str, targets: list[widgets.Widget]) -> dict[str, dict[str, int]]:
    """Per widget: rows older than its cutoff right now, and rows inside its retention."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for w in targets:
            old, kept = conn.execute(
                "SELECT count(*) FILTER (WHERE occurred_at < now() - make_interval(days => %s)),"
                " count(*) FILTER (WHERE occurred_at >= now() - make_interval(days => %s))"
                " FROM visitor_events WHERE widget_id = %s",
                (w.event_retention_days, w.event_retention_days, w.id),
            ).fetchone()  # type: ignore[misc]
            out[str(w.id)] = {"retention_days": w.event_retention_days, "expired": old, "kept": kept}
    return out


# --- the sink under measurement --------------------------------------------------------------------------
class SinkMeter:
    """Samples the sink's rows_written counter every 0.2 s: (monotonic time, rows) pairs."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rows(self) -> float:
        with urllib.request.urlopen(self.url, timeout=2) as resp:
            text = resp.read().decode()
        match = re.search(r"^site_activity_sink_rows_written_total (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.rows()))
            self._stop.wait(0.2)

    def __enter__(self) -> SinkMeter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def rate(self, start: float, end: float) -> tuple[float, float]:
        """(rows/s, seconds) inside [start, end], from the sample before the first increase to the sample of the
        last one, so idle time before the first row and after the last is not counted."""
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        moved = [i for i in range(1, len(inside)) if inside[i][1] > inside[i - 1][1]]
        if not moved:
            return float("nan"), 0.0
        (t0, n0), (t1, n1) = inside[moved[0] - 1], inside[moved[-1]]
        return (n1 - n0) / (t1 - t0), t1 - t0

    def wait_for(self, rows: float, timeout: float) -> None:
        wait_until(lambda: self.rows() >= rows, timeout, f"sink to write {rows:,.0f} rows", interval=0.5)


def produce(settings: Settings, widget: widgets.Widget, events: int, seed: int) -> None:
    from confluent_kafka import Producer

    producer = Producer(producer_config(settings))
    topic = Topics.from_settings(settings).raw_events
    chunk = 100_000  # events built and encoded at a time: bounded memory for big backlogs
    for first in range(0, events, chunk):
        bodies = make_bodies(str(widget.id), min(chunk, events - first) // EVENTS_PER_BODY, seed=seed * 1000 + first)
        for key, value in encoded_requests(bodies, str(widget.tenant_id)):
            produce_waiting(producer, topic, value, key)
            producer.poll(0)
    flush_or_raise(producer, 120)


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[tuple[EmbeddedPostgres, Settings]]:
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    broker = make_broker(Settings(), workdir / "broker", free_ports=True)
    with contextlib.ExitStack() as stop:
        say(f"starting Postgres on 127.0.0.1:{pg.port} and the embedded broker")
        pg.start()
        stop.callback(pg.stop)
        broker.start()
        stop.callback(broker.stop)
        migrate(pg.dsn)
        settings = isolated_settings(
            broker.bootstrap,
            pg.dsn,
            workdir / "data",
            topic_prefix="bench-purge",
            sink_group="bench-purge-sink",
            sink_from_enriched=False,
            consumer_session_timeout_ms=6000,
            consumer_heartbeat_interval_ms=1000,
        )
        ensure_topics(settings)
        yield pg, settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    sink_events = args.sink_events - args.sink_events % EVENTS_PER_BODY
    with tempfile.TemporaryDirectory(prefix="bench-purge-") as tmp, stack(Path(tmp)) as (pg, settings):
        targets = make_widgets(pg.dsn)
        now = datetime.now(UTC)
        say(f"seeding {args.rows:,} events over {SPAN_DAYS} days across {len(targets)} widgets")
        seed_s = seed(pg.dsn, targets, args.rows, now)
        before = counts(pg.dsn, targets)
        expired = sum(c["expired"] for c in before.values())
        say(f"seeded in {seed_s:.1f} s; {expired:,} rows are past their widget's retention")

        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            live = widgets.create_widget(conn, name="bench live", actor="bench", tracking_enabled=True)
        log = Path(tmp) / "sink.log"
        # Each phase: the backlog is produced while the sink is stopped, then the sink drains it, so both
        # phases measure the same thing (a drain), and producing never competes with the sink for CPU.
        say(f"sink baseline: producing {sink_events:,} fresh events, then the sink drains them (no purge)")
        produce(settings, live, sink_events, seed=1)
        with running_sink(settings, log) as meter:
            t0 = time.monotonic()
            meter.wait_for(sink_events, timeout=max(120.0, sink_events / 1000))
            base_rate, base_s = meter.rate(t0, time.monotonic())
        say(f"  sink: {base_rate:,.0f} rows/s over {base_s:.1f} s")

        api_settings = settings.model_copy(update={"topic_prefix": "bench-purge-api", "widget_cache_refresh_s": 1.0})
        ensure_topics(api_settings)
        with running_api(api_settings, Path(tmp) / "api.log", live) as api:
            say(
                f"ingest baseline: {args.ingest_rate:g} requests/s ({args.ingest_rate * EVENTS_PER_BODY:,.0f} events/s)"
                f" for {args.ingest_seconds:g} s, no purge"
            )
            ingest_base = ingest_load(api, live, args, "ingest-baseline")

            say(
                f"purge under load: producing another {sink_events:,} events; the purge starts once the sink writes"
                f" them (duty cycle {args.duty_cycle:g})"
            )
            produce(settings, live, sink_events, seed=2)
            report: dict[str, PurgeReport] = {}
            ended = threading.Event()
            ended_at: list[float] = []

            def run_purge() -> None:
                try:
                    report["r"] = purge(pg.dsn, chunk_rows=args.chunk_rows, duty_cycle=args.duty_cycle)
                finally:
                    ended_at.append(time.monotonic())
                    ended.set()

            with running_sink(settings, log) as meter:
                meter.wait_for(1, timeout=60)  # (a fresh sink process: its counter starts at 0)
                p0 = time.monotonic()
                purger = threading.Thread(target=run_purge, name="purge", daemon=True)
                purger.start()
                meter.wait_for(sink_events, timeout=max(120.0, sink_events / 1000))
                sink_done = time.monotonic()
                say("  the sink drained; ingest load while the purge goes on")
                ingest_during = ingest_load(api, live, args, "ingest-during-purge")
                ingest_overlapped = not ended.is_set()
                purger.join()
                p1 = ended_at[0]
                during_rate, during_s = meter.rate(p0, min(p1, sink_done))
        if "r" not in report:
            raise RuntimeError("the purge failed (see the log above)")
        say(
            f"  purge: {report['r'].rows:,} rows in {p1 - p0:.1f} s; sink during it: {during_rate:,.0f} rows/s"
            f" over {during_s:.1f} s; ingest p99 {ingest_during['latency_ms']['p99']} ms during it vs"
            f" {ingest_base['latency_ms']['p99']} ms without"
        )
        after = counts(pg.dsn, targets)

    r = report["r"]
    left_expired = sum(c["expired"] for c in after.values())
    lost = sum(before[w]["kept"] - after[w]["kept"] for w in before)
    return {
        "rows_seeded": args.rows,
        "span_days": SPAN_DAYS,
        "retentions": RETENTIONS,
        "widgets": len(targets),
        "chunk_rows": args.chunk_rows,
        "seed_seconds": round(seed_s, 1),
        "expired_before": expired,
        "purge": {**r.summary(), "wall_seconds": round(p1 - p0, 3)},
        "duty_cycle": args.duty_cycle,
        "ingest": {
            "rate_req_s": args.ingest_rate,
            "events_per_request": EVENTS_PER_BODY,
            "seconds": args.ingest_seconds,
            "baseline": _ingest_summary(ingest_base),
            "during_purge": _ingest_summary(ingest_during),
            "overlapped_purge": ingest_overlapped,
        },
        "sink": {
            "events_per_phase": sink_events,
            "baseline_rows_per_s": base_rate,
            "baseline_window_s": base_s,
            "during_purge_rows_per_s": during_rate,
            "during_purge_window_s": during_s,
            "ratio": during_rate / base_rate if base_rate else None,
        },
        "check": {"expired_left": left_expired, "kept_rows_lost": lost, "per_widget_after": after},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def running_api(settings: Settings, log: Path, widget: widgets.Widget) -> Iterator[int]:
    """`site-activity api` on its own topics, accepting the widget; yields its port."""
    api = StageProcess("api", settings, log)
    api.start()
    try:
        wait_until(lambda: healthy(settings.http_port), 60, "api", interval=0.2)
        post_until_accepted(settings.http_port, make_body(str(widget.id), random.Random(3)))
        yield settings.http_port
    finally:
        api.stop()


def ingest_load(port: int, widget: widgets.Widget, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """One open-loop run of bench/loadgen.py: answers and latency (ms) from each request's scheduled time."""
    gen = Loadgen(
        label,
        port,
        str(widget.id),
        "--mode",
        "open",
        "--rate",
        f"{args.ingest_rate:g}",
        "--duration",
        f"{args.ingest_seconds:g}",
        "--warmup",
        "1",
        "--bodies",
        "2000",
    )
    return gen.wait(timeout=args.ingest_seconds + 60)


def _ingest_summary(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests_ok": res["requests_ok"],
        "errors": res["errors"],
        "statuses": res["statuses"],
        "events_per_s": round(res["events_per_s"]),
        "latency_ms": res["latency_ms"],
    }


@contextlib.contextmanager
def running_sink(settings: Settings, log: Path) -> Iterator[SinkMeter]:
    sink = StageProcess("sink", settings, log)
    sink.start()
    try:
        wait_until(lambda: healthy(settings.sink_http_port), 60, "sink", interval=0.2)
        with SinkMeter(settings.sink_http_port) as meter:
            yield meter
    finally:
        sink.stop()


def healthy(port: int) -> bool:
    """A stage's /healthz on 127.0.0.1 answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def table(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    p, s, c = res["purge"], res["sink"], res["check"]
    ok = c["expired_left"] == 0 and c["kept_rows_lost"] <= 0
    if s["during_purge_window_s"] < 2.0:  # a few samples at least; small --rows runs purge in a blink
        sink_verdict = "n/a (the purge was too short to sample the sink during it)"
    else:
        sink_verdict = (
            f"{s['ratio']:.0%} ({'PASS' if s['ratio'] >= SINK_SLOWDOWN_TARGET else 'FAIL'} >= "
            f"{SINK_SLOWDOWN_TARGET:.0%})"
        )
    i = res["ingest"]
    base, during = i["baseline"], i["during_purge"]
    p99_base, p99_during = base["latency_ms"]["p99"], during["latency_ms"]["p99"]
    if not i["overlapped_purge"]:
        ingest_verdict = "n/a (the purge ended before the ingest window did)"
    else:
        ingest_ok = during["errors"] == 0 and p99_during is not None and p99_during < INGEST_P99_TARGET_MS
        ingest_verdict = f"{'PASS' if ingest_ok else 'FAIL'} (no errors, p99 < {INGEST_P99_TARGET_MS:.0f} ms)"
    return [
        (
            f"purge: {res['rows_seeded']:,} events / {res['span_days']} d, retention 7/30/90/365, duty cycle "
            f"{res['duty_cycle']:g}",
            f"{p['rows']:,} rows removed in {p['seconds']:.1f} s",
            f"{p['rows_per_s']:,} rows/s",
            "PASS" if ok else f"FAIL ({c['expired_left']} expired left, {c['kept_rows_lost']} kept rows lost)",
        ),
        (
            "sink write rate during the purge",
            f"{s['during_purge_rows_per_s']:,.0f} rows/s",
            f"{s['baseline_rows_per_s']:,.0f} rows/s without a purge (same run)",
            sink_verdict,
        ),
        (
            f"ingest during the purge ({i['rate_req_s'] * i['events_per_request']:,.0f} events/s, open loop)",
            f"p50 {during['latency_ms']['p50']} ms, p99 {p99_during} ms, {during['errors']} non-204",
            f"p50 {base['latency_ms']['p50']} ms, p99 {p99_base} ms without a purge (same run)",
            ingest_verdict,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5_000_000, help="events to seed (default 5,000,000)")
    p.add_argument("--sink-events", type=int, default=1_000_000, help="fresh events the sink writes per phase")
    p.add_argument("--chunk-rows", type=int, default=10_000, help="rows per purge DELETE transaction")
    p.add_argument(
        "--duty-cycle",
        type=float,
        default=Settings().purge_duty_cycle,
        help="the purge's duty cycle (default: the product's purge_duty_cycle)",
    )
    p.add_argument("--ingest-rate", type=float, default=80.0, help="ingest requests/s (25 events each), open loop")
    p.add_argument("--ingest-seconds", type=float, default=15.0, help="seconds of each ingest measurement")
    args = p.parse_args(argv)
    res = run(args)
    return report("purge", res, ("row", "measured", "rate / baseline", "verdict"), table(res), 3)


if __name__ == "__main__":
    sys.exit(main())
