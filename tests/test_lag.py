"""Consumer lag (site_activity/lag.py): the Burrow-style status rules as a pure function, then against the
suite's real broker: lag in messages and seconds, REWIND, the sink stopped while events flow (growing lag,
STOP within 60 s, back to OK after a restart), the CLI, the exporter and each stage's /metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dev_stack.embedded import free_port, wait_until
from dev_stack.kafka_dist import broker_kind
from site_activity.kafka import consumer_config, producer_config
from site_activity.lag import (
    METRIC_NAMES,
    GroupSpec,
    LagMonitor,
    LagReport,
    Sample,
    partition_status,
    pipeline_groups,
    render_table,
    sink_group,
    webhooks_group,
)
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key
from tests.conftest import broker_settings
from tests.test_sink import CODEC, make_event

ROOT = Path(__file__).resolve().parents[1]
W = 5  # window size in the unit tests


def run(samples: Sequence[tuple[float, int, int, bool]], window: int = W) -> str:
    return partition_status([Sample(t, c, e, o) for t, c, e, o in samples], window)


# --- the rules ---------------------------------------------------------------------------------------------


def test_no_lag_is_ok_whatever_came_before() -> None:
    assert run([(0, 0, 10, False), (1, 0, 20, False), (2, 20, 20, False)]) == "OK"


def test_stop_when_nobody_owns_the_partition_and_offsets_froze_longer_than_they_moved() -> None:
    # committed moved at t=0..4 (owned), then the consumer left at t=4 and nothing moved since
    moving = [(t, 10 * t, 10 * t + 5, True) for t in range(5)]
    # frozen for 2 s after 4 s of movement: not yet
    assert run([*moving[2:], (5, 40, 60, False), (6, 40, 70, False)]) != "STOP"
    # window slid: frozen since t=4, first sample t=4 -> (t - 4) > 0 once the window is all frozen
    assert (
        run([(4, 40, 45, True), (5, 40, 60, False), (6, 40, 70, False), (7, 40, 80, False), (8, 40, 90, False)])
        == "STOP"
    )
    # frozen 3 s, moved for 2 s before it: STOP
    assert run([(2, 20, 25, True), (3, 30, 35, True), (4, 40, 45, False), (7, 40, 80, False)]) == "STOP"


def test_stop_even_if_lag_was_zero_earlier_in_the_window() -> None:
    # Burrow checks STOP before "lag was 0 at some point": a consumer that caught up and then died is stopped
    assert run([(0, 10, 10, True), (1, 10, 12, False), (2, 10, 15, False)]) == "STOP"


def test_a_single_sample_is_never_stop() -> None:
    assert run([(0, 0, 100, False)]) == "OK"


def test_owned_but_frozen_over_a_full_window_is_stall() -> None:
    frozen = [(t, 40, 50 + t, True) for t in range(W)]
    assert run(frozen) == "STALL"
    assert run(frozen[:-1]) == "OK"  # window not full yet


def test_lag_zero_somewhere_in_window_is_ok_for_an_owned_partition() -> None:
    assert run([(t, 40, 40 if t == 0 else 45, True) for t in range(W)]) == "OK"


def test_rewind_when_the_committed_offset_goes_back() -> None:
    assert run([(0, 50, 60, True), (1, 20, 60, True)]) == "REWIND"


def test_warn_when_moving_but_lag_never_decreases() -> None:
    assert run([(t, 10 * t, 10 * t + 5 + t, True) for t in range(W)]) == "WARN"
    # lag went down once: OK
    assert run([(t, 10 * t, 10 * t + 5 + (t if t != 3 else 0), True) for t in range(W)]) == "OK"


samples = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.booleans()), min_size=1, max_size=8)


@given(samples)
def test_properties_of_the_rules(raw: list[tuple[int, int, bool]]) -> None:
    window = [Sample(float(i), c, c + d, o) for i, (c, d, o) in enumerate(raw)]
    status = partition_status(window, W)
    if window[-1].lag == 0:
        assert status == "OK"
    if status in ("STALL", "WARN"):
        assert len(window) >= W
    if status == "STOP":
        assert not window[-1].owned and len(window) >= 2
    if status == "REWIND":
        assert any(b.committed < a.committed for a, b in zip(window, window[1:], strict=False))


def test_pipeline_groups_take_names_from_settings() -> None:
    s = Settings(processors_app_id="p", sink_group="s", webhooks_group="w", lag_extra_groups=["x"], topic_prefix="pre")
    t = Topics.from_settings(s)
    groups = pipeline_groups(s, [GroupSpec("y", ("other",)), GroupSpec("s")])
    assert groups == [
        GroupSpec("p", (t.raw_events, t.erasures)),
        GroupSpec("s", (t.enriched_events,)),
        GroupSpec("w", (t.enriched_events,)),
        GroupSpec("x"),
        GroupSpec("y", ("other",)),
    ]


def test_the_webhooks_group_reads_what_the_sink_reads() -> None:
    s = Settings(webhooks_group="hooks", sink_from_enriched=False)
    assert pipeline_groups(s)[2] == webhooks_group(s) == GroupSpec("hooks", (Topics.from_settings(s).raw_events,))


# --- against the real broker -------------------------------------------------------------------------------

# The suite's broker: on Tansu, end offsets are only right when producers send one record per produce batch.
ONE_PER_BATCH = {"batch.num.messages": 1, "linger.ms": 0}


def produce_raw(settings: Settings, topic: str, n: int, timestamp_ms: int | None = None, partition: int = 0) -> None:
    producer = Producer(producer_config(settings, **ONE_PER_BATCH))
    for i in range(n):
        kwargs: dict[str, Any] = {"timestamp": timestamp_ms} if timestamp_ms is not None else {}
        producer.produce(topic, value=f"m{i}".encode(), partition=partition, **kwargs)
    assert producer.flush(30) == 0


COORDINATOR_NOT_READY = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
)


def commit(settings: Settings, group: str, topic: str, partition: int, offset: int) -> None:
    consumer = Consumer(consumer_config(settings, group))  # assign + commit: no group join
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
                return
            except KafkaException as exc:  # a fresh broker creates __consumer_offsets on the first group use
                if exc.args[0].code() not in COORDINATOR_NOT_READY or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def partition(report: LagReport, group: str, topic: str, p: int) -> Any:
    g = next(g for g in report.groups if g.group == group)
    assert g.error is None, g.error
    return next(x for x in g.partitions if x.topic == topic and x.partition == p)


def test_lag_in_messages_and_seconds_is_the_age_of_the_oldest_unconsumed_message(settings: Settings) -> None:
    topic = Topics.from_settings(settings).raw_events
    group = f"g-{uuid.uuid4().hex[:8]}"
    now_ms = int(time.time() * 1000)
    produce_raw(settings, topic, 5, timestamp_ms=now_ms - 300_000)  # offsets 0-4: five minutes old
    produce_raw(settings, topic, 5, timestamp_ms=now_ms - 120_000)  # offsets 5-9: two minutes old
    commit(settings, group, topic, 0, 5)
    monitor = LagMonitor(settings, [GroupSpec(group, (topic,))], window=3)
    try:
        report = monitor.evaluate()
    finally:
        monitor.close()
    p0 = partition(report, group, topic, 0)
    assert (p0.committed, p0.end, p0.lag) == (5, 10, 5)
    assert 120 <= p0.lag_seconds < 135  # the message at the committed offset is two minutes old
    p1 = partition(report, group, topic, 1)  # no commit, empty partition: no lag, 0 s
    assert (p1.committed, p1.lag, p1.lag_seconds) == (None, 0, 0.0)
    g = next(g for g in report.groups if g.group == group)
    assert (g.sum_lag, g.max_lag) == (5, 5)
    assert json.loads(json.dumps(report.to_dict()))["groups"][0]["partitions"][0]["lag"] == 5
    # the table the CLI prints
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert group in text and topic in text and "OK" in text
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if f" {topic} " in line]
    assert cells[0][2:7] == [topic, "0", "5", "10", "5"]  # topic, partition, committed, end, lag
    assert 120 <= float(cells[0][7]) < 135  # lag seconds


def test_rewind_on_the_real_broker(settings: Settings) -> None:
    topic = Topics.from_settings(settings).raw_events
    group = f"g-{uuid.uuid4().hex[:8]}"
    produce_raw(settings, topic, 10)
    commit(settings, group, topic, 0, 8)
    monitor = LagMonitor(settings, [GroupSpec(group, (topic,))], window=3)
    try:
        monitor.evaluate()
        commit(settings, group, topic, 0, 3)
        report = monitor.evaluate()
    finally:
        monitor.close()
    # Nobody owns the partition and it moved backwards: Burrow's STOP rule comes first only once the offset
    # has been frozen longer than the window saw it move; here it just moved (back).
    assert partition(report, group, topic, 0).status == "REWIND"
    assert report.groups[0].status == "REWIND"


class EventFlow:
    """Produces one event every `period_s` to the raw topic in a thread (one record per produce batch)."""

    def __init__(self, settings: Settings, topic: str, widget: Any, period_s: float = 0.1) -> None:
        self.producer = Producer(producer_config(settings, **ONE_PER_BATCH))
        self.topic, self.widget, self.period_s = topic, widget, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(self.period_s):
            rec = make_event(self.widget, f"v-{i % 7}", at=datetime.now(UTC))
            self.producer.produce(
                self.topic, key=event_key(str(rec["widget_id"]), rec["visitor_id"]), value=CODEC.encode(rec)
            )
            self.producer.poll(0)
            i += 1
        self.producer.flush(30)

    def __enter__(self) -> EventFlow:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


def lag_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "SITE_ACTIVITY_LOG_JSON": "True"}
    return subprocess.run(
        [sys.executable, "-m", "command_line", "lag", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def raw_sink_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"sink_from_enriched": False, "sink_group": f"sink-{uuid.uuid4().hex[:8]}", "lag_interval_s": 1.0}
    )


def sink_owns_its_partitions(settings: Settings) -> None:
    """Until the sink's consumer has joined its group and holds every partition (/healthz is up earlier: a
    first join on a fresh broker waits for the offsets topic to be created)."""
    probe = LagMonitor(settings, [sink_group(settings)], window=1)
    try:
        wait_until(
            lambda: all(p.owned for g in probe.evaluate().groups for p in g.partitions), 60, "sink owns its partitions"
        )
    finally:
        probe.close()


@pytest.mark.skipif(
    broker_kind(broker_settings()) != "kafka",
    reason="Tansu describes no group members or state, so an owned partition cannot be told from an"
    " abandoned one (STOP needs that); the rules are unit-tested above",
)
def test_sink_stopped_while_events_flow_shows_growing_lag_and_stop_then_ok_after_restart(
    raw_sink_settings: Settings, make_widget: Any, start_service: Any
) -> None:
    s = raw_sink_settings
    topic = Topics.from_settings(s).raw_events
    spec = sink_group(s)
    sink = start_service("sink", settings_override=s)
    sink_owns_its_partitions(s)
    monitor = LagMonitor(s, [spec], window=10)
    history: list[LagReport] = []

    def evaluate() -> Any:
        history.append(monitor.evaluate())
        return history[-1].groups[0]

    try:
        with EventFlow(s, topic, make_widget()):
            # Running: every evaluation OK (lag may be a few in-flight messages, and it keeps going down).
            for _ in range(5):
                g = evaluate()
                assert g.error is None and g.status == "OK", g
                time.sleep(1)
            sink.stop()
            stopped_at = time.monotonic()
            while (g := evaluate()).status != "STOP":
                assert time.monotonic() - stopped_at < 60, f"no STOP within 60 s: {g}"
                time.sleep(1)
            took = time.monotonic() - stopped_at
            lags = [r.groups[0].sum_lag for r in history[-3:]]
            assert lags[-1] > lags[0], f"lag did not grow while stopped: {lags}"
            assert g.max_lag_seconds >= 1.0
            print(f"STOP {took:.1f} s after the sink stopped; lag {lags}")
            # The CLI agrees (a fresh process: its own short window)
            out = lag_cli(s, "--json", "--samples", "2", "--interval", "0.5")
            doc = json.loads(out.stdout)
            cli_group = next(x for x in doc["groups"] if x["group"] == s.sink_group)
            assert cli_group["status"] == "STOP" and cli_group["sum_lag"] > 0, out.stdout
            assert out.returncode == 1
            sink.start()
            restarted = time.monotonic()
            while (g := evaluate()).status != "OK":
                assert time.monotonic() - restarted < 60, f"not OK within 60 s of the restart: {g}"
                time.sleep(1)
            # and it stays OK while events keep flowing
            for _ in range(3):
                time.sleep(1)
                assert evaluate().status == "OK"
    finally:
        monitor.close()


@pytest.mark.skipif(
    broker_kind(broker_settings()) != "kafka",
    reason="Tansu describes no group members or state: STALL (owned but not moving) is unobservable",
)
def test_a_sink_that_cannot_write_is_stall_not_stop(
    raw_sink_settings: Settings, make_widget: Any, start_service: Any
) -> None:
    """The sink is up and owns its partitions but Postgres is unreachable: it retries with its partitions
    paused and commits nothing, so the offsets stay put while a live member holds them: STALL."""
    s = raw_sink_settings.model_copy(
        update={"postgres_dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/none", "sink_retry_max_backoff_s": 1.0}
    )
    topic = Topics.from_settings(s).raw_events
    w = make_widget()
    producer = Producer(producer_config(s, **ONE_PER_BATCH))
    for i in range(6):
        rec = make_event(w, f"v-{i}")
        producer.produce(topic, key=event_key(str(w.id), rec["visitor_id"]), value=CODEC.encode(rec))
    assert producer.flush(30) == 0
    start_service("sink", settings_override=s)
    sink_owns_its_partitions(s)
    monitor = LagMonitor(s, [sink_group(s)], window=5)
    try:
        statuses = []
        for _ in range(5):
            statuses.append(monitor.evaluate().groups[0])
            time.sleep(1)
        g = statuses[-1]
        assert [x.status for x in statuses[:-1]] == ["OK"] * 4  # window not full yet: no verdict
        assert g.status == "STALL", g
        assert g.sum_lag == 6 and all(p.owned for p in g.partitions)
    finally:
        monitor.close()


def test_watch_prints_one_json_document_per_evaluation(settings: Settings) -> None:
    topic = Topics.from_settings(settings).raw_events
    produce_raw(settings, topic, 3)
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "command_line", "lag", "--watch", "--json", "--interval", "0.3"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        docs = [json.loads(proc.stdout.readline()) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(15)
    assert [d["time"] for d in docs] == sorted(d["time"] for d in docs) and docs[0]["time"] < docs[-1]["time"]
    sink = next(g for g in docs[-1]["groups"] if g["group"] == settings.sink_group)
    assert sink["sum_lag"] == 0 and [g["group"] for g in docs[-1]["groups"]][:2] == [
        settings.processors_app_id,
        settings.sink_group,
    ]
    processors = next(g for g in docs[-1]["groups"] if g["group"] == settings.processors_app_id)
    # nobody consumes the raw topic here: 3 messages of lag on it, and the group is STOP (no member, frozen)
    assert processors["sum_lag"] == 3 and processors["status"] == "STOP"


def scrape(port: int) -> dict[str, list[Any]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_exporter_and_the_sink_serve_the_lag_metrics(
    raw_sink_settings: Settings, make_widget: Any, start_service: Any
) -> None:
    s = raw_sink_settings
    topic = Topics.from_settings(s).raw_events
    w = make_widget()
    producer = Producer(producer_config(s, **ONE_PER_BATCH))  # exact end offsets on Tansu too
    for i in range(4):
        rec = make_event(w, f"v-{i}")
        producer.produce(topic, key=event_key(str(w.id), rec["visitor_id"]), value=CODEC.encode(rec))
    assert producer.flush(30) == 0
    start_service("sink", settings_override=s)
    port = free_port()
    env = {**os.environ, **s.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "command_line", "lag", "--serve", "--port", str(port), "--interval", "0.5"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def exported() -> bool:
            try:
                return bool(scrape(port).get("kafka_consumergroup_group_lag"))
            except httpx.HTTPError:
                return False

        wait_until(exported, 30, "exporter metrics")
        families = scrape(port)
        assert set(METRIC_NAMES) <= set(families) | {n.removesuffix("_total") for n in families}
        sink_lag = [x for x in families["kafka_consumergroup_group_lag"] if x.labels["group"] == s.sink_group]
        assert {x.labels["partition"] for x in sink_lag} == {"0", "1", "2"}
        assert {x.labels["topic"] for x in sink_lag} == {topic}
        status = [x for x in families["kafka_consumergroup_group_status"] if x.labels["group"] == s.sink_group]
        assert sorted(x.labels["status"] for x in status) == sorted(["OK", "WARN", "STALL", "STOP", "REWIND"])
        # The sink's own /metrics: the same gauges for its own group (evaluated every lag_interval_s)
        wait_until(
            lambda: any(
                x.labels["group"] == s.sink_group
                for x in scrape(s.sink_http_port).get("kafka_consumergroup_group_lag", [])
            ),
            30,
            "sink lag metrics",
        )
        wait_until(
            lambda: sum(x.value for x in scrape(s.sink_http_port)["kafka_consumergroup_group_lag"]) == 0,
            30,
            "sink caught up per its own lag gauge",
        )
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module", autouse=True)
def _broker_kind() -> None:
    # Everything above runs on either broker; note the kind in the output for the report.
    print(f"broker: {broker_kind(broker_settings())}")
