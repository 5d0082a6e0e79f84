"""Erasing a person (GDPR): delete their events (and contact), and suppress them from then on.

Race with events in flight: the erase takes an exclusive per-tenant advisory lock for its transaction; the sink
takes the shared one before it filters a batch against `erased_subjects` (sink/writer.py). So a sink transaction
either committed before the erase started (its rows are visible to the erase's DELETE) or starts its filter
after the erase committed (it sees the suppression) — no event of an erased subject survives.
Subjects are stored and audited only as salted hashes (SQL function erasure_hash, migration 0004).
While an erase holds the lock the sink waits, so an erase is kept short: its lookups are index scans (one
visitor's events; a contact's linked events and identify calls) and the Kafka notice is bounded (10 s)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from site_activity.settings import Settings
from site_activity.topics import Topics, event_key

# pg_advisory_xact_lock(int4, int4) key space: (this class, hashtext(tenant id)). A hash collision between two
# tenants only makes one wait for the other's erase.
TENANT_LOCK_CLASS = 0x5345
_LOCK_EXCLUSIVE = "SELECT pg_advisory_xact_lock(%s, hashtext(%s::text))"


class ErasureError(ValueError):
    """The subject to erase does not exist in the tenant (callers answer 404)."""


class NotifyError(RuntimeError):
    """The processors could not be told (Kafka unreachable); nothing was erased, the erase can be retried."""


# Tells the processors which visitor keys ("<widget_id>:<visitor_id>") were erased; raises NotifyError.
Notify = Callable[[list[bytes]], None]
ERASED_MARKER = b'{"erased":true}'


def kafka_notifier(settings: Settings, timeout_s: float = 10.0) -> Notify:
    """Publishes one marker per erased visitor key to the compacted erasures topic (co-partitioned with the
    raw topic: same key, same partitioner), and waits until Kafka has them. The processors then drop the
    visitor's state and ignore their events for good (stream_processors/erasures.py)."""
    from confluent_kafka import Producer

    from site_activity.kafka import producer_config

    topic = Topics.from_settings(settings).erasures

    def notify(keys: list[bytes]) -> None:
        if not keys:
            return
        failed: list[str] = []
        producer = Producer(producer_config(settings))
        for key in keys:
            producer.produce(topic, ERASED_MARKER, key,
                             on_delivery=lambda err, _m: failed.append(str(err)) if err else None)
        left = producer.flush(timeout_s)
        if left or failed:
            raise NotifyError(f"could not publish erasure markers to {topic}: {failed[:1] or f'{left} undelivered'}")

    return notify


@dataclass(frozen=True)
class Erasure:
    subject_hash: str  # hex; what the audit log names
    events_deleted: int
    visitors: int = 1
    contact_deleted: bool = False

    def public(self) -> dict[str, object]:
        return {"subject_hash": self.subject_hash, "events_deleted": self.events_deleted, "visitors": self.visitors,
                "contact_deleted": self.contact_deleted}


def _suppress(conn: psycopg.Connection, tenant_id: uuid.UUID, kind: str, subject: str) -> bytes:
    row = conn.execute(
        "INSERT INTO erased_subjects (tenant_id, subject_hash, kind) VALUES (%s, erasure_hash(%s, %s, %s), %s)"
        " ON CONFLICT (tenant_id, subject_hash) DO UPDATE SET erased_at = erased_subjects.erased_at"
        " RETURNING subject_hash", (tenant_id, tenant_id, kind, subject, kind)).fetchone()
    return bytes(row[0])  # type: ignore[index]


def _audit(conn: psycopg.Connection, tenant_id: uuid.UUID, actor: str, action: str, entity: str, subject_hash: str,
           details: dict[str, object], request_id: str | None) -> None:
    conn.execute(
        "INSERT INTO audit_log (actor, action, tenant_id, entity, entity_id, old_value, new_value, request_id)"
        " VALUES (%s, %s, %s, %s, %s, NULL, %s, %s)",
        (actor, action, tenant_id, entity, subject_hash, Jsonb(details), request_id))


def erase_visitor(conn: psycopg.Connection, tenant_id: uuid.UUID, widget_id: uuid.UUID, visitor_id: str, *,
                  actor: str, notify: Notify, request_id: str | None = None) -> Erasure:
    """Deletes every event of the widget's visitor and suppresses that visitor id from now on (also before it
    was ever seen). Raises ErasureError when the widget is not the tenant's, NotifyError (nothing erased)
    when the processors cannot be told."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM widget_configs WHERE id = %s AND tenant_id = %s",
                        (widget_id, tenant_id)).fetchone() is None:
            raise ErasureError(f"no widget {widget_id}")
        conn.execute(_LOCK_EXCLUSIVE, (TENANT_LOCK_CLASS, tenant_id))
        digest = _suppress(conn, tenant_id, "visitor", f"{widget_id}:{visitor_id}").hex()
        deleted = conn.execute("DELETE FROM visitor_events WHERE tenant_id = %s AND visitor_id = %s AND widget_id = %s",
                               (tenant_id, visitor_id, widget_id)).rowcount
        result = Erasure(digest, deleted)
        _audit(conn, tenant_id, actor, "erase.visitor", "visitor", digest,
               {"events_deleted": deleted}, request_id)
        # Last, before the commit: if Kafka cannot take the marker, the whole erase rolls back and can be
        # retried (every step is idempotent); once it is committed, the processors know too.
        notify([event_key(str(widget_id), visitor_id)])
    return result


def erase_contact(conn: psycopg.Connection, tenant_id: uuid.UUID, customer_id: uuid.UUID, *, actor: str,
                  notify: Notify, request_id: str | None = None) -> Erasure:
    """Deletes the contact, every event of every visitor ever linked to it (and its identify calls), and
    suppresses the contact, its user id and those visitors from now on. Raises ErasureError when the tenant
    has no such contact."""
    with conn.transaction():
        row = conn.execute("SELECT external_id FROM customers WHERE id = %s AND tenant_id = %s",
                           (customer_id, tenant_id)).fetchone()
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
            (customer_id, tenant_id, user_id)).fetchall()
        deleted = 0
        for widget_id, visitor_id in visitors:
            _suppress(conn, tenant_id, "visitor", f"{widget_id}:{visitor_id}")
            deleted += conn.execute(
                "DELETE FROM visitor_events WHERE tenant_id = %s AND visitor_id = %s AND widget_id = %s",
                (tenant_id, visitor_id, widget_id)).rowcount
        deleted += conn.execute("DELETE FROM visitor_events WHERE customer_id = %s", (customer_id,)).rowcount
        conn.execute("DELETE FROM customers WHERE id = %s", (customer_id,))
        result = Erasure(digest, deleted, visitors=len(visitors), contact_deleted=True)
        _audit(conn, tenant_id, actor, "erase.contact", "contact", digest,
               {"events_deleted": deleted, "visitors": len(visitors)}, request_id)
        notify([event_key(str(w), v) for w, v in visitors])  # last, before the commit (see erase_visitor)
    return result
