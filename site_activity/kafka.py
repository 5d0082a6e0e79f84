"""confluent-kafka client configuration and topic administration, derived from Settings."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from site_activity.kafka_security import ClientConfig, confluent_security
from site_activity.settings import Settings
from site_activity.topics import Topics

log = logging.getLogger(__name__)


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a message a consumer returned without error: confluent-kafka types them as
    optional because a produced-but-undelivered or error message may lack them; a consumed one never does."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None, "not a consumed message"
    return topic, partition, offset


def next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """Per partition, the offset after the last message: what to commit once the messages are durable."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        topic, partition, offset = position(m)
        last[topic, partition] = max(last.get((topic, partition), -1), offset)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in sorted(last.items())]


def client_config(settings: Settings, **overrides: Any) -> ClientConfig:
    """What every confluent-kafka client of every stage starts from: the brokers and the security settings
    (site_activity/kafka_security.py); repr masks secrets."""
    return ClientConfig({"bootstrap.servers": settings.kafka_bootstrap, **confluent_security(settings), **overrides})


def producer_config(settings: Settings, **overrides: Any) -> ClientConfig:
    conf = client_config(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": settings.producer_compression,
            "linger.ms": settings.producer_linger_ms,
            "queue.buffering.max.messages": settings.producer_queue_max_messages,
            # Same key -> same partition as the Java client and faust/aiokafka (murmur2).
            "partitioner": "murmur2_random",
            "message.timeout.ms": max(int(settings.produce_timeout_s * 1000) * 6, 30_000),
            "message.max.bytes": settings.kafka_max_message_bytes,
        }
    )
    conf.update(overrides)
    return conf


# --- producing: the one way every stage, tool and benchmark hands records to a confluent producer ------------


class DeliveryFailed(Exception):
    """Records were not confirmed by the broker (failed delivery reports, or still queued after the flush)."""


class DeliveryReports:
    """An `on_delivery` callback that keeps the failures; successes cost nothing beyond the call."""

    def __init__(self) -> None:
        self.failures: list[KafkaError] = []

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failures.append(err)


def produce_waiting(
    producer: Producer, topic: str, value: bytes | None, key: bytes | None = None, **options: Any
) -> None:
    """`producer.produce(...)`, waiting while librdkafka's bounded local queue is full (back-pressure: serve
    delivery reports, try again) instead of failing with BufferError. A KafkaException (e.g. a record too
    large: `dead_letters.is_unwritable`) is raised to the caller, which decides whether to dead-letter it."""
    while True:
        try:
            producer.produce(topic, value, key, **options)
            return
        except BufferError:
            producer.poll(0.05)


def flush_or_raise(producer: Producer, timeout_s: float, reports: DeliveryReports | None = None) -> None:
    """Waits up to `timeout_s` seconds until everything produced so far is delivered; raises `DeliveryFailed`
    if something is still queued then, or if `reports` (the records' on_delivery) saw a failure."""
    left = producer.flush(timeout_s)
    failures = reports.failures if reports is not None else []
    if left or failures:
        raise DeliveryFailed(
            f"{left} record(s) unconfirmed after {timeout_s:.0f} s, {len(failures)} failed"
            + (f": {failures[0]}" if failures else "")
        )


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> ClientConfig:
    conf = client_config(settings)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings.consumer_session_timeout_ms,
            "heartbeat.interval.ms": settings.consumer_heartbeat_interval_ms,
            "fetch.wait.max.ms": settings.consumer_fetch_wait_max_ms,
            "partition.assignment.strategy": "range,roundrobin",
        }
    )
    conf.update(overrides)
    return conf


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def ensure_topics(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Creates missing topics with their final partition counts; existing topics are left alone."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout).topics)
    rf = settings.topic_replication_factor
    # Replicated topics say how many replicas an acks=all write needs; one replica has nothing to say.
    isr = {"min.insync.replicas": str(settings.topic_min_insync_replicas)} if rf > 1 else {}
    wanted = [
        NewTopic(spec.name, num_partitions=spec.partitions, replication_factor=rf, config={**spec.config, **isr})
        for spec in Topics.from_settings(settings).specs(settings)
        if spec.name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in client.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won the race
                raise
    log.info("created topics", extra={"topics": created})
    return created
