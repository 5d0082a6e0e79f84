"""The faust application: the raw-events agent, the visitor-state table and the web pages.

faust owns the consumer group, the co-partitioned visitor-state table and its changelog recovery, acks and
offset commits, and the web server. The agent hands each `take_events()` batch to `BatchProcessor`.

Throughput note: faust moves every consumed message through its own per-message machinery (tasks in the
fetch loop, the conductor, the stream iterator) before `take_events()` sees it; on the 2-core reference box
that caps a worker at ~8k messages/s even with an empty agent body. The API therefore publishes one message
per ingest request (up to 25 events from the widget), so that cost is paid once per request, and the batch
work (decode, placement, output) is done outside faust with a confluent-kafka producer. Figures:
bench/bench_processors.py. More workers in the group add throughput.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from site_activity.settings import Settings
from site_activity.topics import Topics
from stream_processors.processor import BatchProcessor
from stream_processors.transport import App

STATE_TABLE = "visitor-state"


class TableStore:
    """Visitor state in a faust table, written with an explicit changelog partition.

    `table[key] = doc` would put the changelog record on the partition of faust's "current event", which
    in a take() batch is merely the batch's last event, possibly of another partition. Each visitor's
    state must land on its own key's partition so that recovery restores it to the worker that owns it."""

    def __init__(self, table: faust.Table) -> None:
        self.table = table

    def get(self, key: bytes) -> dict[str, Any] | None:
        return self.table.data.get(key)  # type: ignore[no-any-return]

    def put(self, key: bytes, partition: int, doc: dict[str, Any]) -> None:
        self.table.data[key] = doc
        self.table.send_changelog(partition, key, doc)


def create_app(settings: Settings) -> faust.App:
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
        producer_max_batch_size=settings.processors_producer_max_batch_size,
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

    @app.agent(raw)
    async def enrich(stream: faust.StreamT) -> None:
        processor = BatchProcessor(settings, TableStore(table))
        async for events in stream.take_events(settings.processors_batch_max_messages,
                                               within=settings.processors_batch_max_s):
            processor.process([event.message for event in events])

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
