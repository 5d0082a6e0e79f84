"""The faust application, wiring only: the raw-events agent, the erasures agent, the visitor-state table, the
expiry timer and the web pages.

faust owns the consumer group, the co-partitioned visitor-state table and its changelog recovery, acks and
offset commits, and the web server. The agent hands each `take_events()` batch to `BatchProcessor`
(`processor.py`); everything it writes, the table's changelog included, goes through `Outputs` (`outputs.py`, a
confluent-kafka producer) rather than faust: faust's per-message machinery is costly (figures in bench/README.md),
so the API publishes one message per ingest request (up to 25 events) and the batch work is done outside faust.
More workers in the group add throughput.

When an offset is committed and why that is safe (the checkpoint before every commit, the repair of skipped
offsets, what a kill means): `checkpoint.py`. The patches to faust and aiokafka: `transport.py`.
"""

from __future__ import annotations

import logging
from typing import cast

import faust
from faust.tables.manager import TableManager
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from site_activity.kafka_security import faust_security
from site_activity.settings import Settings, reachable_host
from site_activity.topics import Topics
from stream_processors import metrics
from stream_processors.checkpoint import Checkpoint
from stream_processors.erasures import add_erasure_agent, apply_erasures
from stream_processors.outputs import Outputs
from stream_processors.processor import BatchProcessor
from stream_processors.repair import SkippedReader
from stream_processors.store import TableStore, is_rocksdb, table_options
from stream_processors.transport import App

log = logging.getLogger(__name__)

STATE_TABLE = "visitor-state"


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
    raw = app.topic(
        topics.raw_events,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )
    # Keys: the raw message key bytes; values: JSON documents (state.py). faust compacts table changelogs.
    table = app.Table(
        STATE_TABLE,
        default=None,
        partitions=settings.topic_partitions,
        key_type=bytes,
        options=table_options(settings.processors_store_url),
    )

    outputs = Outputs(settings)
    store = TableStore(table, outputs, rocksdb=is_rocksdb(settings.processors_store_url))
    processor = BatchProcessor(settings, store, outputs)
    app.state_store = store
    app.commit_barriers.append(Checkpoint(outputs, store).flush)
    # Same code paths as the agents below: a skipped erasure marker must not be committed past either.
    app.skipped_offsets_handler = SkippedReader(
        settings,
        {topics.raw_events: processor.process, topics.erasures: lambda msgs: apply_erasures(processor.store, msgs)},
        settings.processors_repair_timeout_s,
    )

    @app.agent(raw)
    async def enrich(stream: faust.StreamT) -> None:
        raw = cast(faust.Stream, stream)  # faust's StreamT leaves take_events out; the Stream it passes has it
        async for events in raw.take_events(
            settings.processors_batch_max_messages, within=settings.processors_batch_max_s
        ):
            processor.process([event.message for event in events])

    add_erasure_agent(app, topics.erasures, settings.topic_partitions, processor.store)

    @app.timer(settings.processors_expiry_interval_s)
    async def expire_idle_visitors() -> None:
        # Same event loop as the agent: a scan never runs in the middle of a batch.
        if _recovered(app):
            store.expire(
                store.active_partitions(app), settings.processors_state_horizon_s, settings.processors_expiry_scan_keys
            )
            outputs.check()

    _add_pages(app)
    return app


def _recovered(app: faust.App) -> bool:
    """Whether the worker has recovered its tables for the current assignment (TableManagerT leaves `recovery`
    out; faust's TableManager has it)."""
    return cast(TableManager, app.tables).recovery.completed.is_set()


def _add_pages(app: faust.App) -> None:
    recovered_once = False

    @app.page("/healthz")
    async def healthz(web: View, request: Request) -> Response:
        # Healthy once the worker has joined the group and recovered its tables; stays healthy during
        # later rebalances (a liveness probe must not kill a worker for recovering).
        nonlocal recovered_once
        recovered_once = recovered_once or _recovered(app)
        if recovered_once and not app.should_stop:
            return web.json({"status": "ok"})
        return web.json({"status": "starting"}, status=503)

    @app.page("/metrics")
    async def metrics_page(web: View, request: Request) -> Response:
        # via headers: aiohttp rejects a content_type argument that carries a charset
        return web.bytes(generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
