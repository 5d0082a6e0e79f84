"""The faust application: the raw-events agent, the visitor-state table and the web pages.

faust owns the consumer group, the co-partitioned visitor-state table and its changelog recovery, acks and
offset commits, and the web server. The agent hands each `take_events()` batch to `BatchProcessor`.

Throughput note: faust moves every consumed message through its own per-message machinery (tasks in the
fetch loop, the conductor, the stream iterator) before `take_events()` sees it; on the 2-core reference box
that caps a worker at ~8k messages/s even with an empty agent body. The API therefore publishes one message
per ingest request (up to 25 events from the widget), so that cost is paid once per request, and the batch
work (decode, placement, output, and the table's changelog records) is done outside faust with a
confluent-kafka producer (`outputs.py`). Figures: bench/bench_processors.py. More workers in the group add
throughput.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
from confluent_kafka import Consumer, TopicPartition
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from site_activity.kafka import consumer_config
from site_activity.settings import Settings
from site_activity.topics import Topics
from stream_processors.erasures import add_erasure_agent
from stream_processors.outputs import Outputs
from stream_processors.processor import BatchProcessor
from stream_processors.transport import App

log = logging.getLogger(__name__)

STATE_TABLE = "visitor-state"


class TableStore:
    """Visitor state in a faust table: read and updated in memory through the table, its changelog records
    written by `Outputs` (flushed before every offset commit, like the enriched events).

    Each visitor's record goes to its own key's partition, so that recovery restores it to the worker that
    owns that partition (faust's `table[key] = doc` would use the partition of the "current event", which in
    a take() batch is merely the batch's last one)."""

    def __init__(self, table: faust.Table, outputs: Outputs) -> None:
        self.table = table
        self.outputs = outputs
        self.changelog = table.changelog_topic.get_topic_name()

    def get(self, key: bytes) -> dict[str, Any] | None:
        return self.table.data.get(key)  # type: ignore[no-any-return]

    def put(self, key: bytes, partition: int, doc: dict[str, Any]) -> None:
        self.table.data[key] = doc
        self.outputs.send_state(self.changelog, partition, key, doc)


@dataclass(frozen=True)
class FetchedMessage:
    """A raw message read outside faust, with the attributes `BatchProcessor` reads."""

    topic: str
    partition: int
    offset: int
    timestamp: float
    key: bytes | None
    value: bytes | None


class SkippedReader:
    """Reads the raw messages faust skipped (see `transport.py`) straight from Kafka and processes them,
    before faust commits past them. A group-less consumer: it never commits anything itself."""

    def __init__(self, settings: Settings, raw_topic: str, process: Callable[[list[FetchedMessage]], None],
                 timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.raw_topic = raw_topic
        self.process = process
        self.timeout_s = timeout_s

    def __call__(self, topic: str, partition: int, first: int, end: int) -> None:
        if topic != self.raw_topic:
            return
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.processors_app_id}-skipped"))
        consumer.assign([TopicPartition(topic, partition, first)])
        messages: list[FetchedMessage] = []
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None or msg.error() is not None:
                    continue
                if msg.offset() >= end:
                    break
                messages.append(FetchedMessage(topic, partition, msg.offset(), msg.timestamp()[1] / 1000,
                                               msg.key(), msg.value()))
                if msg.offset() == end - 1:
                    break
        finally:
            consumer.close()
        log.warning("processed skipped messages", extra={
            "topic": topic, "partition": partition, "first": first, "end": end, "messages": len(messages)})
        if messages:
            self.process(messages)


def create_app(settings: Settings) -> App:
    topics = Topics.from_settings(settings)
    app = App(
        settings.processors_app_id,
        fetch_wait_max_ms=settings.consumer_fetch_wait_max_ms,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",  # state is rebuilt from the changelog on start
        datadir=str(settings.data_dir / "processors"),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        # exactly_once has open rebalance bugs in faust; downstream writes are idempotent instead.
        processing_guarantee="at_least_once",
        broker_session_timeout=settings.consumer_session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.consumer_heartbeat_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, 2 * settings.processors_batch_max_messages),
        web_enabled=True,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=settings.processors_web_port,
        autodiscover=False,
    )
    raw = app.topic(topics.raw_events, key_type=bytes, value_type=bytes, key_serializer="raw",
                    value_serializer="raw", partitions=settings.topic_partitions)
    # Keys: the raw message key bytes; values: JSON documents (state.py). faust compacts table changelogs.
    table = app.Table(STATE_TABLE, default=None, partitions=settings.topic_partitions, key_type=bytes)

    outputs = Outputs(settings)
    processor = BatchProcessor(settings, TableStore(table, outputs), outputs)
    app.commit_barriers.append(outputs.deliver)
    app.skipped_offsets_handler = SkippedReader(settings, topics.raw_events, processor.process)

    @app.agent(raw)
    async def enrich(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.processors_batch_max_messages,
                                               within=settings.processors_batch_max_s):
            processor.process([event.message for event in events])

    add_erasure_agent(app, topics.erasures, settings.topic_partitions, processor.store)
    _add_pages(app)
    return app


def _add_pages(app: faust.App) -> None:
    recovered_once = False

    @app.page("/healthz")
    async def healthz(web: View, request: Request) -> Response:
        # Healthy once the worker has joined the group and recovered its tables; stays healthy during
        # later rebalances (a liveness probe must not kill a worker for recovering).
        nonlocal recovered_once
        recovered_once = recovered_once or app.tables.recovery.completed.is_set()
        if recovered_once and not app.should_stop:
            return web.json({"status": "ok"})
        return web.json({"status": "starting"}, status=503)

    @app.page("/metrics")
    async def metrics_page(web: View, request: Request) -> Response:
        # via headers: aiohttp rejects a content_type argument that carries a charset
        return web.bytes(generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
