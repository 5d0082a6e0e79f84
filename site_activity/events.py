"""The event model shared by every stage: event types, the record that travels on the topics, and the
deterministic ids derived from it. The Avro schema (schemas/visitor_event.avsc) is its wire form."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypedDict

from schemas.fields import check_event_fields


class EventType(StrEnum):
    PAGEVIEW = "pageview"
    SESSION_START = "session_start"
    CUSTOM = "custom"
    IDENTIFY = "identify"


# The longest visitor id the ingest API accepts (characters): also what an erase request may name.
MAX_VISITOR_ID_CHARS = 128


class VisitorEvent(TypedDict):
    """One event as it travels on the raw and enriched topics (see schemas/visitor_event.avsc).

    uuid fields are str when built by the API and uuid.UUID when decoded by fastavro; both encode."""

    event_id: str | uuid.UUID
    event_type: str
    tenant_id: str | uuid.UUID
    widget_id: str | uuid.UUID
    visitor_id: str
    name: str | None
    url: str | None
    referrer: str | None
    properties: str  # JSON object text
    user_id: str | None
    occurred_at: datetime
    received_at: datetime
    session_id: str | uuid.UUID | None
    customer_id: str | uuid.UUID | None


check_event_fields(VisitorEvent.__annotations__, "site_activity.events.VisitorEvent")

# Fixed namespaces so that ids derived from the same facts are the same on every replay.
_SESSION_NS = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e01")
_CUSTOMER_NS = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e02")
_SESSION_NS_BYTES, _CUSTOMER_NS_BYTES = _SESSION_NS.bytes, _CUSTOMER_NS.bytes
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def session_id_for(widget_id: str | uuid.UUID, visitor_id: str, started_at: datetime) -> uuid.UUID:
    """A session is named by who and when it started, so reprocessing yields the same id."""
    return uuid.UUID(session_id_text(str(widget_id), visitor_id, (started_at - _EPOCH) // _MICROSECOND))


def customer_id_for(tenant_id: str | uuid.UUID, user_id: str) -> uuid.UUID:
    """One CRM contact per (tenant, external user id); no database round trip needed to name it."""
    return uuid.UUID(customer_id_text(str(tenant_id), user_id))


# The same ids as canonical text, for the stream processors' hot path (no datetime or UUID objects).
def session_id_text(widget_id: str, visitor_id: str, started_us: int) -> str:
    return _uuid5_text(_SESSION_NS_BYTES, f"{widget_id}|{visitor_id}|{started_us}")


def session_start_event_id_text(session_id: str) -> str:
    return _uuid5_text(_SESSION_NS_BYTES, f"start|{session_id}")


def customer_id_text(tenant_id: str, user_id: str) -> str:
    return _uuid5_text(_CUSTOMER_NS_BYTES, f"{tenant_id}|{user_id}")


def _uuid5_text(namespace: bytes, name: str) -> str:
    """str(uuid.uuid5(namespace, name)) (RFC 4122 name-based, SHA-1), in a third of the time."""
    digest = bytearray(hashlib.sha1(namespace + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
