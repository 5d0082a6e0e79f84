"""The pipeline benchmark's stack and workload sizes: Postgres for the whole run, a fresh broker per section,
each stage as a `site-activity` child process stopped by PID."""

from __future__ import annotations

import contextlib
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.harness import ROOT, CpuMeter, Profiler, say
from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, make_broker, wait_until
from dev_stack.isolated import isolated_settings
from dev_stack.kafka_dist import broker_kind, machine_settings
from dev_stack.process import StageProcess
from site_activity import widgets
from site_activity.db import migrate
from site_activity.kafka import ensure_topics
from site_activity.settings import Settings


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


FULL = Profile(
    bare_messages=400_000,
    closed_seconds=15,
    open_seconds=15,
    clients=32,
    sink_events=200_000,
    e2e_events_s=10_000,
    e2e_seconds=30,
    codec_seconds=2.0,
)
QUICK = Profile(
    bare_messages=100_000,
    closed_seconds=5,
    open_seconds=5,
    clients=32,
    sink_events=50_000,
    e2e_events_s=10_000,
    e2e_seconds=10,
    codec_seconds=0.7,
)


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
        broker = make_broker(chosen, self.workdir / f"{section}-{broker_kind(chosen)}", free_ports=True)
        say(f"[{section}] starting a fresh {broker_kind(chosen)} broker on {broker.bootstrap}")
        try:
            broker.start()
            yield broker
        finally:
            broker.stop()

    def settings(self, section: str, broker: EmbeddedBroker) -> Settings:
        s = isolated_settings(
            broker.bootstrap,
            self.postgres.dsn,
            self.workdir / section,
            topic_prefix=f"bench-{section}",
            sink_group=f"bench-sink-{section}",
            processors_app_id=f"bench-proc-{section}",
            # Tansu holds a JoinGroup for session_timeout/2: keep group start-up short (see the Tansu notes).
            consumer_session_timeout_ms=6000,
            consumer_heartbeat_interval_ms=1000,
            widget_cache_refresh_s=1.0,
            sink_from_enriched=False,
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
