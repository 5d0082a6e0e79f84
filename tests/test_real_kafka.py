"""What only a real Kafka gets right, checked on the suite's Apache Kafka broker: consumer lag from committed
vs end offsets (Tansu reports wrong end offsets). faust's changelog recovery after SIGKILL with default
producer batching is test_processors.py::test_restart_recovery_sigterm_and_sigkill."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from dev_stack.embedded import wait_until
from dev_stack.kafka_dist import broker_kind
from site_activity.kafka import consumer_config
from site_activity.settings import Settings
from tests.conftest import broker_settings
from tests.test_sink import count_rows, make_event, metric, produce, wait_count

pytestmark = pytest.mark.skipif(
    broker_kind(broker_settings()) != "kafka", reason="needs Apache Kafka (Java 17+): Tansu's end offsets are wrong"
)

LAG = "site_activity_sink_consumer_lag_messages"


def group_lag(settings: Settings, topic: str) -> int:
    """Sum over the topic's partitions of end offset minus the sink group's committed offset (what
    kafka-consumer-groups.sh shows as LAG); a partition without a commit counts from its start."""
    consumer = Consumer(consumer_config(settings, settings.sink_group))  # never subscribes: no group join
    try:
        parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        lag = 0
        for tp in consumer.committed(parts, timeout=10):
            low, high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def test_sink_lag_grows_by_the_messages_produced_while_it_is_stopped(
    raw_settings: Settings, topics: Any, db: Any, make_widget: Any, start_service: Any
) -> None:
    s = raw_settings
    w = make_widget()
    sink = start_service("sink", settings_override=s)
    produce(s, topics.raw_events, [make_event(w, f"v-{i}") for i in range(30)])
    wait_count(db, w.id, 30)
    wait_until(lambda: group_lag(s, topics.raw_events) == 0, 20, "sink caught up")
    # The sink's own gauge agrees once its last commit is in: nothing left behind.
    wait_until(lambda: metric(s.sink_http_port, LAG) == 0, 20, "sink lag gauge at 0")

    sink.stop()
    n = 40
    produce(s, topics.raw_events, [make_event(w, f"late-{i}") for i in range(n)])  # one message each
    assert group_lag(s, topics.raw_events) == n
    assert count_rows(db, w.id) == 30

    sink.start()
    wait_count(db, w.id, 30 + n)
    wait_until(lambda: group_lag(s, topics.raw_events) == 0, 20, "sink caught up after restart")
    wait_until(lambda: metric(s.sink_http_port, LAG) == 0, 20, "sink lag gauge back at 0")


@pytest.fixture
def raw_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sink_from_enriched": False, "sink_group": f"sink-{uuid.uuid4().hex[:8]}"})
