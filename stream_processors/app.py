"""The faust application: the raw-events agent, the visitor-state table and the web pages.

faust owns the consumer group, the co-partitioned visitor-state table and its changelog recovery, acks and
offset commits, and the web server. The agent hands each `take_events()` batch to `BatchProcessor`.

Throughput note: faust moves every consumed message through its own per-message machinery (tasks in the
fetch loop, the conductor, the stream iterator) before `take_events()` sees it; on the 2-core reference box
that capped a worker at ~8k messages/s even with an empty agent body (before `transport.py` skipped the five
tasks per message of faust's fetch loop; still ~50 µs per message, ~12 % of a worker, issue 14). The API
therefore publishes one message per ingest request (up to 25 events from the widget), so that cost is paid once
per request, and the batch
work (decode, placement, output, and the table's changelog records) is done outside faust with a
confluent-kafka producer (`outputs.py`). Figures: bench/bench_processors.py. More workers in the group add
throughput.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust
from confluent_kafka import Consumer, TopicPartition
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from site_activity.kafka import consumer_config
from site_activity.kafka_security import faust_security
from site_activity.settings import Settings, reachable_host
from site_activity.topics import Topics
from stream_processors.erasures import add_erasure_agent, apply_erasures
from stream_processors.outputs import EXIT_DELIVERY_FAILED, Outputs
from stream_processors.processor import BatchProcessor
from stream_processors.store import TableStore, is_rocksdb, table_options
from stream_processors.transport import App

log = logging.getLogger(__name__)

STATE_TABLE = "visitor-state"


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
    """Reads the messages faust would commit past without processing them (see `transport.py`) straight
    from Kafka and processes them, before faust commits. A group-less consumer: it never commits anything.
    `processes` maps each topic an agent consumes (raw events, erasure markers) to the function that agent
    applies; offsets of other topics are left to faust.

    It reads from the first offset asked for until it has seen an offset at or past the last one (the log
    answers which offsets hold messages), retrying fetch errors; if that takes longer than `timeout_s` the
    process exits without committing, so a restarted worker redoes those messages: never a commit past an
    unprocessed offset."""

    def __init__(self, settings: Settings, processes: dict[str, Callable[[list[FetchedMessage]], None]],
                 timeout_s: float, on_give_up: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.processes = processes
        self.timeout_s = timeout_s
        self.on_give_up = on_give_up or _exit_without_committing

    def __call__(self, topic: str, partition: int, offsets: list[int]) -> bool:
        process = self.processes.get(topic)
        if process is None:
            return False
        messages = self.read(topic, partition, offsets)
        if messages is None:
            log.critical("could not read the messages faust skipped; exiting without committing past them",
                         extra={"topic": topic, "partition": partition, "first": offsets[0], "last": offsets[-1],
                                "timeout_s": self.timeout_s})
            self.on_give_up()
            raise RuntimeError("skipped messages not processed")  # on_give_up must not return
        log.warning("processed skipped messages", extra={
            "topic": topic, "partition": partition, "first": offsets[0], "last": offsets[-1],
            "offsets": len(offsets), "messages": len(messages)})
        if messages:
            process(messages)
        return True

    def read(self, topic: str, partition: int, offsets: list[int]) -> list[FetchedMessage] | None:
        """The messages at `offsets` (sorted) that exist, or None if the log could not be read in time."""
        wanted, last = set(offsets), offsets[-1]
        consumer = Consumer(consumer_config(self.settings, f"{self.settings.processors_app_id}-skipped"))
        consumer.assign([TopicPartition(topic, partition, offsets[0])])
        messages: list[FetchedMessage] = []
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error() is not None:
                    log.warning("reading skipped messages", extra={"error": str(msg.error())})
                    continue
                if msg.offset() in wanted:
                    messages.append(FetchedMessage(topic, partition, msg.offset(), msg.timestamp()[1] / 1000,
                                                   msg.key(), msg.value()))
                if msg.offset() >= last:
                    return messages
            return None
        finally:
            consumer.close()


def _exit_without_committing() -> None:
    logging.shutdown()
    os._exit(EXIT_DELIVERY_FAILED)


def create_app(settings: Settings) -> App:
    topics = Topics.from_settings(settings)
    datadir = settings.data_dir / "processors" / str(settings.processors_web_port)
    datadir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    app = App(
        settings.processors_app_id,
        fetch_wait_max_ms=settings.consumer_fetch_wait_max_ms,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=settings.processors_store_url,  # store.py: RocksDB on disk (default) or memory
        # One directory per worker (its web port is unique on a host): RocksDB locks a partition's database,
        # and a restarted worker finds its own local store again.
        datadir=str(datadir),
        table_standby_replicas=settings.processors_standby_replicas,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        # exactly_once has open rebalance bugs in faust; downstream writes are idempotent instead.
        processing_guarantee="at_least_once",
        broker_session_timeout=settings.consumer_session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.consumer_heartbeat_interval_ms / 1000,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=max(4096, 2 * settings.processors_batch_max_messages),
        web_enabled=True,
        # Probes (Kubernetes) reach the pod's address: bind where the settings say, like every stage.
        web_bind=settings.http_host,
        web_host=reachable_host(settings.http_host),
        web_port=settings.processors_web_port,
        autodiscover=False,
        # TLS / SASL for faust's aiokafka clients: the same settings as every confluent client (kafka_security.py).
        **faust_security(settings),
    )
    raw = app.topic(topics.raw_events, key_type=bytes, value_type=bytes, key_serializer="raw",
                    value_serializer="raw", partitions=settings.topic_partitions)
    # Keys: the raw message key bytes; values: JSON documents (state.py). faust compacts table changelogs.
    table = app.Table(STATE_TABLE, default=None, partitions=settings.topic_partitions, key_type=bytes,
                      options=table_options(settings.processors_store_url))

    outputs = Outputs(settings)
    store = TableStore(table, outputs, rocksdb=is_rocksdb(settings.processors_store_url))
    processor = BatchProcessor(settings, store, outputs)
    app.state_store = store
    app.commit_barriers.append(outputs.deliver)
    app.commit_barriers.append(store.record_persisted_offsets)  # after deliver: those offsets are durable
    # Same code paths as the agents below: a skipped erasure marker must not be committed past either.
    app.skipped_offsets_handler = SkippedReader(
        settings, {topics.raw_events: processor.process,
                   topics.erasures: lambda msgs: apply_erasures(processor.store, msgs)},
        settings.processors_repair_timeout_s)

    @app.agent(raw)
    async def enrich(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.processors_batch_max_messages,
                                               within=settings.processors_batch_max_s):
            processor.process([event.message for event in events])

    add_erasure_agent(app, topics.erasures, settings.topic_partitions, processor.store)

    @app.timer(settings.processors_expiry_interval_s)
    async def expire_idle_visitors() -> None:
        # Same event loop as the agent: a scan never runs in the middle of a batch.
        if app.tables.recovery.completed.is_set():
            store.expire(store.active_partitions(app), settings.processors_state_horizon_s,
                         settings.processors_expiry_scan_keys)
            outputs.check()

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
