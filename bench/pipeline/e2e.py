"""End to end: a steady open-loop load through the API, with and without the processors in the path; events/s
sustained into Postgres and freshness (204 -> row visible) per request, plus the processors' own hop."""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import Consumer

from bench.harness import Loadgen, Row, pct, post_until_accepted, say, verdict, wait_rows
from bench.pipeline.sink import count_sent_events
from bench.pipeline.stack import Profile, Stack
from bench.workload import EVENTS_PER_BODY, make_bodies
from site_activity.kafka import consumer_config
from site_activity.settings import Settings
from site_activity.topics import Topics

FRESHNESS_P99_TARGET_S = 2.0
FRESHNESS_WITH_PROCESSORS_P99_TARGET_S = 3.0
E2E_SUSTAINED_RATIO = 0.95
# With the processors in the path the pipeline must keep this share of what it sustains without them (issue 14).
WITH_PROCESSORS_VS_WITHOUT = 0.90


class FreshnessProbe:
    """Times each request's marker event from its 204 to its row being visible in Postgres.

    The probe must not load the database it measures: looking up every pending marker on every poll cost
    ~18 µs per marker, i.e. half a core at 20 polls/s once ~1,400 markers were pending. Markers are
    therefore checked oldest first, CHUNK at a time, moving on to the next chunk only while the current one
    found rows; a poll costs about one chunk of lookups plus the rows that did become visible. A marker past
    the first chunk with no visible row is found one poll later at worst, so the figures can only err
    towards staleness, never towards freshness."""

    CHUNK = 128

    def __init__(self, dsn: str, widget_id: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.widget_id = uuid.UUID(widget_id)
        self.incoming: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.pending: dict[uuid.UUID, float] = {}  # insertion order = 204 order: oldest first
        self.freshness: list[float] = []
        self.counts: list[tuple[float, int]] = []

    def marker(self, event_id: str, t_done: float) -> None:
        self.incoming.put((event_id, t_done))

    def poll(self) -> None:
        while True:
            try:
                event_id, t_done = self.incoming.get_nowait()
            except queue.Empty:
                break
            self.pending[uuid.UUID(event_id)] = t_done
        oldest = iter(list(self.pending))
        while chunk := list(itertools.islice(oldest, self.CHUNK)):
            # The query's snapshot is taken when it starts: a row it returns was visible by then.
            t_query = time.monotonic()
            rows = self.conn.execute(
                "SELECT event_id FROM visitor_events WHERE widget_id = %s AND event_id = ANY(%s)",
                (self.widget_id, chunk),
            ).fetchall()
            for (event_id,) in rows:
                self.freshness.append(t_query - self.pending.pop(event_id))
            if not rows:
                break

    def count(self) -> int:
        t = time.monotonic()
        n = count_sent_events(self.conn, str(self.widget_id))
        self.counts.append((t, n))
        return n

    def rate_between(self, a: float, b: float) -> float:
        inside = [(t, n) for t, n in self.counts if a <= t <= b]
        if len(inside) < 2:
            return float("nan")
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0)

    def close(self) -> None:
        self.conn.close()


class HopTap:
    """Reads the raw and the enriched topic alongside the pipeline and times the processors' hop per request:
    the enriched copy's producer timestamp minus the raw message's (every request is its own visitor, so the
    message key names the request). Splits end-to-end freshness into "processors" and "sink + Postgres"."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.first_seen: dict[str, dict[bytes, int]] = {t: {} for t in topics}
        self._stop = threading.Event()
        self._consumer = Consumer(consumer_config(settings, f"bench-tap-{uuid.uuid4().hex[:8]}", **{}))
        self._consumer.subscribe(topics)
        self._thread = threading.Thread(target=self._run, name="hop-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    self.first_seen[msg.topic()].setdefault(msg.key() or b"", msg.timestamp()[1])

    def hops_s(self, src: str, dst: str) -> list[float]:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()
        seen = self.first_seen[dst]
        return [(seen[k] - t) / 1000 for k, t in self.first_seen[src].items() if k in seen]


def section_e2e(stack: Stack, prof: Profile, out: dict[str, Any]) -> list[Row]:
    return _e2e(stack, prof, out, "e2e", processors=False, freshness_target_s=FRESHNESS_P99_TARGET_S)


def section_e2e_processors(stack: Stack, prof: Profile, out: dict[str, Any]) -> list[Row]:
    """The same load with the faust processors between the raw topic and the sink (issue 3's target)."""
    return _e2e(
        stack, prof, out, "e2e-processors", processors=True, freshness_target_s=FRESHNESS_WITH_PROCESSORS_P99_TARGET_S
    )


def _e2e(
    stack: Stack, prof: Profile, out: dict[str, Any], section: str, processors: bool, freshness_target_s: float
) -> list[Row]:
    stack.truncate_events()
    rate_req = prof.e2e_events_s / EVENTS_PER_BODY
    n_req = int(rate_req * prof.e2e_seconds)
    label = "end-to-end with processors" if processors else "end-to-end"
    with stack.kafka(section) as broker, contextlib.ExitStack() as stages:
        s = stack.settings(section, broker).model_copy(update={"sink_from_enriched": processors})
        widget_id, _ = stack.widget(f"bench {section}")
        warm_widget, _ = stack.widget(f"bench {section} warmup")
        api = stages.enter_context(stack.stage("api", s, s.http_port))
        procs = [api]
        if processors:
            procs.append(stages.enter_context(stack.stage("processors", s, s.processors_web_port)))
        sink = stages.enter_context(stack.stage("sink", s, s.sink_http_port))
        procs.append(sink)
        say(f"[{section}] warming up: one request through the whole pipeline")
        post_until_accepted(s.http_port, make_bodies(warm_widget, 1, seed=4)[0])
        wait_rows(stack.postgres.dsn, warm_widget, EVENTS_PER_BODY, timeout=60)
        say(
            f"[{section}] {prof.e2e_events_s:,} events/s ({rate_req:,.0f} requests/s) for {prof.e2e_seconds:.0f}s, "
            "every request's first event timed to its row"
        )
        probe = FreshnessProbe(stack.postgres.dsn, widget_id)
        topics = Topics.from_settings(s)
        tap = HopTap(s, [topics.raw_events, topics.enriched_events]) if processors else None
        try:
            load = Loadgen(
                section,
                s.http_port,
                widget_id,
                "--mode",
                "open",
                "--clients",
                "64",
                "--rate",
                f"{rate_req:.2f}",
                "--duration",
                str(prof.e2e_seconds),
                "--bodies",
                str(n_req),
                "--max-requests",
                str(n_req),
                "--seed",
                "11",
                on_marker=probe.marker,
            )
            try:
                with stack.profiler.record(section, *procs), stack.cpu.measure(section):
                    result = drive_probe(probe, load, prof.e2e_seconds)
            finally:
                load.stop()
            rows = probe.count()
            window_start = result["t_start"] + min(3.0, prof.e2e_seconds / 3)
            sustained = probe.rate_between(window_start, result["t_start"] + result["window_s"] + 0.5)
            fresh = probe.freshness
            missing = len(probe.pending) + probe.incoming.qsize()
            timeline = [(round(t - result["t_start"], 2), n) for t, n in probe.counts]
        finally:
            probe.close()
            hops = tap.hops_s(topics.raw_events, topics.enriched_events) if tap else []
    accepted = result["events_ok"]
    e2e = {
        "offered_events_s": prof.e2e_events_s,
        "load": result,
        "rows": rows,
        "accepted_events": accepted,
        "sustained_events_s": sustained,
        "rows_timeline": timeline,
        "markers_timed": len(fresh),
        "markers_missing": missing,
        "freshness_s": {"p50": pct(fresh, 0.5), "p99": pct(fresh, 0.99), "max": max(fresh) if fresh else None},
    }
    out[section] = e2e
    f = e2e["freshness_s"]
    complete = rows == accepted and result["errors"] == 0
    hop_rows = []
    if processors:
        e2e["processors_hop_s"] = {"p50": pct(hops, 0.5), "p99": pct(hops, 0.99), "requests": len(hops)}
        h = e2e["processors_hop_s"]
        hop_rows.append(
            Row(
                f"{label}: of which the processors (raw -> enriched message)",
                f"p50 {h['p50']:.3f} s, p99 {h['p99']:.3f} s" if hops else "not measured",
                "-",
                "-",
                "-",
                "info",
            )
        )
    return [
        Row(
            f"{label}: events/s sustained HTTP -> Postgres",
            f"{sustained:,.0f} events/s; {rows:,} rows of {accepted:,} accepted"
            + (f", {result['errors']} non-204" if result["errors"] else ""),
            f"{prof.e2e_events_s:,} events/s offered",
            f"{sustained / prof.e2e_events_s:.1%}",
            f">= {E2E_SUSTAINED_RATIO:.0%} of offered, no loss",
            verdict(complete and sustained >= E2E_SUSTAINED_RATIO * prof.e2e_events_s),
        ),
        Row(
            f"{label}: freshness (204 -> row visible)",
            (f"p50 {f['p50']:.3f} s, p99 {f['p99']:.3f} s" if fresh else "no marker seen")
            + (f"; {missing} never visible" if missing else ""),
            "-",
            "-",
            f"p99 < {freshness_target_s:.0f} s",
            verdict(bool(fresh) and missing == 0 and f["p99"] < freshness_target_s),
        ),
    ] + hop_rows


# count(*) over the growing table is the probe's heaviest query (it also sets the hint bits of every new
# row): every 3 s is enough for the sustained rate and keeps the probe's load on Postgres small.
COUNT_EVERY_S = 3.0


def drive_probe(probe: FreshnessProbe, load: Loadgen, seconds: float) -> dict[str, Any]:
    """Polls for marker rows every 50 ms while the load runs, then until the pipeline has drained."""
    deadline = time.monotonic() + seconds + 60  # load + grace + drain, whatever happens
    last_count = 0.0
    drained_at: float | None = None
    while time.monotonic() < deadline:
        probe.poll()
        now = time.monotonic()
        if now - last_count >= COUNT_EVERY_S:
            n = probe.count()
            say(f"    [e2e] {n:,} rows visible, {len(probe.pending)} requests awaiting their row")
            last_count = now
        if not load.running():
            if drained_at is None:
                drained_at = now
            if (not probe.pending and probe.incoming.empty()) or now - drained_at > 20:
                break
        time.sleep(0.05)
    result = load.wait(10)
    probe.poll()
    return result


def processors_cost_rows(out: dict[str, Any]) -> list[Row]:
    """With vs without the processors, same run: the share of its own sustained rate the pipeline keeps once the
    processors are in the path (issue 14's target). Empty unless both end-to-end sections ran."""
    without, with_ = out.get("e2e"), out.get("e2e-processors")
    if not without or not with_:
        return []
    ratio = with_["sustained_events_s"] / without["sustained_events_s"]
    return [
        Row(
            "end-to-end: with processors vs without (same run)",
            f"{with_['sustained_events_s']:,.0f} events/s",
            f"{without['sustained_events_s']:,.0f} events/s without",
            f"{ratio:.1%}",
            f">= {WITH_PROCESSORS_VS_WITHOUT:.0%}",
            verdict(ratio >= WITH_PROCESSORS_VS_WITHOUT),
        )
    ]
