"""Erased visitors: the processors drop their state and ignore their events from then on.

The console's erase publishes a marker per erased visitor key to the compacted `<prefix>.erasures` topic
(site_activity/erasure.py), keyed like the raw topic and with the same partition count, so faust assigns its
partitions together with the raw topic's and the worker that owns a visitor's state gets its marker. The
agent replaces the visitor's state with a tombstone document; the processor skips every later event of a
visitor whose state is that tombstone, so no session or link of an erased visitor is rebuilt or published.
The tombstone goes through the table's changelog like any state write, so it survives restarts.

An erased contact's marker goes to every partition; each partition records it in its state, and the processor
then never links a visitor to that contact (an identify still in flight when the erase ran would otherwise
link its visitor and publish the link), and drops such a link a visitor's state already holds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import faust

from site_activity.erasure import CONTACT_MARKER_PREFIX
from stream_processors import metrics

ERASED_DOC: dict[str, Any] = {"erased": True}


def is_erased(doc: dict[str, Any] | None) -> bool:
    return doc is not None and doc.get("erased") is True


def add_erasure_agent(app: faust.App, topic_name: str, partitions: int, store: Any) -> None:
    """`store` is the processors' TableStore: put(key, partition, doc) writes table and changelog."""
    topic = app.topic(
        topic_name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )

    @app.agent(topic, name="erasures")
    async def erase(stream: faust.StreamT) -> None:
        async for event in stream.events():
            apply_erasures(store, [event.message])


def apply_erasures(store: Any, messages: Iterable[Any]) -> None:
    """Turns the state of every visitor marker's key into the tombstone, and records every contact marker
    (one per partition) in that partition's state. `messages` have `.key` (bytes) and `.partition`: faust's
    messages (the agent) or ones read back by the skipped-offset repair."""
    for message in messages:
        if not message.key:
            continue
        if message.key.startswith(CONTACT_MARKER_PREFIX):
            customer_id = message.key[len(CONTACT_MARKER_PREFIX) :].decode(errors="replace")
            store.put(erased_contact_key(message.partition, customer_id), message.partition, ERASED_DOC)
        else:
            store.put(message.key, message.partition, ERASED_DOC)
        metrics.ERASURES_APPLIED.inc()


def erased_contact_key(partition: int, customer_id: str) -> bytes:
    """State key of an erased contact on one partition (each partition keeps its own record, restored with
    that partition's changelog). Never a visitor key: those start with a widget uuid."""
    return erased_contacts_prefix(partition) + customer_id.encode()


def erased_contacts_prefix(partition: int) -> bytes:
    return b"erased-contact:%d:" % partition


def is_contact_erased(store: Any, partition: int, customer_id: str) -> bool:
    return is_erased(store.get(erased_contact_key(partition, customer_id), partition))


def any_contact_erased(store: Any, partition: int) -> bool:
    """False only if the partition's state holds no erased contact at all (then `is_contact_erased` is False for
    every contact, and the processor skips its lookups: one per identity link per visitor and batch). Stores that
    cannot tell cheaply (`has_key_prefix` missing or None: memory://) answer True."""
    has_key_prefix = getattr(store, "has_key_prefix", None)
    found = None if has_key_prefix is None else has_key_prefix(partition, erased_contacts_prefix(partition))
    return True if found is None else found
