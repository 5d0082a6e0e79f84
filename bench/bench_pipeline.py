"""Pipeline benchmark: ingest API, sink, end to end, and the Avro codec, each next to its limit measured
in the same run on the same embedded stack (own broker + Postgres on free ports, started and stopped here;
SITE_ACTIVITY_EMBEDDED_BROKER=kafka|tansu picks the broker, default Apache Kafka where Java 17+ is found).

    .venv/bin/python bench/bench_pipeline.py            # full run, about 4-6 minutes
    .venv/bin/python bench/bench_pipeline.py --quick    # smoke test, about 1.5 minutes

Prints a table (and a markdown copy for the README) and writes bench/results/pipeline.json.
See bench/README.md for what each row means."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import (  # noqa: E402
    COPY_COLUMNS, EVENTS_PER_BODY, JsonText, JsonTextBinaryDumper, copy_row, encoded_batches, encoded_messages,
    http_request, make_bodies, to_records,
)
from site_activity import widgets  # noqa: E402
from site_activity.db import migrate  # noqa: E402
from site_activity.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, make_broker, wait_until  # noqa: E402
from site_activity.kafka_dist import machine_settings  # noqa: E402
from site_activity.kafka import consumer_config, ensure_topics, producer_config  # noqa: E402
from site_activity.process import StageProcess  # noqa: E402
from site_activity.settings import Settings  # noqa: E402
from site_activity.topics import Topics  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
CACHE_DIR = ROOT / "bench" / ".cache"
LOADGEN = ROOT / "bench" / "loadgen.py"
CODEC_BENCH = ROOT / "bench" / "codec_bench.py"

INGEST_TARGET_EVENTS_S = 20_000
INGEST_P99_TARGET_MS = 50.0
SINK_TARGET_RATIO = 0.5
FRESHNESS_P99_TARGET_S = 2.0
FRESHNESS_WITH_PROCESSORS_P99_TARGET_S = 3.0
E2E_SUSTAINED_RATIO = 0.95
# Other processes' CPU during a phase above which the run is flagged as not clean.
NOISY_OTHER_CORES = 0.25


@dataclass(frozen=True)
class Profile:
    """How much work each section does; --quick is a smoke test, not a measurement to publish."""

    bare_messages: int
    closed_seconds: float
    open_seconds: float
    clients: int
    sink_events: int
    e2e_events_s: int
    e2e_seconds: float
    codec_seconds: float


FULL = Profile(bare_messages=400_000, closed_seconds=15, open_seconds=15, clients=32, sink_events=200_000,
               e2e_events_s=10_000, e2e_seconds=30, codec_seconds=2.0)
QUICK = Profile(bare_messages=100_000, closed_seconds=5, open_seconds=5, clients=32, sink_events=50_000,
                e2e_events_s=10_000, e2e_seconds=10, codec_seconds=0.7)


@dataclass
class Row:
    what: str
    measured: str
    limit: str
    ratio: str
    target: str
    result: str  # PASS / FAIL / info / n/a


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- the embedded stack ----------------------------------------------------------------------------


class Stack:
    """Postgres for the whole run, a fresh broker per section (SITE_ACTIVITY_EMBEDDED_BROKER: Apache Kafka or
    Tansu, whose memory storage slows down as it grows)."""

    def __init__(self, workdir: Path, exit_stack: contextlib.ExitStack, profiler: Profiler, cpu: CpuMeter) -> None:
        self.workdir = workdir
        self.exit = exit_stack
        self.profiler = profiler
        self.cpu = cpu
        self.postgres = EmbeddedPostgres(workdir / "pg" / "data", free_port())

    def start_postgres(self) -> None:
        say(f"starting Postgres on 127.0.0.1:{self.postgres.port}")
        self.exit.callback(self.postgres.stop)
        self.postgres.start()
        migrate(self.postgres.dsn)

    @contextlib.contextmanager
    def kafka(self, section: str) -> Iterator[EmbeddedBroker]:
        chosen = machine_settings(ROOT)
        broker = make_broker(chosen, self.workdir / f"{section}-{chosen.broker_kind}", free_ports=True)
        say(f"[{section}] starting a fresh {chosen.broker_kind} broker on {broker.bootstrap}")
        try:
            broker.start()
            yield broker
        finally:
            broker.stop()

    def settings(self, section: str, broker: EmbeddedBroker) -> Settings:
        s = Settings(
            data_dir=self.workdir / section, kafka_bootstrap=broker.bootstrap, postgres_dsn=self.postgres.dsn,
            topic_prefix=f"bench-{section}", sink_group=f"bench-sink-{section}",
            processors_app_id=f"bench-proc-{section}", http_port=free_port(), sink_http_port=free_port(),
            demo_port=free_port(), processors_web_port=free_port(),
            # Tansu holds a JoinGroup for session_timeout/2: keep group start-up short (see the Tansu notes).
            consumer_session_timeout_ms=6000, consumer_heartbeat_interval_ms=1000,
            widget_cache_refresh_s=1.0, sink_from_enriched=False,
        )
        ensure_topics(s)
        return s

    @contextlib.contextmanager
    def stage(self, name: str, settings: Settings, health_port: int | None) -> Iterator[StageProcess]:
        proc = StageProcess(name, settings, self.workdir / f"{settings.topic_prefix}-{name}.log")
        say(f"starting `site-activity {name}`")
        proc.start()
        try:
            if health_port is not None:
                wait_until(lambda: self._healthy(proc, health_port), 60, f"site-activity {name}", interval=0.2)
            yield proc
            if health_port is not None:
                self._save_metrics(f"{settings.topic_prefix}-{name}", health_port)
        except BaseException:
            print(f"--- last lines of the {name} log ---\n{proc.log_tail()}", file=sys.stderr)
            raise
        finally:
            proc.stop()

    def _save_metrics(self, name: str, port: int) -> None:
        """The stage's final /metrics, kept with the logs for looking into a run (batch sizes, lag, ages)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                (self.workdir / f"{name}.metrics.txt").write_bytes(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            say(f"could not save the metrics of {name}: {exc}")

    @staticmethod
    def _healthy(proc: StageProcess, port: int) -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.stage} exited early:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def widget(self, name: str) -> tuple[str, str]:
        with psycopg.connect(self.postgres.dsn) as conn:
            w = widgets.create_widget(conn, name=name, actor="bench", tracking_enabled=True)
        return str(w.id), str(w.tenant_id)

    def truncate_events(self) -> None:
        """A clean start for a section: no rows, and a checkpoint, so that a checkpoint triggered by the WAL of
        earlier sections (1 GB default max_wal_size) does not land in this one and slow its inserts down."""
        with psycopg.connect(self.postgres.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE visitor_events CASCADE")  # webhook deliveries reference events (0008)
            conn.execute("VACUUM ANALYZE visitor_events")
            conn.execute("CHECKPOINT")


# --- building blocks -------------------------------------------------------------------------------


class CpuMeter:
    """CPU used by this benchmark's process tree vs the whole machine during a phase: on a shared 2-core box
    other processes' load shows up as latency tails, and this says whether it was there."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    @staticmethod
    def _ours() -> float:
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                # children_* holds the reaped children (a finished load generator, exited Postgres backends).
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        t0, ours0, all0 = time.monotonic(), self._ours(), self._machine()
        try:
            yield
        finally:
            wall = time.monotonic() - t0
            ours, machine = (self._ours() - ours0) / wall, (self._machine() - all0) / wall
            self.phases[phase] = {"seconds": round(wall, 2), "bench_cores": round(ours, 2),
                                  "other_cores": round(max(machine - ours, 0.0), 2), "cpus": psutil.cpu_count() or 0}
            say(f"    [{phase}] CPU: this benchmark {ours:.2f} cores, other processes {max(machine - ours, 0):.2f} "
                f"cores (of {psutil.cpu_count()})")


class Profiler:
    """--py-spy: samples a stage while it is being measured and writes its collapsed stacks plus a summary of
    where the time goes to bench/results/profiles/. Idle (waiting) samples are kept and stacks are per thread,
    so the summary splits wall time, e.g. decoding vs waiting for Postgres. Sampling costs a little CPU: do
    not publish numbers from a profiled run."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.dir = RESULTS_DIR / "profiles"
        self.exe = str(Path(sys.executable).parent / "py-spy")
        if enabled:
            if not Path(self.exe).exists():
                raise SystemExit("--py-spy needs py-spy: .venv/bin/pip install -e '.[bench]'")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)

    @contextlib.contextmanager
    def record(self, name: str, *procs: StageProcess) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        spies = [(proc, subprocess.Popen(
            [self.exe, "record", "--pid", str(proc.pid), "--rate", "100", "--nonblocking", "--idle", "--threads",
             "--format", "raw",
             "--output", str(self.dir / f"{name}-{proc.stage}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) for proc in procs if proc.pid]
        try:
            yield
        finally:
            for proc, spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
                self._summarise(self.dir / f"{name}-{proc.stage}.txt")

    @staticmethod
    def _summarise(raw: Path, top: int = 15) -> None:
        """Per thread: its share of the samples, and the functions it spends them in (self and inclusive).
        Idle samples are included, so an event loop waiting in select() shows up as such."""
        threads: dict[str, dict[str, dict[str, int]]] = {}
        for line in raw.read_text(errors="replace").splitlines() if raw.exists() else []:
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frames = stack.split(";")
            thread = frames[0] if frames[0].startswith("thread") else "all threads"
            stats = threads.setdefault(thread, {"total": {"": 0}, "self": {}, "incl": {}})
            count = int(n)
            stats["total"][""] += count
            stats["self"][frames[-1]] = stats["self"].get(frames[-1], 0) + count
            for frame in set(frames[1:]):
                stats["incl"][frame] = stats["incl"].get(frame, 0) + count
        if not threads:
            return
        grand = sum(t["total"][""] for t in threads.values())
        lines = [f"{grand} samples at 100 Hz (idle included), {len(threads)} thread(s)"]
        for name, stats in sorted(threads.items(), key=lambda kv: -kv[1]["total"][""]):
            total = stats["total"][""]
            lines += ["", f"== {name}: {100 * total / grand:.1f}% of samples", "self %  function (share of this thread)"]
            lines += [f"{100 * c / total:5.1f}  {f}" for f, c in sorted(stats["self"].items(), key=lambda kv: -kv[1])[:top]]
            lines += ["incl %  function"]
            lines += [f"{100 * c / total:5.1f}  {f}" for f, c in sorted(stats["incl"].items(), key=lambda kv: -kv[1])[:top * 2]]
        raw.with_suffix(".summary.txt").write_text("\n".join(lines) + "\n")


def bare_produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]], label: str) -> dict[str, Any]:
    """The limit for the API: the same librdkafka producer settings and bytes, no HTTP, no validation."""
    producer = Producer(producer_config(settings))
    failed: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    start = time.perf_counter()
    for i, (key, value) in enumerate(messages, 1):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:  # bounded queue full: let librdkafka drain it
                producer.poll(0.01)
        producer.poll(0)
        if i % 100_000 == 0:
            say(f"    [{label}] {i:,} messages queued")
    left = producer.flush(120)
    elapsed = time.perf_counter() - start
    if left or failed:
        raise RuntimeError(f"bare producer: {left} undelivered, {len(failed)} failed ({failed[:1]})")
    return {"messages": len(messages), "seconds": round(elapsed, 3), "msgs_per_s": len(messages) / elapsed,
            "avg_bytes": sum(len(v) for _, v in messages) / len(messages)}


class Loadgen:
    """bench/loadgen.py as a child process; its marker lines are handed to a callback from a reader thread."""

    def __init__(self, label: str, port: int, widget: str, *options: str, on_marker: Callable[[str, float], None] | None = None):
        cmd = [sys.executable, str(LOADGEN), "--port", str(port), "--widget", widget, "--label", label, *options]
        if on_marker is not None:
            cmd.append("--markers")
        self.on_marker = on_marker
        self.result: dict[str, Any] | None = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("M ") and self.on_marker is not None:
                _, marker, t_done = line.split()
                self.on_marker(marker, float(t_done))
            elif line.startswith("R "):
                self.result = json.loads(line[2:])

    def running(self) -> bool:
        return self.proc.poll() is None or self.reader.is_alive()

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"load generator overran its {timeout:.0f}s bound") from None
        except BaseException:  # Ctrl-C / SIGTERM: it runs in its own session, so stop it ourselves
            self.stop()
            raise
        self.reader.join(10)
        if self.proc.returncode != 0 or self.result is None:
            raise RuntimeError(f"load generator failed (exit {self.proc.returncode})")
        return self.result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def post_until_accepted(port: int, body: dict[str, Any], timeout: float = 30.0) -> None:
    """The API learns about widgets from a periodically refreshed cache: retry until it accepts the batch."""
    raw = http_request(body, port)
    payload = raw[raw.index(b"\r\n\r\n") + 4:]
    last = ""

    def accepted() -> bool:
        nonlocal last
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/widget/track", data=payload,
                                     headers={"Content-Type": "text/plain"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return bool(resp.status == 204)
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
            return False

    try:
        wait_until(accepted, timeout, "API accepting the benchmark widget", interval=0.3)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}; last answer: {last}") from None


def wait_rows(dsn: str, widget_id: str, expected: int, timeout: float) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        wait_until(lambda: conn.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s",
                                        (widget_id,)).fetchone()[0] >= expected, timeout, f"{expected} rows", 0.2)


# --- sections --------------------------------------------------------------------------------------


def section_ingest(stack: Stack, prof: Profile, out: dict[str, Any]) -> list[Row]:
    with stack.kafka("ingest") as broker:
        s = stack.settings("ingest", broker)
        topic = Topics.from_settings(s).raw_events
        widget_id, tenant_id = stack.widget("bench ingest")

        say(f"[ingest] bare producer: encoding {prof.bare_messages:,} events as the API does")
        messages = encoded_messages(make_bodies(widget_id, prof.bare_messages // EVENTS_PER_BODY, seed=1), tenant_id)
        say("[ingest] bare producer: producing")
        bare = bare_produce(s, topic, messages, "bare producer")
        del messages
        say(f"[ingest] bare producer: {bare['msgs_per_s']:,.0f} msgs/s")

        with stack.stage("api", s, s.http_port) as api:
            post_until_accepted(s.http_port, make_bodies(widget_id, 1, seed=2)[0])
            say(f"[ingest] closed loop: {prof.clients} clients x batches of {EVENTS_PER_BODY}, {prof.closed_seconds:.0f}s")
            closed = Loadgen("closed loop", s.http_port, widget_id, "--mode", "closed", "--clients", str(prof.clients),
                             "--warmup", "2", "--duration", str(prof.closed_seconds), "--bodies", "3000")
            with stack.profiler.record("ingest-closed", api), stack.cpu.measure("ingest closed loop"):
                closed_res = closed.wait(prof.closed_seconds + 40)
            say(f"[ingest] load generator used {closed_res['client_cores']:.2f} cores")
            half_rate = closed_res["events_per_s"] / 2 / EVENTS_PER_BODY
            say(f"[ingest] open loop at half that load: {half_rate:,.0f} requests/s, {prof.open_seconds:.0f}s")
            open_ = Loadgen("open loop", s.http_port, widget_id, "--mode", "open", "--clients", "64", "--warmup", "1",
                            "--rate", f"{max(half_rate, 1.0):.2f}", "--duration", str(prof.open_seconds),
                            "--bodies", "3000", "--seed", "7")
            with stack.profiler.record("ingest-open", api), stack.cpu.measure("ingest open loop"):
                open_res = open_.wait(prof.open_seconds + 40)
    out["ingest"] = {"bare_producer": bare, "closed_loop": closed_res, "open_loop_half_load": open_res}

    c_lat, o_lat = closed_res["latency_ms"], open_res["latency_ms"]
    ev_s = closed_res["events_per_s"]
    closed_errors = f", {closed_res['errors']} non-204" if closed_res["errors"] else ""
    open_ok = open_res["errors"] == 0 and o_lat["p99"] is not None and o_lat["p99"] < INGEST_P99_TARGET_MS
    return [
        Row("ingest: events/s via POST /api/widget/track (closed loop)",
            f"{ev_s:,.0f} events/s{closed_errors}", f"{bare['msgs_per_s']:,.0f} msgs/s bare producer",
            f"{ev_s / bare['msgs_per_s']:.1%}", f">= {INGEST_TARGET_EVENTS_S:,} events/s",
            verdict(ev_s >= INGEST_TARGET_EVENTS_S and closed_res["errors"] == 0)),
        Row(f"ingest: latency at max load ({prof.clients} clients)", f"p50 {c_lat['p50']} ms, p99 {c_lat['p99']} ms",
            "-", "-", "-", "info"),
        Row(f"ingest: latency at half load ({open_res['rate_req_s'] * EVENTS_PER_BODY:,.0f} events/s, open loop)",
            f"p50 {o_lat['p50']} ms, p99 {o_lat['p99']} ms" + (f", {open_res['errors']} non-204" if open_res["errors"] else ""),
            "-", "-", f"p99 < {INGEST_P99_TARGET_MS:.0f} ms", verdict(open_ok)),
    ]


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
            conn.execute("ALTER TABLE bench_copy"
                         " ADD FOREIGN KEY (widget_id) REFERENCES widget_configs (id) ON DELETE CASCADE,"
                         " ADD FOREIGN KEY (customer_id) REFERENCES customers (id) ON DELETE SET NULL")
        conn.commit()
        start = time.perf_counter()
        for at in range(0, len(rows), batch):
            with conn.cursor() as cur, cur.copy(f"COPY bench_copy ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
                for row in rows[at:at + batch]:
                    copy.write_row(row)
            conn.commit()
        elapsed = time.perf_counter() - start
        count = conn.execute("SELECT count(*) FROM bench_copy").fetchone()[0]  # type: ignore[index]
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
        preload = bare_produce(s, topic, encoded_batches(bodies, tenant_id), "preload")

        say(f"[sink] bare binary COPY of the same {n:,} rows (10k-row batches), with and without foreign keys")
        copy_rows = [copy_row(r) for r in records]
        copy = bare_copy(stack.postgres.dsn, copy_rows)
        copy_no_fk = bare_copy(stack.postgres.dsn, copy_rows, foreign_keys=False)
        del records, bodies, copy_rows
        say(f"[sink] bare COPY: {copy['rows_per_s']:,.0f} rows/s ({copy_no_fk['rows_per_s']:,.0f} without foreign keys)")

        with stack.stage("sink", s, None) as proc, psycopg.connect(stack.postgres.dsn, autocommit=True) as conn:
            with stack.profiler.record("sink", proc), stack.cpu.measure("sink"):
                sink = poll_sink(conn, proc, widget_id, n, timeout=max(60.0, n / 2_000))
    out["sink"] = {"preload": preload, "bare_copy": copy, "bare_copy_without_foreign_keys": copy_no_fk, "sink": sink}
    ratio = sink["rows_per_s"] / copy["rows_per_s"]
    ratio_no_fk = sink["rows_per_s"] / copy_no_fk["rows_per_s"]
    return [Row("sink: rows/s raw topic -> visitor_events", f"{sink['rows_per_s']:,.0f} rows/s",
                f"{copy['rows_per_s']:,.0f} rows/s bare binary COPY (same constraints)", f"{ratio:.1%}",
                f">= {SINK_TARGET_RATIO:.0%} of bare COPY", verdict(ratio >= SINK_TARGET_RATIO and sink["complete"])),
            Row("sink: same, vs a COPY that skips the foreign-key checks", f"{sink['rows_per_s']:,.0f} rows/s",
                f"{copy_no_fk['rows_per_s']:,.0f} rows/s bare binary COPY (no FKs)", f"{ratio_no_fk:.1%}",
                "-", "info")]


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
                count = _count(conn, widget_id)
                first = (t, count)
        else:
            count = _count(conn, widget_id)
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
    return {"rows": count, "complete": count == n, "startup_s": round(first[0] - start, 3),
            "first_poll_rows": first[1], "seconds": round(end - first[0], 3), "rows_per_s": rows_per_s}


def _count(conn: psycopg.Connection, widget_id: str) -> int:
    """Events of the widget as sent (the processors' derived session_start rows are not counted)."""
    return int(conn.execute("SELECT count(*) FROM visitor_events WHERE widget_id = %s AND event_type <> 'session_start'",
                            (widget_id,)).fetchone()[0])  # type: ignore[index]


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
        n = _count(self.conn, str(self.widget_id))
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
        self._consumer = Consumer(consumer_config(settings, f"bench-tap-{uuid.uuid4().hex[:8]}",
                                                  **{}))
        self._consumer.subscribe(topics)
        self._thread = threading.Thread(target=self._run, name="hop-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    self.first_seen[msg.topic()].setdefault(msg.key(), msg.timestamp()[1])

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
    return _e2e(stack, prof, out, "e2e-processors", processors=True,
                freshness_target_s=FRESHNESS_WITH_PROCESSORS_P99_TARGET_S)


def _e2e(stack: Stack, prof: Profile, out: dict[str, Any], section: str, processors: bool,
         freshness_target_s: float) -> list[Row]:
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
        say(f"[{section}] warming up: one batch through the whole pipeline")
        post_until_accepted(s.http_port, make_bodies(warm_widget, 1, seed=4)[0])
        wait_rows(stack.postgres.dsn, warm_widget, EVENTS_PER_BODY, timeout=60)
        say(f"[{section}] {prof.e2e_events_s:,} events/s ({rate_req:,.0f} requests/s) for {prof.e2e_seconds:.0f}s, "
            "every request's first event timed to its row")
        probe = FreshnessProbe(stack.postgres.dsn, widget_id)
        topics = Topics.from_settings(s)
        tap = HopTap(s, [topics.raw_events, topics.enriched_events]) if processors else None
        try:
            load = Loadgen(section, s.http_port, widget_id, "--mode", "open", "--clients", "64",
                           "--rate", f"{rate_req:.2f}", "--duration", str(prof.e2e_seconds),
                           "--bodies", str(n_req), "--max-requests", str(n_req), "--seed", "11",
                           on_marker=probe.marker)
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
    e2e = {"offered_events_s": prof.e2e_events_s, "load": result, "rows": rows, "accepted_events": accepted,
           "sustained_events_s": sustained, "rows_timeline": timeline, "markers_timed": len(fresh),
           "markers_missing": missing,
           "freshness_s": {"p50": pct(fresh, 0.5), "p99": pct(fresh, 0.99), "max": max(fresh) if fresh else None}}
    out[section] = e2e
    f = e2e["freshness_s"]
    complete = rows == accepted and result["errors"] == 0
    hop_rows = []
    if processors:
        e2e["processors_hop_s"] = {"p50": pct(hops, 0.5), "p99": pct(hops, 0.99), "requests": len(hops)}
        h = e2e["processors_hop_s"]
        hop_rows.append(Row(f"{label}: of which the processors (raw -> enriched message)",
                            f"p50 {h['p50']:.3f} s, p99 {h['p99']:.3f} s" if hops else "not measured",
                            "-", "-", "-", "info"))
    return [
        Row(f"{label}: events/s sustained HTTP -> Postgres",
            f"{sustained:,.0f} events/s; {rows:,} rows of {accepted:,} accepted"
            + (f", {result['errors']} non-204" if result["errors"] else ""),
            f"{prof.e2e_events_s:,} events/s offered", f"{sustained / prof.e2e_events_s:.1%}",
            f">= {E2E_SUSTAINED_RATIO:.0%} of offered, no loss", verdict(complete and sustained >= E2E_SUSTAINED_RATIO * prof.e2e_events_s)),
        Row(f"{label}: freshness (204 -> row visible)",
            (f"p50 {f['p50']:.3f} s, p99 {f['p99']:.3f} s" if fresh else "no marker seen")
            + (f"; {missing} never visible" if missing else ""),
            "-", "-", f"p99 < {freshness_target_s:.0f} s",
            verdict(bool(fresh) and missing == 0 and f["p99"] < freshness_target_s)),
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


def section_codec(prof: Profile, out: dict[str, Any]) -> list[Row]:
    say("[codec] encodes/s: fastavro vs Apache avro vs avro-python3")
    fast = run_codec("fastavro", prof.codec_seconds)
    ref = run_codec("avro", prof.codec_seconds)
    legacy_path, why = install_avro_python3()
    legacy = run_codec("avro-python3", prof.codec_seconds, legacy_path) if legacy_path else None
    out["codec"] = {"fastavro": fast, "avro": ref, "avro_python3": legacy or {"error": why}}
    if "error" in fast or "error" in ref:
        return [Row("codec: fastavro vs Apache avro", f"failed: {fast.get('error') or ref.get('error')}",
                    "-", "-", "-", "FAIL")]
    rows = [Row(f"codec: fastavro {fast['version']} encodes/s (schemas.codec)", f"{fast['encodes_per_s']:,.0f} /s",
                f"{ref['encodes_per_s']:,.0f} /s Apache avro {ref['version']}",
                f"{fast['encodes_per_s'] / ref['encodes_per_s']:.1f}x", "-", "info")]
    if legacy is None or "error" in legacy:
        reason = why if legacy is None else legacy["error"]
        rows.append(Row("codec: avro-python3 (deprecated) encodes/s", f"not installable here: {reason}",
                        "-", "-", "-", "n/a"))
    else:
        rows.append(Row(f"codec: avro-python3 {legacy['version']} (deprecated) encodes/s", f"{legacy['encodes_per_s']:,.0f} /s",
                        f"{fast['encodes_per_s']:,.0f} /s fastavro",
                        f"fastavro {fast['encodes_per_s'] / legacy['encodes_per_s']:.1f}x faster", "-", "info"))
    return rows


def run_codec(lib: str, seconds: float, pythonpath: Path | None = None) -> dict[str, Any]:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, str(CODEC_BENCH), "--lib", lib, "--seconds", str(seconds)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    result: dict[str, Any] = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode != 0 or not result or "error" in result:
        errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = result.get("error") or (errors[-1] if errors else f"exit {proc.returncode}")
        say(f"    [codec] {lib}: {reason}")
        return {"lib": lib, "error": reason[:160]}
    say(f"    [codec] {lib} {result['version']}: {result['encodes_per_s']:,.0f} encodes/s")
    return result


def install_avro_python3() -> tuple[Path | None, str]:
    """avro-python3 shares the import name `avro` with the reference library: keep it in its own directory."""
    target = CACHE_DIR / "avro-python3"
    if (target / "avro" / "__init__.py").exists():
        return target, ""
    say("    [codec] installing avro-python3 into bench/.cache (once)")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--target", str(target), "avro-python3"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "pip install timed out"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"pip exited with {proc.returncode}")[:160]
    return target, ""


# --- output ----------------------------------------------------------------------------------------


HEADERS = ("what", "measured", "baseline / limit", "ratio", "target", "result")


def text_table(rows: list[Row]) -> str:
    cells = [HEADERS, *[tuple(asdict(r).values()) for r in rows]]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(str(v) for v in asdict(r).values()) + " |" for r in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        rev = ""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "git": rev,
            "loadavg_at_start": os.getloadavg()}


SECTIONS = ("ingest", "sink", "e2e", "e2e-processors", "codec")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke-test run (~1.5 min)")
    p.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) afterwards")
    p.add_argument("--py-spy", action="store_true", help="profile the stages while measured (bench/results/profiles)")
    args = p.parse_args(argv)
    prof = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)

    # SIGTERM unwinds like Ctrl-C, so every child (broker, Postgres, stages, load generator) is stopped by PID.
    signal.signal(signal.SIGTERM, _interrupt)
    out: dict[str, Any] = {"profile": "quick" if args.quick else "full", "settings": asdict(prof), "env": environment()}
    cpu = CpuMeter()
    out["cpu"] = cpu.phases
    rows: list[Row] = []
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sa-bench-"))
    say(f"pipeline benchmark ({out['profile']}), work dir {workdir}")
    failed = False
    try:
        with contextlib.ExitStack() as exit_stack:
            stack = Stack(workdir, exit_stack, Profiler(args.py_spy), cpu)
            if set(sections) - {"codec"}:
                stack.start_postgres()
            for name, run in (("ingest", section_ingest), ("sink", section_sink), ("e2e", section_e2e),
                              ("e2e-processors", section_e2e_processors)):
                if name in sections:
                    t0 = time.monotonic()
                    try:
                        rows += run(stack, prof, out)
                    except Exception as exc:  # report the section as failed, carry on with the next
                        failed = True
                        say(f"[{name}] FAILED: {exc}")
                        rows.append(Row(f"{name}: section failed", str(exc).splitlines()[0][:120], "-", "-", "-", "FAIL"))
                    say(f"[{name}] done in {time.monotonic() - t0:.0f}s")
            if "codec" in sections:
                rows += section_codec(prof, out)
    except KeyboardInterrupt:
        say("interrupted; stopped everything this benchmark started")
        return 130
    finally:
        save_logs(workdir)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out["rows"] = [asdict(r) for r in rows]
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "pipeline.json").write_text(json.dumps(out, indent=2, default=str))
    print()
    print(f"Pipeline benchmark ({out['profile']}, {out['env']['cpus']} CPUs, {out['elapsed_s']:.0f}s):")
    print(text_table(rows))
    print()
    print(markdown_table(rows))
    noisy = {phase: c["other_cores"] for phase, c in cpu.phases.items() if c["other_cores"] > NOISY_OTHER_CORES}
    if noisy:
        print("\nWARNING: other processes were busy during " + ", ".join(f"{p} ({c:.2f} cores)" for p, c in noisy.items())
              + ": on 2 cores this shows up as latency tails and lower rates; rerun on an idle machine to publish.")
    print(f"\nraw results: {RESULTS_DIR / 'pipeline.json'}; stage logs: {RESULTS_DIR / 'logs'}")
    return 1 if failed or any(r.result == "FAIL" for r in rows) else 0


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def save_logs(workdir: Path) -> None:
    """Stage and broker logs outlive the temp dir, for looking into a slow or failed run."""
    dest = RESULTS_DIR / "logs"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for log in [*workdir.glob("*.log"), *workdir.glob("*.metrics.txt")]:
        shutil.copy2(log, dest / log.name)
    if (workdir / "pg" / "postgres.log").exists():
        shutil.copy2(workdir / "pg" / "postgres.log", dest / "postgres.log")


if __name__ == "__main__":
    sys.exit(main())
