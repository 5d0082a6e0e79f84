"""Reliability under kills (issue 8, case 16): the dev-like stack (the embedded broker that
`SITE_ACTIVITY_EMBEDDED_BROKER` picks — Apache Kafka where Java 17+ is found, else Tansu — + Postgres, the api, processors and sink
as real processes with their default settings), an open loop of unique-body requests (bench/loadgen.py), and
SIGKILLs of the processors and of the sink, each restarted at once (as a supervisor would). Reports the events
answered 204, their rows, what was lost, duplicates (rows per event id, session_starts per session) and each
stage's peak memory (RSS). Not part of the test suite: a load run, minutes long.

    .venv/bin/python bench/reliability_kills.py                          # 8 min, 60 req/s x 25 events, 3+3 kills
    .venv/bin/python bench/reliability_kills.py --duration 150 --processors-kills 2 --sink-kills 2

The kills are spread evenly over the run, processors and sink alternating. Exit status 0 only when every
event answered 204 is exactly one row. Results: bench/results/reliability-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import Loadgen, post_until_accepted  # noqa: E402
from bench.workload import make_bodies  # noqa: E402
from dev_stack.embedded import EmbeddedPostgres, free_port, make_broker, wait_until  # noqa: E402
from dev_stack.isolated import isolated_settings  # noqa: E402
from dev_stack.kafka_dist import broker_kind  # noqa: E402
from dev_stack.process import StageProcess  # noqa: E402
from site_activity import widgets  # noqa: E402
from site_activity.db import migrate  # noqa: E402
from site_activity.kafka import ensure_topics  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from site_activity.settings import Stage as StageName  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
REPAIR_LOG = "faust would commit past messages"  # transport.py's warning when the repair fires


def say(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


class Stage:
    """One stage process that can be SIGKILLed and restarted; its peak RSS over all its lives is tracked."""

    def __init__(self, name: StageName, settings: Settings, workdir: Path) -> None:
        self.name = name
        self.proc = StageProcess(name, settings, workdir / f"{name}.log")
        self.health = settings.health_url(name)
        self.peak_rss = 0
        self.kills = 0

    def start(self, timeout: float = 90.0) -> None:
        self.proc.start()
        wait_until(self._healthy, timeout, f"site-activity {self.name}", interval=0.2)

    def _healthy(self) -> bool:
        import urllib.error
        import urllib.request

        if not self.proc.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.proc.log_tail()}")
        try:
            with urllib.request.urlopen(self.health, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def kill_and_restart(self) -> None:
        say(f"SIGKILL {self.name} (pid {self.proc.pid})")
        self.proc.kill()
        self.kills += 1
        self.start()
        say(f"{self.name} back (pid {self.proc.pid})")

    def sample(self) -> None:
        pid = self.proc.pid
        if pid is None:
            return
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, psutil.Process(pid).memory_info().rss)

    def stop(self) -> None:
        self.proc.stop()


@contextlib.contextmanager
def infrastructure(workdir: Path, bootstrap: str | None) -> Iterator[tuple[str, str]]:
    """(kafka bootstrap, postgres dsn): a fresh Postgres, and a fresh embedded broker (the configured kind)
    unless a broker is given."""
    pg = EmbeddedPostgres(workdir / "pg", free_port())
    pg.start()
    broker = None
    try:
        migrate(pg.dsn)
        if bootstrap is None:
            broker = make_broker(Settings(), workdir / "broker", free_ports=True)
            broker.start()
            bootstrap = broker.bootstrap
        yield bootstrap, pg.dsn
    finally:
        if broker is not None:
            broker.stop()
        pg.stop()


def kill_schedule(duration: float, processors: int, sink: int) -> list[tuple[float, str]]:
    """(seconds into the load, stage): evenly spread, processors and sink alternating."""
    names = [("processors", i) for i in range(processors)] + [("sink", i) for i in range(sink)]
    names.sort(key=lambda n: (n[1], n[0] != "processors"))
    step = duration / (len(names) + 1)
    return [(step * (i + 1), name) for i, (name, _) in enumerate(names)]


def count_rows(dsn: str, widget_id: str) -> dict[uuid.UUID, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute(
                "SELECT event_id, count(*) FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start' "
                "GROUP BY event_id",
                (widget_id,),
            ).fetchall()
        )


def session_start_duplicates(dsn: str, widget_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        return int(
            conn.execute(
                "SELECT count(*) FROM (SELECT session_id FROM visitor_events WHERE widget_id = %s "
                "AND event_type = 'session_start' GROUP BY session_id HAVING count(*) > 1) d",
                (widget_id,),
            ).fetchone()[0]
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="reliability-"))
    say(f"work directory {workdir}")
    with infrastructure(workdir, args.kafka_bootstrap) as (bootstrap, dsn):
        tag = uuid.uuid4().hex[:8]
        # The dev stack's defaults; only addresses, names and ports are set here.
        s = isolated_settings(
            bootstrap,
            dsn,
            workdir / "data",
            topic_prefix=f"rel-{tag}",
            sink_group=f"rel-sink-{tag}",
            processors_app_id=f"rel-proc-{tag}",
        )
        ensure_topics(s)
        with psycopg.connect(dsn) as conn:
            w = widgets.create_widget(conn, name="reliability", actor="bench", tracking_enabled=True)
        widget_id = str(w.id)
        stages = {
            "api": Stage("api", s, workdir),
            "processors": Stage("processors", s, workdir),
            "sink": Stage("sink", s, workdir),
        }
        try:
            for stage in stages.values():
                say(f"starting {stage.name}")
                stage.start()
            return _load_and_kill(args, s, dsn, widget_id, stages, workdir)
        finally:
            for stage in stages.values():
                stage.stop()


def _load_and_kill(
    args: argparse.Namespace, s: Settings, dsn: str, widget_id: str, stages: dict[str, Stage], workdir: Path
) -> dict[str, Any]:
    probe = make_bodies(widget_id, 1, seed=args.seed + 1)[0]
    post_until_accepted(s.http_port, probe)
    n_bodies = int(args.rate * args.duration) + 100  # every request a body of its own: unique event ids
    bodies = make_bodies(widget_id, n_bodies, seed=args.seed)  # what the load generator sends (same seed)
    ids_of = {b["events"][0]["event_id"]: [e["event_id"] for e in b["events"]] for b in bodies}
    accepted: list[str] = [e["event_id"] for e in probe["events"]]
    lock = threading.Lock()

    def on_marker(first_id: str, _t: float) -> None:
        with lock:
            accepted.extend(ids_of[first_id])

    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            for stage in stages.values():
                stage.sample()
            stop.wait(1.0)

    threading.Thread(target=sampler, daemon=True).start()
    schedule = kill_schedule(args.duration, args.processors_kills, args.sink_kills)
    say(
        f"open loop: {args.rate} requests/s x 25 events for {args.duration:.0f}s; kills at "
        + ", ".join(f"{t:.0f}s {name}" for t, name in schedule)
    )
    load = Loadgen(
        "reliability",
        s.http_port,
        widget_id,
        "--mode",
        "open",
        "--rate",
        str(args.rate),
        "--duration",
        str(args.duration),
        "--clients",
        "64",
        "--bodies",
        str(n_bodies),
        "--seed",
        str(args.seed),
        "--grace",
        "30",
        on_marker=on_marker,
    )
    started = time.monotonic()
    try:
        for at, name in schedule:
            delay = started + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stages[name].kill_and_restart()
        result = load.wait(args.duration + 120)
    finally:
        load.stop()
    say(f"load done: {result['requests_ok']} requests answered 204, statuses {result['statuses']}")

    wanted = {uuid.UUID(i) for i in accepted}
    deadline = time.monotonic() + args.drain_timeout
    rows: dict[uuid.UUID, int] = {}
    while time.monotonic() < deadline:
        rows = count_rows(dsn, widget_id)
        if wanted <= rows.keys():
            break
        time.sleep(2.0)
    stop.set()
    lost = wanted - rows.keys()
    repairs = stages["processors"].proc.log_path.read_text(errors="replace").count(REPAIR_LOG)
    report = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "broker": args.kafka_bootstrap or broker_kind(Settings()),
        "duration_s": args.duration,
        "rate_req_s": args.rate,
        "kills": {name: stage.kills for name, stage in stages.items()},
        "events_204": len(wanted),
        "rows": sum(rows.values()),
        "distinct_event_rows": len(rows),
        "lost": len(lost),
        "lost_sample": sorted(map(str, lost))[:10],
        "rows_not_answered_204": len(rows.keys() - wanted),  # e.g. requests that landed but timed out client-side
        "duplicate_rows": sum(n - 1 for n in rows.values() if n > 1),
        "duplicate_session_starts": session_start_duplicates(dsn, widget_id),
        "peak_rss_mb": {name: round(stage.peak_rss / 2**20, 1) for name, stage in stages.items()},
        "repair_fired": repairs,
        "non_204": result["errors"],
        "workdir": str(workdir),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=480.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=60.0, help="requests per second (25 events each)")
    p.add_argument("--processors-kills", type=int, default=3)
    p.add_argument("--sink-kills", type=int, default=3)
    p.add_argument("--drain-timeout", type=float, default=300.0, help="seconds to wait for the rows after the load")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--kafka-bootstrap", default=None, help="use this broker instead of a fresh embedded one")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(args)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"reliability-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    say(
        f"{'OK' if report['lost'] == 0 and report['duplicate_rows'] == 0 else 'FAILED'}: "
        f"{report['events_204']} events answered 204, {report['lost']} lost, {report['duplicate_rows']} duplicate rows;"
        f" written to {out}"
    )
    return 0 if report["lost"] == 0 and report["duplicate_rows"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
