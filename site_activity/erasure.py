"""Erasing a person (GDPR): delete their events (and contact), and suppress them from then on.

Race with events in flight: the erase takes an exclusive per-tenant advisory lock for its transaction; the sink
takes the shared one before it filters a batch against `erased_subjects` (sink/writer.py). So a sink transaction
either committed before the erase started (its rows are visible to the erase's DELETE) or starts its filter
after the erase committed (it sees the suppression) — no event of an erased subject survives.
Subjects are stored and audited only as salted hashes (SQL function erasure_hash, migration 0004).
While an erase holds the lock the sink waits, so an erase is kept short: its lookups are index scans (one
visitor's events; a contact's linked events and identify calls), and the Kafka notice is sent after the commit.

Order: commit first, then tell the processors (a marker per visitor key on the erasures topic). A marker must
never go out for an erase that did not commit: the processors would drop a live visitor's events forever. A
marker that arrives late loses nothing: the zero-rows guarantee comes from the sink's lock + suppression check
above, the marker only clears processor state. If Kafka cannot take the markers (after retries), the erase
is still committed; NotifyError tells the caller to repeat the erase (idempotent), which resends them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Message

from site_activity.audit import audit
from site_activity.settings import Settings
from site_activity.topics import Topics, event_key

# pg_advisory_xact_lock(int4, int4) key space: (this class, hashtext(tenant id)). A hash collision between two
# tenants only makes one wait for the other's erase.
TENANT_LOCK_CLASS = 0x5345
_LOCK_EXCLUSIVE = "SELECT pg_advisory_xact_lock(%s, hashtext(%s::text))"


class ErasureError(ValueError):
    """The subject to erase does not exist in the tenant (callers answer 404)."""


class NotifyError(RuntimeError):
    """The erase committed, but the processors could not be told (Kafka unreachable); repeating the erase
    (idempotent) resends the markers."""


# Tells the processors which visitor keys ("<widget_id>:<visitor_id>") and contacts (contact_marker_key) were
# erased; raises NotifyError.
Notify = Callable[[list[bytes]], None]
ERASED_MARKER = b'{"erased":true}'
CONTACT_MARKER_PREFIX = b"contact:"  # never a visitor key: those start with a widget uuid


_Target = tuple[bytes, int | None]  # (key, partition or None: by the key)


def _refusals(into: list[tuple[_Target, str]], target: _Target) -> Callable[[KafkaError | None, Message], None]:
    """A delivery callback that records a refused marker in `into`."""

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            into.append((target, str(err)))

    return delivered


def contact_marker_key(customer_id: uuid.UUID | str) -> bytes:
    """The erasures-topic key telling every processor worker that this contact (customer_id_for(tenant, user),
    a one-way uuid5, never the user id itself) was erased: they refuse new links to it."""
    return CONTACT_MARKER_PREFIX + str(customer_id).encode()


def kafka_notifier(settings: Settings, timeout_s: float = 30.0) -> Notify:
    """Publishes one marker per erased visitor key to the compacted erasures topic (co-partitioned with the
    raw topic: same key, same partitioner) — a contact marker to every partition, since the contact's visitors
    may be on any — and waits until Kafka has acknowledged every one, re-sending
    refused ones until `timeout_s` is spent (then NotifyError). The processors then drop the visitor's state
    and ignore their events for good (stream_processors/erasures.py)."""
    from confluent_kafka import Producer

    from site_activity.kafka import producer_config

    topic = Topics.from_settings(settings).erasures

    def notify(keys: list[bytes]) -> None:
        deadline = time.monotonic() + timeout_s
        producer = Producer(producer_config(settings))
        pending: list[tuple[bytes, int | None]] = []  # (key, partition: None = the key's own)
        for key in keys:
            if key.startswith(CONTACT_MARKER_PREFIX):
                partitions = producer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic())).topics
                if topic not in partitions or not partitions[topic].partitions:
                    raise NotifyError(f"could not publish erasure markers: no partitions for {topic}")
                pending += [(key, p) for p in partitions[topic].partitions]
            else:
                pending.append((key, None))
        while pending:
            refused: list[tuple[_Target, str]] = []
            for key, partition in pending:
                extra: dict[str, Any] = {} if partition is None else {"partition": partition}
                producer.produce(topic, ERASED_MARKER, key, on_delivery=_refusals(refused, (key, partition)), **extra)
            left = producer.flush(max(0.0, deadline - time.monotonic()))
            if left:  # still queued when time ran out: they may go out later, harmless after the commit
                raise NotifyError(f"could not publish erasure markers to {topic}: {left} undelivered")
            if refused and time.monotonic() >= deadline:
                raise NotifyError(f"could not publish erasure markers to {topic}: {refused[0][1]}")
            pending = [k for k, _ in refused]
            if pending:  # refused outright (e.g. leader moving): give the cluster a moment before re-sending
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    return notify


@dataclass(frozen=True)
class Erasure:
    subject_hash: str  # hex; what the audit log names
    events_deleted: int
    visitors: int = 1
    contact_deleted: bool = False

    def public(self) -> dict[str, object]:
        return {
            "subject_hash": self.subject_hash,
            "events_deleted": self.events_deleted,
            "visitors": self.visitors,
            "contact_deleted": self.contact_deleted,
        }


def _require_idle(conn: psycopg.Connection) -> None:
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("erase needs a connection outside a transaction: it must commit before notifying")


def _suppress(conn: psycopg.Connection, tenant_id: uuid.UUID, kind: str, subject: str) -> bytes:
    row = conn.execute(
        "INSERT INTO erased_subjects (tenant_id, subject_hash, kind) VALUES (%s, erasure_hash(%s, %s, %s), %s)"
        " ON CONFLICT (tenant_id, subject_hash) DO UPDATE SET erased_at = erased_subjects.erased_at"
        " RETURNING subject_hash",
        (tenant_id, tenant_id, kind, subject, kind),
    ).fetchone()
    return bytes(row[0])  # type: ignore[index]


def erase_visitor(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    widget_id: uuid.UUID,
    visitor_id: str,
    *,
    actor: str,
    notify: Notify,
    request_id: str | None = None,
) -> Erasure:
    """Deletes every event of the widget's visitor and suppresses that visitor id from now on (also before it
    was ever seen). Raises ErasureError when the widget is not the tenant's (nothing erased), NotifyError
    (erased, processors not told yet: repeat the erase) when Kafka cannot take the marker. `conn` must not be
    inside a transaction: the erase commits before the marker is sent."""
    _require_idle(conn)
    with conn.transaction():
        if (
            conn.execute(
                "SELECT 1 FROM widget_configs WHERE id = %s AND tenant_id = %s", (widget_id, tenant_id)
            ).fetchone()
            is None
        ):
            raise ErasureError(f"no widget {widget_id}")
        conn.execute(_LOCK_EXCLUSIVE, (TENANT_LOCK_CLASS, tenant_id))
        digest = _suppress(conn, tenant_id, "visitor", f"{widget_id}:{visitor_id}").hex()
        deleted = conn.execute(
            "DELETE FROM visitor_events WHERE tenant_id = %s AND visitor_id = %s AND widget_id = %s",
            (tenant_id, visitor_id, widget_id),
        ).rowcount
        result = Erasure(digest, deleted)
        audit(
            conn,
            actor=actor,
            action="erase.visitor",
            tenant_id=tenant_id,
            entity="visitor",
            entity_id=digest,
            old=None,
            new={"events_deleted": deleted},
            request_id=request_id,
        )
    notify([event_key(str(widget_id), visitor_id)])  # only once committed (module docstring)
    return result


def erase_contact(
    conn: psycopg.Connection,
    tenant_id: uuid.UUID,
    customer_id: uuid.UUID,
    *,
    actor: str,
    notify: Notify,
    request_id: str | None = None,
) -> Erasure:
    """Deletes the contact, every event of every visitor ever linked to it (and its identify calls), and
    suppresses the contact, its user id and those visitors from now on. Raises ErasureError when the tenant
    has no such contact, NotifyError as erase_visitor."""
    _require_idle(conn)
    with conn.transaction():
        row = conn.execute(
            "SELECT external_id FROM customers WHERE id = %s AND tenant_id = %s", (customer_id, tenant_id)
        ).fetchone()
        if row is None:
            raise ErasureError(f"no contact {customer_id}")
        user_id = row[0]
        conn.execute(_LOCK_EXCLUSIVE, (TENANT_LOCK_CLASS, tenant_id))
        digest = _suppress(conn, tenant_id, "contact", str(customer_id)).hex()
        _suppress(conn, tenant_id, "user", user_id)
        visitors = conn.execute(
            "SELECT DISTINCT widget_id, visitor_id FROM visitor_events WHERE customer_id = %s"
            " UNION SELECT DISTINCT widget_id, visitor_id FROM visitor_events"
            " WHERE tenant_id = %s AND event_type = 'identify' AND user_id = %s",
            (customer_id, tenant_id, user_id),
        ).fetchall()
        deleted = 0
        for widget_id, visitor_id in visitors:
            _suppress(conn, tenant_id, "visitor", f"{widget_id}:{visitor_id}")
            deleted += conn.execute(
                "DELETE FROM visitor_events WHERE tenant_id = %s AND visitor_id = %s AND widget_id = %s",
                (tenant_id, visitor_id, widget_id),
            ).rowcount
        deleted += conn.execute("DELETE FROM visitor_events WHERE customer_id = %s", (customer_id,)).rowcount
        conn.execute("DELETE FROM customers WHERE id = %s", (customer_id,))
        result = Erasure(digest, deleted, visitors=len(visitors), contact_deleted=True)
        audit(
            conn,
            actor=actor,
            action="erase.contact",
            tenant_id=tenant_id,
            entity="contact",
            entity_id=digest,
            old=None,
            new={"events_deleted": deleted, "visitors": len(visitors)},
            request_id=request_id,
        )
    # Only once committed (module docstring). The contact marker stops links to the contact from identify
    # calls still in flight (their visitors are not in the database yet, so not among `visitors`).
    notify([event_key(str(w), v) for w, v in visitors] + [contact_marker_key(customer_id)])
    return result
