"""Broker failures under load on a three-node Apache Kafka KRaft cluster (not part of the test suite).

    .venv/bin/python bench/reliability_brokers.py [--runs 2] [--scenario one|two|both] [--rate 40]

Each run starts its own cluster (replication factor 3, min.insync.replicas=2), Postgres and the stack (api,
processors, sink; restarted if they die, as `site-activity dev` does), then drives open-loop load with
bench/loadgen.py (bounded, 127.0.0.1) and breaks the cluster mid-load:

  one   SIGKILL one broker, keep the load going, restart it.
  two   SIGKILL two brokers: writes must stop with 503 (no 204 for an event only one replica has, which
        acks=all + min.insync.replicas=2 forbid), then restart both.

Then it checks what a user would: the API answered only 204 or 503; every event of a 204 is a row (zero
acknowledged events lost); no event_id twice; no row that was never sent; sessions equal the reference
computation of tests/test_processors.py; every event of a visitor carries its identify's contact. Results go
to stdout (a markdown row per run) and bench/results/reliability_brokers.json. Needs Java 17+ (and Maven the
first time)."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workload import make_bodies  # noqa: E402
from dev_stack.embedded import EmbeddedApacheKafka, EmbeddedPostgres, free_port, wait_until  # noqa: E402
from dev_stack.isolated import isolated_settings  # noqa: E402
from dev_stack.kafka_dist import broker_kind, machine_settings  # noqa: E402
from dev_stack.supervisor import Supervisor  # noqa: E402
from site_activity import widgets  # noqa: E402
from site_activity.db import migrate  # noqa: E402
from site_activity.events import customer_id_for  # noqa: E402
from site_activity.kafka import ensure_topics  # noqa: E402
from tests.test_processors import REFERENCE_SQL  # noqa: E402

KILL_AT_S = 10.0  # seconds into the load
RESTART_AT_S = 25.0
LOAD_S = 40.0
# A 204 may still arrive this long after the second kill for a write both replicas had before it.
SETTLE_S = 2.0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Outcome:
    scenario: str
    statuses: dict[str, int] = field(default_factory=dict)
    requests_204: int = 0
    events_204: int = 0
    rows: int = 0
    missing: int = 0
    duplicates: int = 0
    unknown_rows: int = 0
    sessions_ok: bool = False
    links_ok: bool = False
    acked_while_two_down: int = 0
    probes: dict[str, int] = field(default_factory=dict)
    stage_restarts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    catchup_s: float = 0.0  # from the end of the load until every acknowledged event was a row
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def probe_writes(api: str, widget_id: str, until: float, out: dict[str, int], sent: list[str], seed: int) -> None:
    """Posts fresh one-event bodies back to back until `until` (monotonic), counts the answers and notes the
    event ids (a 503'd event may still be stored later: it was sent)."""
    rng = random.Random(seed)
    while time.monotonic() < until:
        body = make_bodies(widget_id, 1, rng.getrandbits(32))[0]
        body["events"] = body["events"][:1]
        sent.append(body["events"][0]["event_id"])
        try:
            status = str(httpx.post(f"{api}/api/widget/track", json=body, timeout=15).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        out[status] = out.get(status, 0) + 1


def run_scenario(scenario: str, rate: float, run: int, keep: bool) -> Outcome:
    out = Outcome(scenario)
    started = time.monotonic()
    chosen = machine_settings(ROOT)
    work = Path(tempfile.mkdtemp(prefix=f"reliability-{scenario}-"))
    say(f"[{scenario}#{run}] work dir {work}")
    with contextlib.ExitStack() as stack:
        cluster = EmbeddedApacheKafka.from_settings(chosen, work / "kafka", nodes=3, free_ports=True)
        stack.callback(cluster.stop)
        cluster.start()
        say(f"[{scenario}#{run}] 3 brokers at {cluster.bootstrap}")
        pg = EmbeddedPostgres(work / "pg" / "data", free_port())
        stack.callback(pg.stop)
        pg.start()
        migrate(pg.dsn)
        settings = isolated_settings(
            cluster.bootstrap,
            pg.dsn,
            work,
            embedded_broker="kafka",
            topic_replication_factor=3,
            topic_min_insync_replicas=2,
            consumer_session_timeout_ms=6000,
            consumer_heartbeat_interval_ms=1000,
            widget_cache_refresh_s=1.0,
        )
        ensure_topics(settings)
        with psycopg.connect(pg.dsn) as conn:
            w = widgets.create_widget(conn, name="reliability", actor="reliability", tracking_enabled=True)
        sup = Supervisor(settings, work / "logs")
        sup.start()
        stack.callback(sup.stop)
        api = settings.api_origin
        for url in (f"{api}/healthz", settings.health_url("processors"), settings.health_url("sink")):
            wait_until(lambda url=url: healthy(url), 120, url, interval=0.5)

        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                sup.check()

        watcher = threading.Thread(target=watch)
        watcher.start()
        stack.callback(watcher.join)
        stack.callback(done.set)

        requests = int(rate * LOAD_S)
        seed = random.randrange(2**31)
        load_out = open(work / "loadgen.out", "w")  # written by the load generator until it ends  # noqa: SIM115
        load = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "loadgen.py"),
                "--port",
                str(settings.http_port),
                "--widget",
                str(w.id),
                "--mode",
                "open",
                "--rate",
                str(rate),
                "--duration",
                str(LOAD_S),
                "--clients",
                "64",
                "--bodies",
                str(requests + 10),
                "--max-requests",
                str(requests),
                "--seed",
                str(seed),
                "--markers",
                "--grace",
                "20",
            ],
            stdout=load_out,
            stderr=subprocess.DEVNULL,
        )
        t0 = time.monotonic()
        victims = [1] if scenario == "one" else [1, 2]
        probe_ids: list[str] = []
        time.sleep(max(0.0, t0 + KILL_AT_S - time.monotonic()))
        killed_at = time.monotonic()
        for v in victims:
            cluster.kill(v)
        say(f"[{scenario}#{run}] SIGKILLed broker(s) {[v + 1 for v in victims]}")
        if scenario == "two":
            probes = [
                threading.Thread(
                    target=probe_writes, args=(api, str(w.id), t0 + RESTART_AT_S, out.probes, probe_ids, i)
                )
                for i in range(4)
            ]
            time.sleep(SETTLE_S)
            for p in probes:
                p.start()
            for p in probes:
                p.join()
        time.sleep(max(0.0, t0 + RESTART_AT_S - time.monotonic()))
        restart_at = time.monotonic()
        cluster.restart(*victims)
        say(f"[{scenario}#{run}] broker(s) back after {time.monotonic() - restart_at:.1f}s")
        load.wait(LOAD_S + 60)
        load_out.close()
        load_done = time.monotonic()
        result, acked = parse_loadgen(work / "loadgen.out")
        out.statuses = result["statuses"]
        out.requests_204 = len(acked)
        if scenario == "two":
            out.acked_while_two_down = sum(1 for t in acked.values() if killed_at + SETTLE_S <= t < restart_at)

        bodies = {b["events"][0]["event_id"]: b for b in make_bodies(str(w.id), requests + 10, seed)}
        acked_ids = {uuid.UUID(e["event_id"]) for first in acked for e in bodies[first]["events"]}
        sent_ids = {uuid.UUID(e["event_id"]) for b in bodies.values() for e in b["events"]}
        sent_ids |= {uuid.UUID(i) for i in probe_ids}
        out.events_204 = len(acked_ids)
        check_rows(out, pg.dsn, w, acked_ids, sent_ids, load_done)
        out.stage_restarts = dict(sup._restarts)
    out.seconds = round(time.monotonic() - started, 1)
    judge(out)
    if out.ok and not keep:
        shutil.rmtree(work, ignore_errors=True)  # ~120 MB of broker and Postgres data; kept when a check fails
    return out


def parse_loadgen(path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    acked: dict[str, float] = {}
    result: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if line.startswith("M "):
            _, first, t = line.split()
            acked[first] = float(t)
        elif line.startswith("R "):
            result = json.loads(line[2:])
    return result, acked


def check_rows(
    out: Outcome, dsn: str, w: widgets.Widget, acked: set[uuid.UUID], sent: set[uuid.UUID], load_done: float
) -> None:
    """Waits (up to 3 minutes) for every acknowledged event to be a row, then compares with the references."""
    with psycopg.connect(dsn, autocommit=True) as db:

        def stored() -> set[uuid.UUID]:
            return {
                r[0]
                for r in db.execute(
                    "SELECT event_id FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start'",
                    (w.id,),
                )
            }

        with contextlib.suppress(TimeoutError):
            wait_until(lambda: acked <= stored(), 180, "acknowledged events in Postgres", interval=2)
        out.catchup_s = round(time.monotonic() - load_done, 1)
        say(f"[{out.scenario}] acknowledged events in Postgres {out.catchup_s}s after the load ended")
        time.sleep(5)  # late deliveries of 503-answered requests (allowed) settle before the counts
        rows = stored()
        out.rows = len(rows)
        out.missing = len(acked - rows)
        out.unknown_rows = len(rows - sent)
        out.duplicates = db.execute(
            "SELECT count(*) FROM (SELECT event_id FROM visitor_events WHERE widget_id = %s "
            "GROUP BY event_id HAVING count(*) > 1) d",
            (w.id,),
        ).fetchone()[0]
        expected = {(v, t) for v, t in db.execute(REFERENCE_SQL, (w.id,))}
        starts = [
            (v, t)
            for v, t in db.execute(
                "SELECT visitor_id, occurred_at FROM visitor_events WHERE "
                "widget_id = %s AND event_type = 'session_start'",
                (w.id,),
            )
        ]
        wrong_session = events_outside_their_session(db, w)
        out.sessions_ok = set(starts) == expected and len(starts) == len(expected) and wrong_session == 0
        identifies = db.execute(
            "SELECT visitor_id, user_id, customer_id FROM visitor_events WHERE widget_id = %s "
            "AND event_type = 'identify'",
            (w.id,),
        ).fetchall()
        contact = {v: customer_id_for(w.tenant_id, u) for v, u, _ in identifies}
        wrong_contact = sum(1 for v, _, c in identifies if c != contact[v])
        # Every event of a visitor who identified carries the contact (events before the identify in the same
        # request included); visitors whose identify was never stored are not judged here.
        for v, c in db.execute("SELECT visitor_id, customer_id FROM visitor_events WHERE widget_id = %s", (w.id,)):
            if v in contact and c != contact[v]:
                wrong_contact += 1
        out.links_ok = wrong_contact == 0


def events_outside_their_session(db: psycopg.Connection, w: widgets.Widget) -> int:
    """Events whose session_id is not that of the visitor's latest session_start at or before them (the
    test's correlated query, in one ordered pass: that query is quadratic at this volume)."""
    wrong = 0
    current: tuple[str, Any] = ("", None)
    for visitor, kind, session in db.execute(
        "SELECT visitor_id, event_type, session_id FROM visitor_events WHERE widget_id = %s "
        "ORDER BY visitor_id, occurred_at, event_type <> 'session_start'",
        (w.id,),
    ):
        if kind == "session_start":
            current = (visitor, session)
        elif current != (visitor, session):
            wrong += 1
    return wrong


def judge(out: Outcome) -> None:
    other = {s: n for s, n in out.statuses.items() if s not in ("204", "503")}
    if other:
        out.problems.append(f"answers other than 204/503: {other}")
    if out.missing:
        out.problems.append(f"{out.missing} acknowledged events are not rows")
    if out.duplicates:
        out.problems.append(f"{out.duplicates} event ids stored twice")
    if out.unknown_rows:
        out.problems.append(f"{out.unknown_rows} rows were never sent")
    if not out.sessions_ok:
        out.problems.append("sessions differ from the reference")
    if not out.links_ok:
        out.problems.append("events without their identify's contact")
    if out.scenario == "two":
        if out.acked_while_two_down:
            out.problems.append(f"{out.acked_while_two_down} requests answered 204 with two brokers down")
        probe_other = {s: n for s, n in out.probes.items() if s != "503"}
        if probe_other or not out.probes:
            out.problems.append(f"writes with two brokers down were not all 503: {out.probes}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--scenario", choices=["one", "two", "both"], default="both")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (25 events each)")
    p.add_argument("--keep", action="store_true", help="keep each run's work dir (logs, data) even when it passes")
    args = p.parse_args(argv)
    if broker_kind(machine_settings(ROOT)) != "kafka":
        print("needs Apache Kafka: Java 17+ (and Maven to fetch it); see scripts/kafka", file=sys.stderr)
        return 2
    outcomes: list[Outcome] = []
    for run in range(1, args.runs + 1):
        for scenario in ["one", "two"] if args.scenario == "both" else [args.scenario]:
            o = run_scenario(scenario, args.rate, run, args.keep)
            outcomes.append(o)
            say(f"[{scenario}#{run}] {'PASS' if o.ok else 'FAIL'} {json.dumps(o.__dict__ | {'ok': o.ok})}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "reliability_brokers.json").write_text(
        json.dumps([o.__dict__ | {"ok": o.ok} for o in outcomes], indent=2) + "\n"
    )
    print(
        "\n| scenario | requests 204 | events 204 | 503 | rows | acked lost | duplicates | sessions/links "
        "| 204 with 2 down | probes | stage restarts | result |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        print(
            f"| {o.scenario} | {o.requests_204} | {o.events_204} | {o.statuses.get('503', 0)} | {o.rows} | "
            f"{o.missing} | {o.duplicates} | {'ok' if o.sessions_ok and o.links_ok else 'WRONG'} | "
            f"{o.acked_while_two_down if o.scenario == 'two' else '-'} | {o.probes or '-'} | "
            f"{sum(o.stage_restarts.values())} | {'PASS' if o.ok else 'FAIL: ' + '; '.join(o.problems)} |"
        )
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
