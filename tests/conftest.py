"""Shared fixtures: one real broker (Apache Kafka where Java 17+ is found, else Tansu; see
SITE_ACTIVITY_EMBEDDED_BROKER) and one real Postgres per test session; unique topics, groups and widgets per
test; stages started as real `site-activity <stage>` processes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from playwright.sync_api import Browser, sync_playwright

from dev_stack.embedded import EmbeddedBroker, EmbeddedPostgres, EmbeddedTansu, free_port, make_broker, wait_until
from dev_stack.isolated import isolated_settings
from dev_stack.kafka_dist import machine_settings
from dev_stack.process import StageProcess
from schemas.codec import EventCodec
from site_activity import widgets
from site_activity.db import migrate
from site_activity.kafka import consumer_config, ensure_topics
from site_activity.settings import STAGE_HTTP_PORT, Settings
from site_activity.settings import Stage as StageName
from site_activity.topics import Topics
from tests.console_helpers import Tenant, make_tenant

# Fixtures that start a real service: a test using any of them (directly or through another fixture) is marked
# `integration`, so `pytest -m "not integration"` runs the in-process unit tests alone, in seconds.
REAL_SERVICES = frozenset({"kafka", "postgres", "browser", "sasl_kafka"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_SERVICES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


ROOT = Path(__file__).resolve().parents[1]


def broker_settings() -> Settings:
    """The machine's broker choice; Kafka's jars are cached under the project's data dir, not per session."""
    return machine_settings(ROOT)


@pytest.fixture(scope="session")
def kafka(session_dir: Path) -> Iterator[EmbeddedBroker]:
    broker = make_broker(broker_settings(), session_dir / "kafka", free_ports=True)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTansu]:
    """A Tansu broker for the smoke tests that keep the pip-only fallback honest (tests/test_tansu_smoke.py)."""
    broker = EmbeddedTansu(free_port(), tmp_path_factory.mktemp("tansu") / "tansu.log")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres(session_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(session_dir / "pgdata", free_port())
    server.start()
    migrate(server.dsn)
    yield server
    server.stop()


@pytest.fixture
def settings(kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path: Path) -> Settings:
    """Settings for one test: unique topic prefix and consumer groups, short group timeouts."""
    return make_settings(kafka, postgres, tmp_path / "data")


def make_settings(kafka: EmbeddedBroker, postgres: EmbeddedPostgres, data_dir: Path, **overrides: Any) -> Settings:
    """Unique topics, groups and ports on the session's broker and database (dev_stack.isolated); topics created.
    Module-scoped fixtures use this directly (the `settings` fixture is per test)."""
    s = isolated_settings(
        kafka.bootstrap,
        postgres.dsn,
        data_dir,
        topic_partitions=3,
        consumer_session_timeout_ms=3000,
        consumer_heartbeat_interval_ms=500,
        widget_cache_refresh_s=0.5,
        sink_batch_max_s=0.1,
        log_json=True,
        **overrides,
    )
    ensure_topics(s)
    return s


@pytest.fixture
def topics(settings: Settings) -> Topics:
    return Topics.from_settings(settings)


@pytest.fixture
def db(postgres: EmbeddedPostgres) -> Iterator[psycopg.Connection]:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_widget(postgres: EmbeddedPostgres) -> Callable[..., widgets.Widget]:
    """Creates a tenant + widget (tracking enabled unless told otherwise) and returns it."""

    def make(enabled: bool = True, tenant_id: uuid.UUID | None = None, name: str = "test widget") -> widgets.Widget:
        with psycopg.connect(postgres.dsn) as conn:
            # One transaction: the API's widget cache must never see the widget disabled in between.
            return widgets.create_widget(conn, name=name, tenant_id=tenant_id, actor="tests", tracking_enabled=enabled)

    return make


class Service(StageProcess):
    """A stage child process that start() only returns from once it is healthy."""

    def __init__(self, stage: str, settings: Settings, log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        super().__init__(stage, settings, log_dir / f"{stage}.log", extra_env)
        self.ready: Callable[[], bool] | None = None

    def start(self, timeout: float = 60.0) -> Service:
        super().start()
        if self.ready is not None:
            ready = self.ready

            def check() -> bool:
                if not self.alive():
                    raise RuntimeError(f"{self.stage} exited early:\n{self.log_tail()}")
                return ready()

            wait_until(check, timeout, self.stage, interval=0.2)
        return self


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


@pytest.fixture
def start_service(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """start_service("api") / ("sink") / ("processors"): starts the stage and waits until it is healthy."""
    started: list[Service] = []

    def start(stage: str, settings_override: Settings | None = None, **extra_env: str) -> Service:
        s = settings_override or settings
        svc = Service(stage, s, tmp_path, extra_env)
        svc.ready = http_ok(s.health_url(cast(StageName, stage))) if stage in STAGE_HTTP_PORT else None
        started.append(svc)
        return svc.start()

    yield start
    for svc in reversed(started):
        svc.stop()


@pytest.fixture
def full_pipeline(start_service: Callable[..., Service]) -> None:
    """API, processors and sink on the test's topics: the whole path from HTTP to rows."""
    for stage in ("api", "processors", "sink"):
        start_service(stage)


@pytest.fixture
def raw_pipeline(settings: Settings, start_service: Callable[..., Service]) -> Settings:
    """API + sink reading the raw topic (the ingest path without the processors); returns the sink's settings."""
    raw = settings.model_copy(update={"sink_from_enriched": False})
    start_service("api")
    start_service("sink", settings_override=raw)
    return raw


@pytest.fixture
def api_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.http_port}"


def iso(ts: datetime) -> str:
    """A timestamp as the widget sends it (JavaScript's toISOString)."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wait_for_rows(
    conn: psycopg.Connection, sql: str, params: tuple | dict, expected: int, timeout: float = 30.0
) -> list[tuple]:
    """Polls `sql` until it returns `expected` rows (then returns them) or fails with what it saw."""
    deadline = time.monotonic() + timeout
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        rows = conn.execute(sql, params).fetchall()
        if len(rows) >= expected:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"expected {expected} rows, got {len(rows)}: {rows[:5]}")


def read_topic(
    settings: Settings, topic: str, expected: int, timeout: float = 20.0, weight: Callable[[Message], int] = lambda _: 1
) -> list[Message]:
    """Reads messages from the start of `topic` with a throwaway consumer group until their total `weight`
    (default: one per message) reaches `expected`, or the timeout passes."""
    consumer = Consumer(consumer_config(settings, f"reader-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    out: list[Message] = []
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
                seen += weight(msg)
    finally:
        consumer.close()
    return out


_EVENTS = EventCodec()


def read_events(
    settings: Settings, topic: str, expected: int, timeout: float = 20.0
) -> list[tuple[bytes | None, dict]]:
    """(key, event) pairs from the start of `topic`: a raw-topic message holds a whole request's events."""
    msgs = read_topic(settings, topic, expected, timeout, weight=lambda m: len(_EVENTS.decode_events(m.value())))
    return [(m.key(), event) for m in msgs for event in _EVENTS.decode_events(m.value())]


@pytest.fixture(scope="module")
def console_settings(
    kafka: EmbeddedBroker, postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Settings for one test module's console (its own topics, groups and ports)."""
    return make_settings(kafka, postgres, tmp_path_factory.mktemp("console") / "data", console_port=free_port())


@pytest.fixture(scope="module")
def console(console_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A running `site-activity console` for the module, and an HTTP client pointed at it."""
    svc = Service("console", console_settings, tmp_path_factory.mktemp("console-logs"))
    svc.ready = http_ok(console_settings.health_url("console"))
    svc.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{console_settings.console_port}", timeout=30) as client:
        yield client
    svc.stop()


# --- headless Chromium for the page tests (Debian's chromium; scripts/test installs it) ----------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


# --- tenants of the console and read-API tests (a module may override them, e.g. to seed events) ------------


@pytest.fixture(scope="module")
def acme(postgres: EmbeddedPostgres) -> Tenant:
    return make_tenant(postgres.dsn, "Acme")


@pytest.fixture(scope="module")
def globex(postgres: EmbeddedPostgres) -> Tenant:
    return make_tenant(postgres.dsn, "Globex")


def committed_total(settings: Settings, group: str, topic: str) -> int:
    """Sum over the topic's partitions of a consumer group's committed offsets (0 for a partition never committed)."""
    consumer = Consumer(consumer_config(settings, group))
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(settings.topic_partitions)], timeout=10)
    finally:
        consumer.close()
    return sum(max(tp.offset, 0) for tp in tps)
