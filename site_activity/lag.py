"""Consumer lag of the pipeline's consumer groups: offsets, lag in messages and seconds, Burrow-style status,
as a report (CLI table / JSON), as Prometheus metrics (kafka-lag-exporter names) from `site-activity lag
--serve` and from each consumer stage's own /metrics (`start_lag_metrics`).

Per consumer group and partition, one evaluation reads (confluent-kafka AdminClient, metadata calls only):
the group's committed offset, the partition's earliest and end (high watermark) offsets, and which live
member the partition is assigned to. Then:

* lag (messages) = end - committed; a partition the group never committed on counts from its earliest
  offset (our consumers start there: auto.offset.reset=earliest).
* lag (seconds) = age of the oldest unconsumed message: now - the timestamp of the message at the committed
  offset, read with a group-less consumer (one small fetch per lagging partition); 0 when lag is 0. None
  when it cannot be read within the evaluation's deadline.

Status (`partition_status`, a pure function) follows Burrow's evaluation rules (linkedin/Burrow,
core/internal/evaluator/caching.go) over a sliding window of the last `lag_window` evaluations of the
partition, each a Sample(time, committed, end, owned). Kafka does not tell when an offset was committed, so
"the time of the last commit" is the time of the first sample in the window that shows the current committed
offset (the oldest sample of the trailing run of equal offsets); and a consumer that keeps committing the
same offset looks like one that stopped committing, so ownership (a live group member has the partition
assigned) tells STALL from STOP. In order, first match wins:

  1. lag now is 0                                                   -> OK
  2. >= 2 samples, no live member owns the partition, and the time since the last commit is longer than
     the time the window saw commits before it (now - t_last > t_last - t_first; Burrow's STOP rule)  -> STOP
  3. lag was 0 in some sample of the window                          -> OK
  4. the committed offset went backwards between two samples         -> REWIND
  5. the window is not full yet                                      -> OK
  6. the committed offset is the same in every sample (a member owns it, or rule 2 would have fired)
                                                                     -> STALL
  7. the offset moved but lag never decreased from one sample to the next -> WARN
  8. otherwise                                                       -> OK

A group's status is its worst partition's (OK < WARN < REWIND < STALL < STOP).

Brokers that report wrong end offsets (the embedded Tansu: the first offset of the newest batch + 1) give
wrong lag; producers sending one record per batch make them exact. Nothing here works around that.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any, Literal, cast

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from site_activity.kafka import admin, consumer_config
from site_activity.settings import Settings
from site_activity.topics import Topics

log = logging.getLogger(__name__)

Status = Literal["OK", "WARN", "STALL", "STOP", "REWIND"]
STATUSES: tuple[Status, ...] = ("OK", "WARN", "STALL", "STOP", "REWIND")
SEVERITY: dict[str, int] = {"OK": 0, "WARN": 1, "REWIND": 2, "STALL": 3, "STOP": 4}
_EMPTY_STATES = {"EMPTY", "DEAD", "UNKNOWN"}
# Group coordinator moving or loading (a fresh cluster creates __consumer_offsets on first use).
_COORDINATOR_NOT_READY = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
)


# --- the status rules (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One evaluation of one partition: wall time (s), committed offset (the group's next offset to read),
    end offset (high watermark), and whether a live group member has the partition assigned."""

    time: float
    committed: int
    end: int
    owned: bool = False

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


def partition_status(window: Sequence[Sample], window_size: int) -> Status:
    """The status of a partition from its last evaluations (oldest first, at most window_size); the rules
    are in this module's docstring."""
    if not window:
        raise ValueError("partition_status needs at least one sample")
    cur = window[-1]
    if cur.lag == 0:
        return "OK"
    if len(window) >= 2 and not cur.owned:
        t_last = _last_commit_time(window)
        if cur.time - t_last > t_last - window[0].time:
            return "STOP"
    if any(s.lag == 0 for s in window):
        return "OK"
    if any(b.committed < a.committed for a, b in pairwise(window)):
        return "REWIND"
    if len(window) < window_size:
        return "OK"
    if all(s.committed == cur.committed for s in window):
        return "STALL"
    if all(b.lag >= a.lag for a, b in pairwise(window)):
        return "WARN"
    return "OK"


def _last_commit_time(window: Sequence[Sample]) -> float:
    """Time of the oldest sample of the trailing run that shows the current committed offset."""
    t = window[-1].time
    for s in reversed(window):
        if s.committed != window[-1].committed:
            break
        t = s.time
    return t


def worst(statuses: Iterable[str]) -> Status:
    return cast(Status, max(statuses, key=SEVERITY.__getitem__, default="OK"))


# --- which groups ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """A consumer group and the topics it consumes (all their partitions are reported, committed or not).
    Without topics, those its live members are assigned are reported (nothing while it has no members)."""

    name: str
    topics: tuple[str, ...] = ()


def processors_group(settings: Settings) -> GroupSpec:
    """faust's consumer group is the app id; its agents consume the raw events and the erasure markers."""
    t = Topics.from_settings(settings)
    return GroupSpec(settings.processors_app_id, (t.raw_events, t.erasures))


def sink_group(settings: Settings) -> GroupSpec:
    t = Topics.from_settings(settings)
    return GroupSpec(settings.sink_group, (t.enriched_events if settings.sink_from_enriched else t.raw_events,))


def webhooks_group(settings: Settings) -> GroupSpec:
    """The webhooks stage's group (setting `webhooks_group`), reading the same topic as the sink."""
    return GroupSpec(settings.webhooks_group, sink_group(settings).topics)


def pipeline_groups(settings: Settings, extra: Iterable[GroupSpec] = ()) -> list[GroupSpec]:
    """The pipeline's consumer groups: processors, sink, the webhooks stage's group,
    `lag_extra_groups`, then `extra`."""
    groups = [processors_group(settings), sink_group(settings), webhooks_group(settings)]
    groups += [GroupSpec(name) for name in settings.lag_extra_groups]
    groups += list(extra)
    seen: set[str] = set()
    return [g for g in groups if not (g.name in seen or seen.add(g.name))]  # type: ignore[func-returns-value]


# --- one evaluation ----------------------------------------------------------------------------------------


@dataclass
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has no committed offset here
    earliest: int
    end: int
    lag: int
    lag_seconds: float | None
    owned: bool
    status: Status = "OK"


@dataclass
class GroupLag:
    group: str
    state: str
    members: int
    partitions: list[PartitionLag] = field(default_factory=list)
    error: str | None = None

    @property
    def status(self) -> Status:
        return worst(p.status for p in self.partitions)

    @property
    def sum_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def max_lag(self) -> int:
        return max((p.lag for p in self.partitions), default=0)

    @property
    def max_lag_seconds(self) -> float:
        return max((p.lag_seconds or 0.0 for p in self.partitions), default=0.0)


@dataclass
class LagReport:
    time: float
    groups: list[GroupLag]

    def to_dict(self) -> dict[str, Any]:
        """JSON shape: {time (epoch s), groups: [{group, state, members, status, sum_lag, max_lag,
        max_lag_seconds, error, partitions: [{topic, partition, committed, earliest, end, lag, lag_seconds,
        owned, status}]}]}."""
        return {
            "time": self.time,
            "groups": [
                {
                    "group": g.group,
                    "state": g.state,
                    "members": g.members,
                    "status": g.status,
                    "sum_lag": g.sum_lag,
                    "max_lag": g.max_lag,
                    "max_lag_seconds": round(g.max_lag_seconds, 3),
                    "error": g.error,
                    "partitions": [
                        {**asdict(p), "lag_seconds": None if p.lag_seconds is None else round(p.lag_seconds, 3)}
                        for p in g.partitions
                    ],
                }
                for g in self.groups
            ],
        }


class LagMonitor:
    """Evaluates the lag of `groups` on each `evaluate()` call and keeps each partition's last `window`
    samples for the status rules. Not thread-safe: one caller evaluates (a timer thread, the CLI loop).
    Errors talking to Kafka are reported per group (GroupLag.error), never raised."""

    def __init__(
        self,
        settings: Settings,
        groups: Sequence[GroupSpec],
        window: int | None = None,
        timeout_s: float = 10.0,
        read_timeout_s: float = 3.0,
    ) -> None:
        self.settings = settings
        self.groups = list(groups)
        self.window = window or settings.lag_window
        self.timeout_s = timeout_s
        self.read_timeout_s = read_timeout_s
        self._admin: AdminClient = admin(settings)
        self._reader: Consumer | None = None
        self._samples: dict[tuple[str, str, int], deque[Sample]] = {}

    def evaluate(self) -> LagReport:
        now = time.time()
        report = LagReport(now, [])
        try:
            topics = self._topic_partitions()
        except KafkaException as exc:  # the cluster is unreachable: every group says so
            log.warning("lag evaluation failed: cannot list topics", extra={"error": str(exc)})
            report.groups = [
                GroupLag(spec.name, "UNKNOWN", 0, error=f"cannot reach Kafka: {exc}") for spec in self.groups
            ]
            return report
        for spec in self.groups:
            try:
                report.groups.append(self._group(spec, topics, now))
            except (KafkaException, OSError, RuntimeError) as exc:
                log.warning("lag evaluation failed", extra={"group": spec.name, "error": str(exc)})
                report.groups.append(GroupLag(spec.name, "UNKNOWN", 0, error=str(exc)))
        return report

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # --- the calls ---------------------------------------------------------------------------------------

    def _topic_partitions(self) -> dict[str, int]:
        meta = self._admin.list_topics(timeout=self.timeout_s)
        return {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}

    def _group(self, spec: GroupSpec, topics: dict[str, int], now: float) -> GroupLag:
        state, members, assigned = self._describe(spec.name)
        # The group's topics: the spec's, else those its members are assigned now. Always asked for by
        # partition: librdkafka 2.16 crashes parsing an "all partitions" OffsetFetch answer of some groups.
        wanted = [(t, p) for t in spec.topics or sorted({t for t, _ in assigned}) for p in range(topics.get(t, 0))]
        committed = self._committed(spec.name, wanted)
        # A broker that lists members without their assignments: an active group owns its partitions.
        any_assignment = bool(assigned)
        parts = sorted(committed)
        earliest, end = self._offsets(parts)
        group = GroupLag(spec.name, state, members)
        lagging: dict[tuple[str, int], int] = {}
        for tp in parts:
            if tp not in end:
                continue
            low = earliest.get(tp, 0)
            at = committed[tp]
            position = at if at is not None else low
            owned = tp in assigned if any_assignment else (members > 0 and state not in _EMPTY_STATES)
            sample = Sample(now, position, end[tp], owned)
            window = self._samples.setdefault((spec.name, *tp), deque(maxlen=self.window))
            window.append(sample)
            group.partitions.append(
                PartitionLag(
                    tp[0],
                    tp[1],
                    committed[tp],
                    low,
                    end[tp],
                    sample.lag,
                    0.0 if sample.lag == 0 else None,
                    owned,
                    partition_status(window, self.window),
                )
            )
            if sample.lag > 0:
                lagging[tp] = max(position, low)
        if lagging:
            stamps = self._timestamps(lagging)
            for p in group.partitions:
                ts = stamps.get((p.topic, p.partition))
                if ts is not None:
                    p.lag_seconds = max(0.0, now - ts)
        return group

    def _result(self, call: Callable[[], Future[Any]]) -> Any:
        """The result of an admin call, retrying errors Kafka marks retriable (a group coordinator that is
        moving or loading answers NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS) within timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return call().result()
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                retry = isinstance(err, KafkaError) and (err.retriable() or err.code() in _COORDINATOR_NOT_READY)
                if not retry or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _committed(self, group: str, parts: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        if not parts:
            return {}
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in parts])
        result = self._result(
            lambda: self._admin.list_consumer_group_offsets([request], request_timeout=self.timeout_s)[group]
        )
        return {
            (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result.topic_partitions or []
        }

    def _describe(self, group: str) -> tuple[str, int, set[tuple[str, int]]]:
        desc = self._result(
            lambda: self._admin.describe_consumer_groups([group], request_timeout=self.timeout_s)[group]
        )
        assigned = {
            (tp.topic, tp.partition)
            for m in desc.members or []
            for tp in (m.assignment.topic_partitions if m.assignment else [])
        }
        return desc.state.name, len(desc.members or []), assigned

    def _offsets(self, parts: list[tuple[str, int]]) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
        if not parts:
            return {}, {}
        out: list[dict[tuple[str, int], int]] = []
        for spec in (OffsetSpec.earliest(), OffsetSpec.latest()):
            futures = self._admin.list_offsets(
                {TopicPartition(t, p): spec for t, p in parts}, request_timeout=self.timeout_s
            )
            got: dict[tuple[str, int], int] = {}
            for tp, future in futures.items():
                try:
                    got[(tp.topic, tp.partition)] = future.result().offset
                except KafkaException as exc:
                    log.warning(
                        "list offsets failed", extra={"topic": tp.topic, "partition": tp.partition, "error": str(exc)}
                    )
            out.append(got)
        return out[0], out[1]

    def _timestamps(self, positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], float]:
        """Timestamp (epoch s) of the first message at or after each position; partitions whose message
        does not arrive within read_timeout_s are left out."""
        reader = self._reader_consumer()
        reader.assign([TopicPartition(t, p, off) for (t, p), off in positions.items()])
        stamps: dict[tuple[str, int], float] = {}
        paused: list[TopicPartition] = []
        deadline = time.monotonic() + self.read_timeout_s
        try:
            while len(stamps) < len(positions) and (left := deadline - time.monotonic()) > 0:
                msg = reader.poll(min(left, 0.5))
                if msg is None or msg.error() is not None:
                    continue
                key = (msg.topic(), msg.partition())
                ts_type, ts_ms = msg.timestamp()
                if key in positions and key not in stamps and ts_type != 0 and ts_ms >= 0:
                    stamps[key] = ts_ms / 1000
                    paused.append(TopicPartition(*key))
                    reader.pause(paused[-1:])  # one message is all we need from it
        finally:
            if paused:  # the pause flag would outlive the assignment
                reader.resume(paused)
            reader.unassign()
        return stamps

    def _reader_consumer(self) -> Consumer:
        if self._reader is None:
            # Group-less use (assign, never subscribe or commit). Small fetches: one message per partition is
            # all that is read, so do not let librdkafka prefetch megabytes per partition.
            self._reader = Consumer(
                consumer_config(
                    self.settings,
                    "site-activity-lag-reader",
                    **{
                        "enable.auto.commit": False,
                        "enable.auto.offset.store": False,
                        "queued.min.messages": 1,
                        "queued.max.messages.kbytes": 1024,
                        "fetch.max.bytes": 1 << 20,
                        "max.partition.fetch.bytes": 64 << 10,
                        "fetch.wait.max.ms": 100,
                    },
                )
            )
        return self._reader


# --- Prometheus --------------------------------------------------------------------------------------------

# Metric names as kafka-lag-exporter (and klag-exporter) publish them, so existing dashboards and alerts fit.
METRIC_NAMES = (
    "kafka_consumergroup_group_offset",
    "kafka_consumergroup_group_lag",
    "kafka_consumergroup_group_lag_seconds",
    "kafka_consumergroup_group_max_lag",
    "kafka_consumergroup_group_max_lag_seconds",
    "kafka_consumergroup_group_sum_lag",
    "kafka_partition_latest_offset",
    "kafka_partition_earliest_offset",
    "kafka_consumergroup_partition_status",
    "kafka_consumergroup_group_status",
    "kafka_consumergroup_lag_evaluation_timestamp_seconds",
)


def metric_families(report: LagReport | None) -> list[GaugeMetricFamily]:
    """The report as Prometheus gauges (labels group/topic/partition; statuses one-hot with a `status`
    label: 1 for the current status, 0 for the others)."""
    gl, gtp, tp = ["group"], ["group", "topic", "partition"], ["topic", "partition"]
    f = {
        "offset": GaugeMetricFamily("kafka_consumergroup_group_offset", "Committed offset of the group", labels=gtp),
        "lag": GaugeMetricFamily(
            "kafka_consumergroup_group_lag", "End offset minus committed offset (messages)", labels=gtp
        ),
        "lag_s": GaugeMetricFamily(
            "kafka_consumergroup_group_lag_seconds", "Age of the oldest unconsumed message (seconds)", labels=gtp
        ),
        "max_lag": GaugeMetricFamily(
            "kafka_consumergroup_group_max_lag", "Largest partition lag (messages)", labels=gl
        ),
        "max_lag_s": GaugeMetricFamily(
            "kafka_consumergroup_group_max_lag_seconds", "Largest partition lag (seconds)", labels=gl
        ),
        "sum_lag": GaugeMetricFamily(
            "kafka_consumergroup_group_sum_lag", "Lag summed over partitions (messages)", labels=gl
        ),
        "latest": GaugeMetricFamily("kafka_partition_latest_offset", "End offset (high watermark)", labels=tp),
        "earliest": GaugeMetricFamily("kafka_partition_earliest_offset", "Earliest offset", labels=tp),
        "pstatus": GaugeMetricFamily(
            "kafka_consumergroup_partition_status",
            "Burrow-style status of the partition (1 = current)",
            labels=[*gtp, "status"],
        ),
        "gstatus": GaugeMetricFamily(
            "kafka_consumergroup_group_status",
            "Worst partition status of the group (1 = current)",
            labels=["group", "status"],
        ),
        "ts": GaugeMetricFamily(
            "kafka_consumergroup_lag_evaluation_timestamp_seconds",
            "When the lag was last evaluated (epoch seconds)",
            labels=[],
        ),
    }
    if report is not None:
        f["ts"].add_metric([], report.time)
        seen_tp: set[tuple[str, int]] = set()
        for g in report.groups:
            if g.error is None:
                f["max_lag"].add_metric([g.group], g.max_lag)
                f["max_lag_s"].add_metric([g.group], g.max_lag_seconds)
                f["sum_lag"].add_metric([g.group], g.sum_lag)
                for s in STATUSES:
                    f["gstatus"].add_metric([g.group, s], 1.0 if g.status == s else 0.0)
            for p in g.partitions:
                labels = [g.group, p.topic, str(p.partition)]
                if p.committed is not None:
                    f["offset"].add_metric(labels, p.committed)
                f["lag"].add_metric(labels, p.lag)
                if p.lag_seconds is not None:
                    f["lag_s"].add_metric(labels, p.lag_seconds)
                for s in STATUSES:
                    f["pstatus"].add_metric([*labels, s], 1.0 if p.status == s else 0.0)
                if (p.topic, p.partition) not in seen_tp:
                    seen_tp.add((p.topic, p.partition))
                    f["latest"].add_metric([p.topic, str(p.partition)], p.end)
                    f["earliest"].add_metric([p.topic, str(p.partition)], p.earliest)
    return list(f.values())


class LagMetrics(Collector):
    """A Prometheus collector serving the latest evaluation of a LagMonitor, which a daemon thread runs every
    `interval_s`: the cost is one evaluation per interval however often /metrics is scraped."""

    def __init__(self, monitor: LagMonitor, interval_s: float) -> None:
        self.monitor = monitor
        self.interval_s = interval_s
        self.latest: LagReport | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lag-metrics", daemon=True)

    def start(self) -> LagMetrics:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the thread; does not wait longer than timeout_s for an evaluation in progress (a daemon
        thread, it dies with the process)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if not self._thread.is_alive():
            self.monitor.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.latest = self.monitor.evaluate()
            except Exception:  # never let the metrics thread die; the next interval retries
                log.exception("lag evaluation failed")
            self._stop.wait(self.interval_s)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from metric_families(self.latest)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from metric_families(None)


def start_lag_metrics(
    registry: CollectorRegistry, settings: Settings, groups: Sequence[GroupSpec], interval_s: float | None = None
) -> LagMetrics:
    """Registers the kafka_consumergroup_* / kafka_partition_* gauges of `groups` on `registry` and starts
    evaluating them every `interval_s` (default settings.lag_interval_s) in a daemon thread. A consumer
    stage calls this once with its own group (e.g. `[sink_group(settings)]`); `stop()` ends the thread."""
    metrics = LagMetrics(LagMonitor(settings, groups), interval_s or settings.lag_interval_s)
    registry.register(metrics)
    return metrics.start()


# --- CLI ---------------------------------------------------------------------------------------------------


def render_table(report: LagReport) -> Any:
    """A rich Table: one row per group and partition."""
    from rich.table import Table

    table = Table(title=f"consumer lag at {time.strftime('%H:%M:%S', time.localtime(report.time))}")
    for col in ("group", "status", "topic", "partition", "committed", "end", "lag", "lag s", "owned"):
        table.add_column(col, justify="right" if col in ("partition", "committed", "end", "lag", "lag s") else "left")
    colour = {"OK": "green", "WARN": "yellow", "STALL": "red", "STOP": "red", "REWIND": "magenta"}
    for g in report.groups:
        if g.error is not None:
            table.add_row(g.group, "[red]ERROR", "(below)", "", "", "", "", "", "")
            continue
        table.add_row(
            f"[bold]{g.group}",
            f"[{colour[g.status]}]{g.status}",
            f"{g.state}, {g.members} member(s)",
            "",
            "",
            "",
            str(g.sum_lag),
            f"{g.max_lag_seconds:.1f}",
            "",
        )
        for p in g.partitions:
            table.add_row(
                "",
                f"[{colour[p.status]}]{p.status}",
                p.topic,
                str(p.partition),
                "-" if p.committed is None else str(p.committed),
                str(p.end),
                str(p.lag),
                "?" if p.lag_seconds is None else f"{p.lag_seconds:.1f}",
                "yes" if p.owned else "no",
            )
    return table


def run_cli(
    settings: Settings,
    *,
    as_json: bool,
    watch: bool,
    serve: bool,
    groups: Sequence[str] = (),
    interval_s: float | None = None,
    samples: int = 3,
    port: int | None = None,
    max_rounds: int | None = None,
) -> int:
    """`site-activity lag`. One-shot: `samples` evaluations `interval_s` apart (default 1 s; enough for
    STOP and REWIND, STALL/WARN need a full window: use --watch); --watch: every interval_s (default
    lag_interval_s) until Ctrl-C; --serve: a Prometheus exporter on `port` (default lag_exporter_port).
    Returns 0 if every group is OK or WARN, 1 otherwise (one-shot)."""
    specs = pipeline_groups(settings, [GroupSpec(g) for g in groups])
    if serve:
        return _serve(settings, specs, interval_s or settings.lag_interval_s, port or settings.lag_exporter_port)
    from rich.console import Console

    console = Console()
    monitor = LagMonitor(settings, specs)
    try:
        if not watch:
            step = interval_s if interval_s is not None else 1.0
            for i in range(max(1, samples)):
                if i:
                    time.sleep(step)
                report = monitor.evaluate()
            _show(console, report, as_json)
            return 0 if all(SEVERITY[g.status] <= SEVERITY["WARN"] and g.error is None for g in report.groups) else 1
        step = interval_s or settings.lag_interval_s
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            if rounds:
                time.sleep(step)
            _show(console, monitor.evaluate(), as_json, clear=not as_json)
            rounds += 1
        return 0
    finally:
        monitor.close()


def _show(console: Any, report: LagReport, as_json: bool, clear: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_dict()), flush=True)
        return
    if clear:
        console.clear()
    console.print(render_table(report))
    for g in report.groups:
        if g.error is not None:
            console.print(f"[red]{g.group}: {g.error}", highlight=False)


def _serve(settings: Settings, specs: Sequence[GroupSpec], interval_s: float, port: int) -> int:
    import signal

    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    metrics = start_lag_metrics(registry, settings, specs, interval_s)
    server, _thread = start_http_server(port, addr=settings.http_host, registry=registry)
    log.info("lag exporter started", extra={"port": port, "groups": [g.name for g in specs], "interval_s": interval_s})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    metrics.stop()
    return 0
