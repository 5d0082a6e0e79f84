"""The event model shared by every stage: event types, the record that travels on the topics, and the
deterministic ids derived from it. The Avro schema (schemas/visitor_event.avsc) is its wire form."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import TypedDict


class EventType(StrEnum):
    PAGEVIEW = "pageview"
    SESSION_START = "session_start"
    CUSTOM = "custom"
    IDENTIFY = "identify"


# Event types a client may send; session_start is derived by the processors only.
CLIENT_EVENT_TYPES = frozenset({EventType.PAGEVIEW, EventType.CUSTOM, EventType.IDENTIFY})


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


class IdentityLink(TypedDict):
    tenant_id: str | uuid.UUID
    widget_id: str | uuid.UUID
    visitor_id: str
    user_id: str
    customer_id: str | uuid.UUID
    linked_at: datetime


# Fixed namespaces so that ids derived from the same facts are the same on every replay.
_SESSION_NS = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e01")
_CUSTOMER_NS = uuid.UUID("6f1c1d1e-5a3b-4b7e-9a51-0c2f6c1f5e02")


def session_id_for(widget_id: str | uuid.UUID, visitor_id: str, started_at: datetime) -> uuid.UUID:
    """A session is named by who and when it started, so reprocessing yields the same id."""
    micros = int(started_at.timestamp() * 1_000_000)
    return uuid.uuid5(_SESSION_NS, f"{widget_id}|{visitor_id}|{micros}")


def session_start_event_id(session_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(_SESSION_NS, f"start|{session_id}")


def customer_id_for(tenant_id: str | uuid.UUID, user_id: str) -> uuid.UUID:
    """One CRM contact per (tenant, external user id); no database round trip needed to name it."""
    return uuid.uuid5(_CUSTOMER_NS, f"{tenant_id}|{user_id}")
