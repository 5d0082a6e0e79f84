"""Validation of a widget batch, by hand over the parsed JSON (cheaper per event than a model, and every
error becomes a reason we word ourselves). Envelope errors reject the whole request; event errors reject
just that event, and the valid events of the batch are still published."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from producer_api.errors import ApiError
from site_activity.events import EventType, VisitorEvent
from site_activity.settings import Settings


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int
    max_events: int
    max_name_chars: int
    max_properties_bytes: int
    max_visitor_id_chars: int = 128
    max_user_id_chars: int = 255
    max_url_chars: int = 2048
    max_referrer_chars: int = 2048

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_body_bytes, settings.max_events_per_batch, settings.max_name_chars,
                   settings.max_properties_bytes)


@dataclass(frozen=True, slots=True)
class Envelope:
    widget_id: str  # canonical lower-case UUID text
    visitor_id: str
    sent_at: datetime
    events: list[Any]
    # Set when the body holds unpaired UTF-16 surrogates (valid JSON escapes, but not encodable as UTF-8):
    # then each event is checked for them, so one bad string costs one event, not the whole batch.
    has_lone_surrogates: bool = False


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    reason: str

    def public(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason}


class _Invalid(ValueError):
    """One field of one event (or of the envelope) is wrong; the message is the reason the client sees."""


# Postgres text and jsonb cannot hold U+0000, so such an event could never be written downstream.
# In compact JSON a NUL is the escape \u0000 preceded by an even number of backslashes.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(doc: dict[str, Any], field: str) -> str:
    value = doc.get(field)
    if value is None:
        raise _Invalid(f"{field} is required")
    if not isinstance(value, str) or len(value) > 45:
        raise _Invalid(f"{field} must be a UUID string")
    if _CANONICAL_UUID.fullmatch(value):  # what clients send (crypto.randomUUID); skips the slower parse
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _Invalid(f"{field} must be a UUID string, got {value!r}") from None


def _text(doc: dict[str, Any], field: str, max_chars: int, *, required: bool) -> str | None:
    value = doc.get(field)
    if value is None:
        if required:
            raise _Invalid(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be a string, got {type(value).__name__}")
    if required and not value:
        raise _Invalid(f"{field} must not be empty")
    if len(value) > max_chars:  # len() counts code points, so "é" and "😀" are one character each
        raise _Invalid(f"{field} must be at most {max_chars} characters, got {len(value)}")
    if "\x00" in value:
        raise _Invalid(f"{field} must not contain NUL characters")
    return value


def _timestamp(doc: dict[str, Any], field: str) -> datetime:
    value = doc.get(field)
    if value is None:
        raise _Invalid(f"{field} is required")
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(f"{field} must be an ISO-8601 timestamp, got {value[:64]!r}") from None
    # A timestamp without an offset is taken as UTC, which is what the widget sends (toISOString()).
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _json_object(doc: dict[str, Any], field: str, max_bytes: int) -> str:
    value = doc.get(field)
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise _Invalid(f"{field} must be a JSON object, got {_json_type(value)}")
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode())
    if size > max_bytes:
        raise _Invalid(f"{field} is {size} bytes as JSON, at most {max_bytes} allowed")
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise _Invalid(f"{field} must not contain NUL characters")
    return text


def _utf8_encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def parse_envelope(body: bytes, limits: Limits) -> Envelope:
    """The request as a whole; any error here rejects it and nothing is published."""
    lone_surrogates = False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson refuses "\ud800"-style escapes that browsers' JSON.stringify emits for broken strings;
        # the stdlib parser accepts them, and the events carrying them are rejected one by one below.
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
        lone_surrogates = True
    if not isinstance(doc, dict):
        raise ApiError(400, "invalid_request", f"body must be a JSON object, got {_json_type(doc)}")
    try:
        widget_id = _uuid(doc, "widget_id")
        visitor_id = _text(doc, "visitor_id", limits.max_visitor_id_chars, required=True)
        sent_at = _timestamp(doc, "sent_at")
    except _Invalid as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    events = doc.get("events")
    if not isinstance(events, list):
        raise ApiError(400, "invalid_request", "events must be an array")
    if len(events) > limits.max_events:
        raise ApiError(413, "too_many_events", f"at most {limits.max_events} events per request, got {len(events)}",
                       limit=limits.max_events)
    assert visitor_id is not None
    if lone_surrogates and not _utf8_encodable(visitor_id):
        raise ApiError(400, "invalid_request", "visitor_id contains an unpaired UTF-16 surrogate")
    return Envelope(widget_id, visitor_id, sent_at, events, lone_surrogates)


def _event_type(doc: dict[str, Any]) -> str:
    value = doc.get("type")
    if value is None:
        raise _Invalid("type is required")
    if not isinstance(value, str):
        raise _Invalid(f"type must be a string, got {type(value).__name__}")
    if value == EventType.SESSION_START:
        raise _Invalid("session_start events are derived by the server and cannot be sent by clients")
    if value not in (EventType.PAGEVIEW, EventType.CUSTOM, EventType.IDENTIFY):
        raise _Invalid(f"unknown type {value[:40]!r}; expected pageview, custom or identify")
    return value


def _corrected_time(client_time: datetime, env: Envelope, received_at: datetime) -> datetime:
    """The client's clock may be off; only the age of the event on that clock is trusted:
    occurred_at = received_at - (sent_at - client occurred_at), never later than received_at."""
    try:
        occurred = received_at - (env.sent_at - client_time)
    except OverflowError:
        raise _Invalid("occurred_at is too far from sent_at") from None
    return min(occurred, received_at)


def build_event(doc: Any, env: Envelope, tenant_id: str, received_at: datetime, limits: Limits) -> VisitorEvent:
    if not isinstance(doc, dict):
        raise _Invalid(f"event must be a JSON object, got {_json_type(doc)}")
    event_type = _event_type(doc)
    name = user_id = None
    properties = "{}"
    if event_type == EventType.CUSTOM:
        name = _text(doc, "name", limits.max_name_chars, required=True)
        properties = _json_object(doc, "properties", limits.max_properties_bytes)
    elif event_type == EventType.IDENTIFY:
        user_id = _text(doc, "user_id", limits.max_user_id_chars, required=True)
        properties = _json_object(doc, "traits", limits.max_properties_bytes)
    return {
        "event_id": _uuid(doc, "event_id"),
        "event_type": event_type,
        "tenant_id": tenant_id,
        "widget_id": env.widget_id,
        "visitor_id": env.visitor_id,
        "name": name,
        "url": _text(doc, "url", limits.max_url_chars, required=False),
        "referrer": _text(doc, "referrer", limits.max_referrer_chars, required=False),
        "properties": properties,
        "user_id": user_id,
        "occurred_at": _corrected_time(_timestamp(doc, "occurred_at"), env, received_at),
        "received_at": received_at,
        "session_id": None,
        "customer_id": None,
    }


def build_events(env: Envelope, tenant_id: str, received_at: datetime,
                 limits: Limits) -> tuple[list[VisitorEvent], list[Rejection]]:
    """Server-side fields (tenant, received_at, ids the processors fill in) never come from the body."""
    accepted: list[VisitorEvent] = []
    rejected: list[Rejection] = []
    for index, doc in enumerate(env.events):
        try:
            if env.has_lone_surrogates and not _utf8_encodable(doc):
                raise _Invalid("event contains a string with an unpaired UTF-16 surrogate (not valid Unicode text)")
            accepted.append(build_event(doc, env, tenant_id, received_at, limits))
        except _Invalid as exc:
            rejected.append(Rejection(index, str(exc)))
    return accepted, rejected
