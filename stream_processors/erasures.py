"""Erased visitors: the processors drop their state and ignore their events from then on.

The console's erase publishes a marker per erased visitor key to the compacted `<prefix>.erasures` topic
(site_activity/erasure.py), keyed like the raw topic and with the same partition count, so faust assigns its
partitions together with the raw topic's and the worker that owns a visitor's state gets its marker. The
agent replaces the visitor's state with a tombstone document; the processor skips every later event of a
visitor whose state is that tombstone, so no session or link of an erased visitor is rebuilt or published.
The tombstone goes through the table's changelog like any state write, so it survives restarts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import faust
from prometheus_client import Counter

ERASED_DOC: dict[str, Any] = {"erased": True}

ERASURES_APPLIED = Counter("site_activity_processors_erasures_total", "Erasure markers applied to visitor state")
EVENTS_DROPPED = Counter("site_activity_processors_erased_events_total",
                         "Events of erased visitors dropped by the processors")


def is_erased(doc: dict[str, Any] | None) -> bool:
    return bool(doc) and doc.get("erased") is True  # type: ignore[union-attr]


def add_erasure_agent(app: faust.App, topic_name: str, partitions: int, store: Any) -> None:
    """`store` is the processors' TableStore: put(key, partition, doc) writes table and changelog."""
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                      partitions=partitions)

    @app.agent(topic, name="erasures")
    async def erase(stream: faust.StreamT) -> None:
        async for event in stream.events():
            apply_erasures(store, [event.message])


def apply_erasures(store: Any, messages: Iterable[Any]) -> None:
    """Turns the state of every marker's key into the tombstone. `messages` have `.key` (bytes, the raw topic's
    key) and `.partition`: faust's messages (the agent) or ones read back by the skipped-offset repair."""
    for message in messages:
        if message.key:
            store.put(message.key, message.partition, ERASED_DOC)
            ERASURES_APPLIED.inc()
