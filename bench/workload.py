"""The benchmark's synthetic traffic: widget requests as the browser sends them, and the same events as the
API puts them on the raw topic (so the bare producer, the sink preload and the bare COPY all handle the
exact records the real path handles)."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from psycopg.adapt import Dumper
from psycopg.pq import Format

from schemas.codec import VISITOR_EVENT, AvroCodec, EventCodec
from sink.records import FIELDS
from site_activity.events import VisitorEvent
from site_activity.topics import event_key

EVENTS_PER_BODY = 25
TRACK_PATH = "/api/widget/track"

_PAGES = ["/", "/pricing", "/docs/getting-started", "/blog/2026/11/launch", "/signup", "/account/settings"]
_REFERRERS = [None, "https://www.google.com/", "https://news.ycombinator.com/", "https://example.org/post"]


def _event(rng: random.Random, index: int, at: datetime) -> dict[str, Any]:
    """A realistic mix per request: mostly pageviews, a few custom events, one identify."""
    base: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "occurred_at": (at + timedelta(milliseconds=40 * index))
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "url": "https://shop.example.com" + rng.choice(_PAGES),
    }
    if index == EVENTS_PER_BODY - 1:
        return {
            **base,
            "type": "identify",
            "user_id": f"u_{rng.randrange(10**6)}",
            "traits": {"email": "someone@example.com", "plan": "pro", "seats": 5},
        }
    if index % 6 == 5:
        return {
            **base,
            "type": "custom",
            "name": "clicked_upgrade",
            "properties": {"plan": rng.choice(["pro", "team"]), "position": index, "variant": "b"},
        }
    return {**base, "type": "pageview", "referrer": rng.choice(_REFERRERS)}


def make_body(widget_id: str, rng: random.Random) -> dict[str, Any]:
    """One widget request of EVENTS_PER_BODY events with fresh event ids."""
    now = datetime.now(UTC)
    start = now - timedelta(seconds=2)
    return {
        "widget_id": widget_id,
        "visitor_id": f"v_{rng.getrandbits(64):016x}",
        "sent_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "events": [_event(rng, i, start) for i in range(EVENTS_PER_BODY)],
    }


def make_bodies(widget_id: str, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_body(widget_id, rng) for _ in range(count)]


def http_request(body: dict[str, Any], port: int) -> bytes:
    """The raw HTTP/1.1 keep-alive request, as the widget sends it (text/plain: no CORS preflight)."""
    payload = orjson.dumps(body)
    head = (
        f"POST {TRACK_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: text/plain;charset=UTF-8\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def to_records(body: dict[str, Any], tenant_id: str, received_at: datetime) -> list[VisitorEvent]:
    """The records the API publishes for `body` (same fields, same skew correction, same JSON text)."""
    sent_at = _parse_time(body["sent_at"])
    records: list[VisitorEvent] = []
    for ev in body["events"]:
        props = (
            ev.get("properties") if ev["type"] == "custom" else ev.get("traits") if ev["type"] == "identify" else None
        )
        occurred = min(received_at - (sent_at - _parse_time(ev["occurred_at"])), received_at)
        records.append(
            {
                "event_id": ev["event_id"],
                "event_type": ev["type"],
                "tenant_id": tenant_id,
                "widget_id": body["widget_id"],
                "visitor_id": body["visitor_id"],
                "name": ev.get("name"),
                "url": ev.get("url"),
                "referrer": ev.get("referrer"),
                "properties": json.dumps(props, separators=(",", ":"), ensure_ascii=False) if props else "{}",
                "user_id": ev.get("user_id"),
                "occurred_at": occurred,
                "received_at": received_at,
                "session_id": None,
                "customer_id": None,
            }
        )
    return records


def encoded_messages(bodies: list[dict[str, Any]], tenant_id: str) -> list[tuple[bytes, bytes]]:
    """(key, Avro value) pairs, one event per message: the bare producer's per-message limit."""
    codec = AvroCodec(VISITOR_EVENT)
    received_at = datetime.now(UTC)
    out: list[Any] = []
    for body in bodies:
        key = event_key(body["widget_id"], body["visitor_id"])
        out.extend((key, codec.encode(rec)) for rec in to_records(body, tenant_id, received_at))
    return out


def encoded_requests(bodies: list[dict[str, Any]], tenant_id: str) -> list[tuple[bytes, bytes]]:
    """(key, Avro value) pairs exactly as the API writes them to the raw topic: one VisitorEventBatch per
    request (the enriched topic has the same shape)."""
    codec = EventCodec()
    received_at = datetime.now(UTC)
    return [
        (
            event_key(body["widget_id"], body["visitor_id"]),
            codec.encode_events(sorted(to_records(body, tenant_id, received_at), key=lambda r: r["occurred_at"])),
        )
        for body in bodies
    ]


# --- rows for the bare COPY ------------------------------------------------------------------------

# The bare COPY writes the sink's row layout: the same columns in the same order (copy_row below).
COPY_COLUMNS = FIELDS


class JsonText(str):
    """JSON object text that goes to a jsonb column as is (no parse/re-serialise round trip)."""


class JsonTextBinaryDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: str) -> bytes:
        # jsonb's binary wire format is a version byte (1) followed by the JSON text.
        return b"\x01" + obj.encode()


def copy_row(rec: VisitorEvent) -> tuple[Any, ...]:
    return (
        uuid.UUID(str(rec["widget_id"])),
        uuid.UUID(str(rec["event_id"])),
        uuid.UUID(str(rec["tenant_id"])),
        rec["visitor_id"],
        rec["event_type"],
        rec["name"],
        rec["url"],
        rec["referrer"],
        JsonText(rec["properties"]),
        rec["user_id"],
        None,
        None,
        rec["occurred_at"],
        rec["received_at"],
    )
