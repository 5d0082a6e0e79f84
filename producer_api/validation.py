"""Validation of a widget request, by hand over the parsed JSON (cheaper per event than a model, and every
error becomes a reason we word ourselves). Envelope errors reject the whole request; event errors reject
just that event, and the valid events of the request are still published."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from producer_api.errors import ApiError
from producer_api.json_body import MalformedJson, Unfaithful, parse_body
from site_activity.events import MAX_VISITOR_ID_CHARS, EventType, VisitorEvent
from site_activity.settings import Settings
from site_activity.topics import max_event_value_bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """The ingest contract's limits (README, "Limits"). Text limits count characters (Unicode code points,
    so "é" and "😀" are one each); a character is at most 4 UTF-8 bytes, which bounds every field in bytes."""

    max_body_bytes: int
    max_events: int
    max_name_chars: int
    max_properties_bytes: int  # UTF-8 bytes of the compact JSON, as stored
    # The encoded raw Kafka message (VisitorEventBatch value) of one request: what one Kafka message can carry
    # (topics.max_event_value_bytes: kafka_max_message_bytes minus key and framing). It follows from the raw
    # message alone, since the processors split their enriched output by size however much it grows. With the
    # default body limit no request reaches it (README, "Request size"); it guards inconsistent settings.
    max_raw_message_bytes: int
    max_visitor_id_chars: int = MAX_VISITOR_ID_CHARS
    max_user_id_chars: int = 255
    max_url_chars: int = 2048
    max_referrer_chars: int = 2048
    max_property_key_chars: int = 128
    # Levels of objects/arrays in properties and traits, the properties object itself being level 1.
    max_depth: int = 32

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_body_bytes,
            settings.max_events_per_request,
            settings.max_name_chars,
            settings.max_properties_bytes,
            max_event_value_bytes(settings),
        )


@dataclass(frozen=True, slots=True)
class Envelope:
    widget_id: str  # canonical lower-case UUID text
    visitor_id: str
    sent_at: datetime
    events: list[Any]


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    reason: str

    def public(self) -> dict[str, Any]:
        return {"index": self.index, "reason": self.reason}


class _Invalid(ValueError):
    """One field of one event (or of the envelope) is wrong; the message is the reason the client sees."""


# Unpaired UTF-16 surrogates: valid as JSON escapes ("\ud800", what JSON.stringify writes for a broken JS
# string), but not Unicode text, so neither UTF-8 (Avro, Postgres) nor jsonb can hold them.
_SURROGATE = re.compile("[\ud800-\udfff]")

# user_id values that are a client bug, not a user: an unset variable or an object stringified by JavaScript,
# a placeholder, a boolean or a number-like default. Compared after stripping whitespace, case-insensitively;
# empty and whitespace-only ids are refused too. The widget mirrors this list (README, "identify").
PLACEHOLDER_USER_IDS = frozenset(
    {
        "undefined",
        "null",
        "none",
        "nil",
        "nan",
        "0",
        "-1",
        "true",
        "false",
        "[object object]",
        "anonymous",
        "guest",
        "unknown",
        "not_authenticated",
        "id",
        "user_id",
        "userid",
        "email",
        "00000000-0000-0000-0000-000000000000",
    }
)


def is_placeholder_user_id(user_id: str) -> bool:
    """True for ids that name no user (see PLACEHOLDER_USER_IDS): identify refuses them."""
    stripped = user_id.strip()
    return not stripped or stripped.casefold() in PLACEHOLDER_USER_IDS


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


def _check_string(value: str, what: str) -> None:
    """What Postgres text/jsonb and UTF-8 cannot hold: NUL and unpaired surrogates (only the careful parser
    lets those through; the check costs next to nothing for ASCII, the common case)."""
    if "\x00" in value:
        raise _Invalid(f"{what} must not contain NUL characters")
    if not value.isascii() and _SURROGATE.search(value):
        raise _Invalid(f"{what} contains an unpaired UTF-16 surrogate (not valid Unicode text)")


def _text(doc: dict[str, Any], field: str, max_chars: int, *, required: bool) -> str | None:
    value = doc.get(field)
    if value is None:
        if required:
            raise _Invalid(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be a string, got {_json_type(value)}")
    if required and not value:
        raise _Invalid(f"{field} must not be empty")
    if len(value) > max_chars:  # len() counts code points, so "é" and "😀" are one character each
        raise _Invalid(f"{field} must be at most {max_chars} characters, got {len(value)}")
    _check_string(value, field)
    return value


def _url(doc: dict[str, Any], field: str, max_chars: int) -> str | None:
    """A url/referrer without its #fragment (it often carries secrets, e.g. an OAuth #access_token=…): the
    widget never sends one, but old copies of it and direct API clients may. The limit applies to what is
    stored, so a long fragment does not get an otherwise storable url refused."""
    value = doc.get(field)
    if isinstance(value, str) and "#" in value:
        doc = {field: value.split("#", 1)[0]}
    return _text(doc, field, max_chars, required=False)


def _timestamp(doc: dict[str, Any], field: str) -> datetime:
    value = doc.get(field)
    if value is None:
        raise _Invalid(f"{field} is required")
    if not isinstance(value, str):
        raise _Invalid(f"{field} must be an ISO-8601 string, got {_json_type(value)}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(f"{field} must be an ISO-8601 timestamp, got {value[:64]!r}") from None
    # A timestamp without an offset is taken as UTC, which is what the widget sends (toISOString()).
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _where(path: str, key: str | int) -> str:
    where = f"{path}.{key}" if type(key) is str else f"{path}[{key}]"
    return where if len(where) <= 120 else where[:117] + "..."  # reasons stay short, even for deep paths


def _unstorable(value: str) -> bool:
    return "\x00" in value or (not value.isascii() and _SURROGATE.search(value) is not None)


def _check_tree(root: dict[str, Any], field: str, limits: Limits) -> None:
    """Everything in a properties/traits object must be storable as it was sent: depth, keys, strings and
    numbers (json_body's number rule). Iterative, so no input depth can exhaust the stack; it runs before
    anything recursive (json.dumps, the size check) touches the value. Raises _Invalid naming the path."""
    stack: list[tuple[dict[str, Any] | list[Any], int, str]] = [(root, 1, field)]
    while stack:
        node, level, path = stack.pop()
        pairs = node.items() if type(node) is dict else enumerate(node)
        for key, value in pairs:
            if type(key) is str:
                if len(key) > limits.max_property_key_chars:
                    raise _Invalid(
                        f"{path} has a key of {len(key)} characters, at most {limits.max_property_key_chars} allowed"
                    )
                if _unstorable(key):
                    _check_string(key, f"{path} keys")
            kind = type(value)
            if kind is str:
                if _unstorable(value):
                    _check_string(value, _where(path, key))
            elif kind is dict or kind is list:
                if level >= limits.max_depth:
                    raise _Invalid(f"{_where(path, key)} is nested more than {limits.max_depth} levels deep")
                stack.append((value, level + 1, _where(path, key)))
            elif kind is Unfaithful:
                raise _Invalid(f"{_where(path, key)}: {value.describe()}")


def _json_object(doc: dict[str, Any], field: str, limits: Limits) -> str:
    value = doc.get(field)
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise _Invalid(f"{field} must be a JSON object, got {_json_type(value)}")
    _check_tree(value, field, limits)
    # Python keeps every accepted number exactly (ints at any size, floats as their shortest round-trip form).
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode())
    if size > limits.max_properties_bytes:
        raise _Invalid(f"{field} is {size} bytes as JSON, at most {limits.max_properties_bytes} allowed")
    return text


def _json_type(value: Any) -> str:
    return {
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        dict: "object",
        Unfaithful: "number",
    }.get(type(value), "null")


def parse_envelope(body: bytes, limits: Limits) -> Envelope:
    """The request as a whole; any error here rejects it and nothing is published."""
    try:
        # Envelope (1) > events (2) > event (3) > properties (4, level 1 of max_depth); one level more is kept
        # so that over-deep content shows up as such.
        doc = parse_body(body, limits.max_depth + 4)
    except MalformedJson as exc:
        raise ApiError(400, "malformed_json", f"body is not valid JSON: {exc}") from None
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
        raise ApiError(
            413,
            "too_many_events",
            f"at most {limits.max_events} events per request, got {len(events)}",
            limit=limits.max_events,
        )
    assert visitor_id is not None
    return Envelope(widget_id, visitor_id, sent_at, events)


def _event_type(doc: dict[str, Any]) -> str:
    value = doc.get("type")
    if value is None:
        raise _Invalid("type is required")
    if not isinstance(value, str):
        raise _Invalid(f"type must be a string, got {_json_type(value)}")
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
        properties = _json_object(doc, "properties", limits)
    elif event_type == EventType.IDENTIFY:
        user_id = _text(doc, "user_id", limits.max_user_id_chars, required=True)
        assert user_id is not None
        if is_placeholder_user_id(user_id):
            # A shared placeholder would merge unrelated visitors into one contact.
            raise _Invalid(
                f"user_id {user_id[:40]!r} is a placeholder, not a user id (an unset variable?); "
                "identify needs the user's real id"
            )
        properties = _json_object(doc, "traits", limits)
    return {
        "event_id": _uuid(doc, "event_id"),
        "event_type": event_type,
        "tenant_id": tenant_id,
        "widget_id": env.widget_id,
        "visitor_id": env.visitor_id,
        "name": name,
        "url": _url(doc, "url", limits.max_url_chars),
        "referrer": _url(doc, "referrer", limits.max_referrer_chars),
        "properties": properties,
        "user_id": user_id,
        "occurred_at": _corrected_time(_timestamp(doc, "occurred_at"), env, received_at),
        "received_at": received_at,
        "session_id": None,
        "customer_id": None,
    }


def build_events(
    env: Envelope, tenant_id: str, received_at: datetime, limits: Limits
) -> tuple[list[VisitorEvent], list[Rejection]]:
    """Server-side fields (tenant, received_at, ids the processors fill in) never come from the body."""
    accepted: list[VisitorEvent] = []
    rejected: list[Rejection] = []
    for index, doc in enumerate(env.events):
        try:
            accepted.append(build_event(doc, env, tenant_id, received_at, limits))
        except _Invalid as exc:
            rejected.append(Rejection(index, str(exc)))
    return accepted, rejected
